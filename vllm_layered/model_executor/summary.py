"""One line that says what a loaded pipeline is: which model, on which device, in which precision.

For the server's startup log and the CLI's progress, so a user sees at once whether the real model or the
embedded tiny one is running, and on the GPU or the CPU.
"""

from __future__ import annotations

import os

import torch

from vllm_layered.model_executor.model_loader.tiny_checkpoint import default_model_dir
from vllm_layered.model_executor.parallel import ParallelTransformer
from vllm_layered.model_executor.pipeline import LayeredPipeline


def _describe_model(model: str | os.PathLike | None) -> str:
    """``--model`` as given, or the embedded tiny model (None) with where it lives and what it is."""
    if model is None:
        return f"the embedded tiny random model at {default_model_dir()} (its layers are noise)"
    return os.fspath(model)


def describe_pipeline(pipeline: LayeredPipeline, *, model: str | os.PathLike | None, quantization: str | None) -> str:
    """E.g. "Qwen/Qwen-Image-Layered on cuda:0 (NVIDIA H200), bfloat16, fp8 transformer, 2 GPUs (cfg-parallel 2 x
    sp 1)"; ``model`` is ``--model`` (None: the embedded tiny model), ``quantization`` None or "none" for none."""
    device = pipeline.device
    where = str(device)
    if device.type == "cuda":
        where += f" ({torch.cuda.get_device_name(device)})"
    parts = [f"{_describe_model(model)} on {where}", str(pipeline.dtype).removeprefix("torch.")]
    if quantization not in (None, "none"):
        parts.append(f"{quantization} transformer")
    if isinstance(pipeline.transformer, ParallelTransformer):
        layout = pipeline.transformer.ctx.config
        parts.append(f"{layout.world_size} GPUs (cfg-parallel {layout.cfg_degree} x sp {layout.sp_degree})")
    return ", ".join(parts)
