"""The GPU acceptance suite: the served path against the offline pipeline, at full size, on a real GPU.

Every model here is the released architecture with the seeded random weights of ``--load-format dummy``, so a
served process and this test process hold bit-identical weights. Run on an H200 (docs/testing.md):

    python -m pytest -m gpu tests/gpu -v -s

The bounds below are measured, not guessed: `measured` prints each comparison, and benchmarks/RESULTS.md keeps
the numbers of every run.
"""

from __future__ import annotations

import asyncio
import gc
import io
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from vllm_layered.model_executor.pipeline import GenerationParams, LayeredPipeline
from vllm_layered.serving.engine.engine import EngineConfig, ThreadedEngine
from vllm_layered.serving.engine.request import LayeredRequest, RequestOutput

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
PROMPT = "a red fox sitting on a wooden bench in a snowy park, large white text that reads hello world"


@dataclass(frozen=True)
class Case:
    """One request of the suite: what differs between cases is what packing has to cope with."""

    name: str
    size: tuple[int, int]  # input image (width, height), not a bucket size: the resize is part of the path
    layers: int
    resolution: int
    steps: int
    cfg: bool
    seed: int

    @property
    def params(self) -> GenerationParams:
        return GenerationParams(layers=self.layers, resolution=self.resolution, num_inference_steps=self.steps,
                                true_cfg_scale=4.0 if self.cfg else 1.0)

    @property
    def negative_prompt(self) -> str | None:
        return " " if self.cfg else None

    def image(self) -> Image.Image:
        return input_image(*self.size, seed=self.seed)

    def png(self) -> bytes:
        buffer = io.BytesIO()
        self.image().save(buffer, format="PNG")
        return buffer.getvalue()

    def request(self, request_id: str | None = None) -> LayeredRequest:
        return LayeredRequest(request_id or self.name, self.image(), self.params, prompt=PROMPT,
                              negative_prompt=self.negative_prompt, seed=self.seed)

    def offline(self, pipeline: LayeredPipeline) -> list[Image.Image]:
        """The layers LayeredPipeline.__call__ gives for this request alone."""
        out = pipeline(self.image(), prompt=PROMPT, negative_prompt=self.negative_prompt,
                       true_cfg_scale=self.params.true_cfg_scale, layers=self.layers, resolution=self.resolution,
                       num_inference_steps=self.steps, seed=self.seed)
        return out.layers


# Different layers, buckets, aspect ratios, step counts and CFG settings: packed together, every GEMM of a step
# has another M than in any request alone, and the requests finish (and decode) at different steps.
CASES = (
    Case("640x2-cfg-3steps", (600, 400), layers=2, resolution=640, steps=3, cfg=True, seed=5),
    Case("1024x1-nocfg-2steps", (700, 700), layers=1, resolution=1024, steps=2, cfg=False, seed=6),
    Case("640x4-cfg-2steps", (300, 500), layers=4, resolution=640, steps=2, cfg=True, seed=7),
)


def input_image(width: int, height: int, seed: int) -> Image.Image:
    """A picture with flat regions, edges and a translucent part (not noise: the VAE sees real structure)."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGBA", (width, height), tuple(int(c) for c in rng.integers(0, 256, 3)) + (255,))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, width - 8)), int(rng.integers(0, height - 8))
        x1, y1 = x0 + int(rng.integers(8, width // 2)), y0 + int(rng.integers(8, height // 2))
        fill = tuple(int(c) for c in rng.integers(0, 256, 4))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=fill)
    return image


def layer_diff(got: list[Image.Image], expected: list[Image.Image]) -> dict[str, float]:
    """|got - expected| over every channel of every layer, in 0..255 units: mean, p99 and max."""
    assert len(got) == len(expected), (len(got), len(expected))
    assert [im.size for im in got] == [im.size for im in expected]
    assert all(im.mode == "RGBA" for im in got)
    diff = np.concatenate([
        np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).ravel() for a, b in zip(got, expected)
    ])
    return {"mean": float(diff.mean()), "p99": float(np.percentile(diff, 99)), "max": float(diff.max())}


def measured(what: str, diff: dict[str, float]) -> dict[str, float]:
    print(f"\n[gpu acceptance] {what}: mean {diff['mean']:.4f} p99 {diff['p99']:.1f} max {diff['max']:.0f} (/255)")
    return diff


def serve(pipeline: LayeredPipeline, requests: list[LayeredRequest], observer=None) -> list[RequestOutput]:
    """Submit ``requests`` at once to an engine over ``pipeline`` (a budget that packs them all) and return their
    outputs in order."""

    async def run() -> list[RequestOutput]:
        engine = ThreadedEngine(pipeline, EngineConfig(token_budget=1 << 16), observer=observer)
        await engine.start()
        try:
            handles = [engine.submit(r) for r in requests]
            return [await h.result() for h in handles]
        finally:
            await engine.shutdown(5)

    return asyncio.run(asyncio.wait_for(run(), 600))


def release_gpu_memory() -> None:
    gc.collect()
    torch.cuda.empty_cache()


@pytest.fixture(scope="module")
def full_pipeline():
    """The released model's size with dummy weights, bf16 on cuda:0 (freed when the module ends)."""
    from vllm_layered.model_executor.model_loader.dummy_checkpoint import full_size_model_folder

    pipeline = LayeredPipeline.from_pretrained(full_size_model_folder(), device="cuda:0", dtype=torch.bfloat16,
                                               load_format="dummy")
    yield pipeline
    del pipeline
    release_gpu_memory()


# What the served path runs: bf16; FP8 GEMMs (--quantization fp8); FP8 GEMMs + FP8 attention (--attention-dtype fp8,
# cuDNN's FP8 kernel: needs the fp8-attention extra, and fails here with the pip command when it is missing).
VARIANTS = ("none", "fp8", "fp8-attention")


def variant_settings(variant: str) -> tuple[str | None, str]:
    """(quantization, attention_dtype) of a variant, as LayeredPipeline.from_pretrained takes them."""
    return {"none": (None, "bf16"), "fp8": ("fp8", "bf16"), "fp8-attention": ("fp8", "fp8")}[variant]


def variant_pipeline(pipeline: LayeredPipeline, variant: str) -> LayeredPipeline:
    """``pipeline`` (bf16) as ``variant``: the FP8 ones share its weights (only the e4m3 copies are new memory)."""
    from benchmarks.common import fp8_pipeline_sharing
    from vllm_layered.model_executor.models.fp8_attention import check_attention_dtype, set_attention_dtype

    quantization, attention_dtype = variant_settings(variant)
    if quantization is None:
        return pipeline
    pipe = fp8_pipeline_sharing(pipeline)
    set_attention_dtype(pipe.transformer, check_attention_dtype(attention_dtype, quantization, pipe.device))
    return pipe
