"""Shared pieces of the GPU benchmarks: full-size models with random weights, timing, the cost model.

Speed does not depend on weight values, so the real configs are built with deterministic random bf16
weights straight on the GPU (no 54 GB download, no checkpoint files).
"""

from __future__ import annotations

import copy
import json
import os
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from vllm_layered.model_executor.models.fp8_linear import quantize_fp8
from vllm_layered.model_executor.models.transformer import LayeredTransformer, TransformerConfig
from vllm_layered.model_executor.models.vae import RGBAVAE, VAEConfig
from vllm_layered.model_executor.random_weights import random_weights
from vllm_layered.model_executor.weight_loader import install_weights

FULL_VAE = dict(
    base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
    temperal_downsample=[False, True, True], dropout=0.0, input_channels=4,
    latents_mean=[0.0] * 16, latents_std=[1.0] * 16,
)
QWEN25_VL_7B = dict(  # Qwen2.5-VL-7B-Instruct geometry (the text encoder of Qwen-Image)
    text=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
              num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6,
              rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}),
    vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                fullatt_block_indexes=[7, 15, 23, 31]),
)


def random_module(module_cls, config, *, component: str, device, dtype, seed: int = 0):
    with torch.device("meta"):
        module = module_cls(config=config)
    install_weights(module, random_weights(module, seed=seed, component=component, device=device, dtype=dtype))
    return module.eval()


def random_transformer(device="cuda", dtype=torch.bfloat16, **overrides) -> LayeredTransformer:
    return random_module(LayeredTransformer, TransformerConfig(**overrides), component="transformer",
                         device=device, dtype=dtype)


@dataclass(frozen=True)
class RandomTransformer:
    """A TransformerFactory for parallel worker ranks: the same seeded random weights on every GPU."""

    dtype: torch.dtype = torch.bfloat16

    def __call__(self, device: torch.device) -> LayeredTransformer:
        return random_transformer(device=device, dtype=self.dtype)


def random_vae(device="cuda", dtype=torch.bfloat16) -> RGBAVAE:
    return random_module(RGBAVAE, VAEConfig(**FULL_VAE), component="vae", device=device, dtype=dtype)


def diffusers_transformer_sharing(ours: LayeredTransformer):
    """diffusers' QwenImageTransformer2DModel holding the very same weight tensors as ``ours`` (no copy)."""
    from diffusers import QwenImageTransformer2DModel
    from diffusers.models.transformers.transformer_qwenimage import QwenEmbedLayer3DRope

    c = ours.config
    kwargs = dict(patch_size=c.patch_size, in_channels=c.in_channels, out_channels=c.out_channels,
                  num_layers=c.num_layers, attention_head_dim=c.attention_head_dim,
                  num_attention_heads=c.num_attention_heads, joint_attention_dim=c.joint_attention_dim,
                  axes_dims_rope=c.axes_dims_rope, use_layer3d_rope=True, use_additional_t_cond=True)
    with torch.device("meta"):
        ref = QwenImageTransformer2DModel(**kwargs)
    ref.pos_embed = QwenEmbedLayer3DRope(theta=10000, axes_dim=list(c.axes_dims_rope), scale_rope=True)
    ref.load_state_dict(ours.state_dict(), assign=True, strict=True)
    return ref.eval()


def fp8_transformer_sharing(ours: LayeredTransformer) -> LayeredTransformer:
    """A second transformer holding ``ours``' tensors (no copy) with its FP8 layers swapped in: only the e4m3
    weights are new memory (~13.6 GB at full size)."""
    with torch.device("meta"):
        fp8 = LayeredTransformer(config=ours.config)
    install_weights(fp8, ours.state_dict().items(), component="transformer")
    quantize_fp8(fp8)
    return fp8.eval()


def fp8_pipeline_sharing(pipe):
    """A shallow copy of the pipeline ``pipe`` whose transformer is `fp8_transformer_sharing` of its own: the
    text encoder, VAE and bf16 weights are shared, so bf16 and FP8 can be timed in one process."""
    fp8_pipe = copy.copy(pipe)
    fp8_pipe.transformer = fp8_transformer_sharing(pipe.transformer)
    return fp8_pipe


def random_text_encoder(device="cuda", dtype=torch.bfloat16):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(text_config=QWEN25_VL_7B["text"], vision_config=QWEN25_VL_7B["vision"])
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2_5_VLForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def bench_ms(fn, *, warmup: int = 2, repeat: int = 5) -> float:
    """Median wall time of ``fn`` in ms, timed with CUDA events after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def gemm_tflops(n: int = 8192, dtype=torch.bfloat16) -> float:
    """Measured dense bf16 GEMM rate on random data: the ceiling every figure is compared to."""
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    ms = bench_ms(lambda: a @ b, warmup=5, repeat=20)
    return 2 * n**3 / ms / 1e9


def forward_flops(seq_lens: list[int], dim: int = 3072, blocks: int = 60) -> float:
    """DESIGN.md cost model: per sequence of L tokens, blocks * (24 dim^2 L + 4 L^2 dim)."""
    return sum(blocks * (24 * dim**2 * L + 4 * L**2 * dim) for L in seq_lens)


def write_results(name: str, results) -> None:
    write_text(name, json.dumps(results, indent=2, default=str))


def write_text(name: str, text: str) -> None:
    """A file of full results under $OUT (the device tool brings that folder back); nowhere without it."""
    out = os.environ.get("OUT")
    if out:
        Path(out, name).write_text(text)
