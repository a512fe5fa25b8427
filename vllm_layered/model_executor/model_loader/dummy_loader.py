"""``--load-format dummy``: the real architecture with deterministic random weights, no checkpoint files.

Speed does not depend on weight values, so benchmarks and the GPU acceptance suite run the full-size model
without the 54 GB download: every component is built from its config and each tensor is drawn by
``random_weights`` (seeded by component and tensor name), so two processes on the same kind of device build
bit-identical models (an offline pipeline and a served one can be compared pixel for pixel). The configs of the
released model's size are dummy_checkpoint.py's folder.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from vllm_layered.model_executor.model_loader.random_weights import random_weights

LOAD_FORMATS = ("safetensors", "dummy")
DUMMY_SEED = 0


def check_load_format(load_format: str) -> str:
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"unknown load format {load_format!r}; choose one of {', '.join(LOAD_FORMATS)}")
    return load_format


def dummy_weights(
    module: nn.Module, *, component: str, device: torch.device | str, dtype: torch.dtype | None, buffers: bool = True
):
    """``(name, tensor)`` for every parameter (and buffer) of ``module``: the values a tiny checkpoint of the
    same config would hold (same seed and names), drawn straight on ``device``."""
    return random_weights(
        module, seed=DUMMY_SEED, component=component, device=device, dtype=dtype or torch.float32, buffers=buffers
    )


def dummy_text_encoder(folder: Path, *, device: torch.device, dtype: torch.dtype):
    """A Qwen2.5-VL built from ``folder/config.json`` on ``device``, its parameters set by ``dummy_weights``."""
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    config = AutoConfig.from_pretrained(folder)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype)
    with torch.no_grad():
        for name, tensor in dummy_weights(model, component="text_encoder", device=device, dtype=dtype, buffers=False):
            model.get_parameter(name).copy_(tensor)
    return model
