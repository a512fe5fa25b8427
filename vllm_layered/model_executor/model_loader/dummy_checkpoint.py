"""The released model's geometry as a config-only folder, for ``--load-format dummy`` without ``--model``.

``full_size_model_folder()`` writes, on first use beside the embedded tiny model, the official diffusers layout
with the configs of the 20.4B transformer, the Qwen2.5-VL-7B text encoder and the RGBA-VAE (base_dim 96) and no
weight file (dummy_loader.py draws the weights); the tokenizer and processor are the embedded tiny model's (their
ids fit the 7B vocabulary).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

from vllm_layered.model_executor.model_loader.folders import cached_folder, write_json
from vllm_layered.model_executor.model_loader.tiny_checkpoint import default_model_path
from vllm_layered.model_executor.models.transformer import TransformerConfig

FULL_SIZE_DIRNAME = "qwen-image-layered-dummy"

FULL_SIZE_VAE = {
    "base_dim": 96,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_scales": [],
    "temperal_downsample": [False, True, True],
    "z_dim": 16,
}
# Qwen2.5-VL-7B-Instruct geometry (the text encoder of Qwen-Image).
FULL_SIZE_TEXT = {
    "vocab_size": 152064,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 128000,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
}
FULL_SIZE_VISION = {
    "depth": 32,
    "hidden_size": 1280,
    "intermediate_size": 3420,
    "num_heads": 16,
    "out_hidden_size": 3584,
    "fullatt_block_indexes": [7, 15, 23, 31],
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "window_size": 112,
    "tokens_per_second": 2,
}
_TOKEN_IDS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")


def full_size_model_folder() -> Path:
    """The config-only folder of the released model's geometry, written on first use beside the embedded tiny
    model (``$VLLM_LAYERED_CACHE``, default ``~/.cache/vllm-layered``)."""
    tiny = default_model_path()
    configs = _full_size_configs(tiny)

    def write(folder: Path) -> None:
        for part in ("tokenizer", "processor", "scheduler"):
            shutil.copytree(tiny / part, folder / part)
        shutil.copy(tiny / "model_index.json", folder / "model_index.json")
        for name, config in configs.items():
            write_json(folder / name, config)

    return cached_folder(tiny.parent / FULL_SIZE_DIRNAME, configs, write)


def _full_size_configs(tiny: Path) -> dict[str, dict]:
    from transformers import Qwen2_5_VLConfig

    transformer = json.loads((tiny / "transformer" / "config.json").read_text())
    transformer.update({k: list(v) if isinstance(v, tuple) else v for k, v in asdict(TransformerConfig()).items()
                        if k in transformer})
    vae = {**json.loads((tiny / "vae" / "config.json").read_text()), **FULL_SIZE_VAE}
    tiny_text = json.loads((tiny / "text_encoder" / "config.json").read_text())
    special = {key: tiny_text["text_config"][key] for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
    text = Qwen2_5_VLConfig(
        text_config={**FULL_SIZE_TEXT, **special},
        vision_config=FULL_SIZE_VISION,
        tie_word_embeddings=False,
        **{key: tiny_text[key] for key in _TOKEN_IDS},
    ).to_dict()
    configs = {"transformer/config.json": transformer, "vae/config.json": vae, "text_encoder/config.json": text}
    return json.loads(json.dumps(configs))  # as they read back from disk
