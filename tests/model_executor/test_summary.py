"""describe_pipeline: the line the server logs at startup and `decompose` prints after loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vllm_layered.model_executor.pipeline import LayeredPipeline
from vllm_layered.model_executor.summary import describe_pipeline


@pytest.fixture(scope="module")
def pipeline(tiny_checkpoint: Path) -> LayeredPipeline:
    return LayeredPipeline.from_pretrained(tiny_checkpoint, device="cpu", dtype=torch.float32, load_text_encoder=False)


def test_names_model_device_dtype_and_quantization(pipeline: LayeredPipeline, tiny_checkpoint: Path) -> None:
    assert describe_pipeline(pipeline, model=tiny_checkpoint, quantization=None) == f"{tiny_checkpoint} on cpu, float32"
    assert describe_pipeline(pipeline, model="Qwen/Qwen-Image-Layered", quantization="fp8") == (
        "Qwen/Qwen-Image-Layered on cpu, float32, fp8 transformer"
    )
    assert describe_pipeline(pipeline, model="m", quantization="none") == "m on cpu, float32"


def test_the_embedded_model_says_where_it_is_and_what_it_is(
    pipeline: LayeredPipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VLLM_LAYERED_CACHE", str(tmp_path))
    assert describe_pipeline(pipeline, model=None, quantization=None) == (
        f"the embedded tiny random model at {tmp_path / 'tiny-qwen-image-layered'} (its layers are noise) on cpu, "
        "float32"
    )
