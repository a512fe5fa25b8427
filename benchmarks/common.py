"""Shared pieces of the GPU benchmarks: full-size models with random weights, timing, the cost model.

Speed does not depend on weight values, so the real configs are built with the seeded random bf16 weights of
``--load-format dummy`` straight on the GPU (no 54 GB download, no checkpoint files).
"""

from __future__ import annotations

import copy
import json
import os
import statistics
from pathlib import Path

import torch

from vllm_layered.model_executor.model_loader.dummy_checkpoint import full_size_model_folder
from vllm_layered.model_executor.model_loader.dummy_loader import dummy_weights
from vllm_layered.model_executor.model_loader.weight_loader import install_weights
from vllm_layered.model_executor.models.fp8_linear import quantize_fp8
from vllm_layered.model_executor.models.transformer import LayeredTransformer, TransformerConfig


def random_module(module_cls, config, *, component: str, device, dtype):
    """``module_cls(config=config)`` with the seeded random weights of ``--load-format dummy``."""
    with torch.device("meta"):
        module = module_cls(config=config)
    install_weights(module, dummy_weights(module, component=component, device=device, dtype=dtype),
                    component=component)
    return module.eval()


def random_transformer(device="cuda", dtype=torch.bfloat16, **overrides) -> LayeredTransformer:
    return random_module(LayeredTransformer, TransformerConfig(**overrides), component="transformer",
                         device=device, dtype=dtype)


def full_size_vae_config() -> dict:
    """The released RGBA-VAE's config (diffusers' AutoencoderKLQwenImage arguments)."""
    raw = json.loads((full_size_model_folder() / "vae" / "config.json").read_text())
    return {k: v for k, v in raw.items() if not k.startswith("_")}


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
    """The cost model (docs/cost_model.md): per sequence of L tokens, blocks * (24 dim^2 L + 4 L^2 dim)."""
    return sum(blocks * (24 * dim**2 * L + 4 * L**2 * dim) for L in seq_lens)


def write_results(name: str, results) -> None:
    write_text(name, json.dumps(results, indent=2, default=str))


def write_text(name: str, text: str) -> None:
    """A file of full results under $OUT (the device tool brings that folder back); nowhere without it."""
    out = os.environ.get("OUT")
    if out:
        Path(out, name).write_text(text)
