"""The real `vllm-layered serve` process on the GPU answers over HTTP with the offline pipeline's layers."""

from __future__ import annotations

import base64
import io

import httpx
import pytest
from PIL import Image

from tests.gpu.conftest import CASES, PROMPT, layer_diff, measured, needs_cuda, release_gpu_memory
from tests.serving.helpers import start_server

pytestmark = [pytest.mark.gpu, needs_cuda]
CASE = CASES[0]  # 640 bucket, 2 layers, CFG, 3 steps: the request that showed the stream race


@pytest.fixture(scope="module")
def expected():
    """The offline layers, computed and the pipeline freed before the server takes the GPU."""
    from vllm_layered.model_executor.model_loader.dummy_checkpoint import full_size_model_folder
    from vllm_layered.model_executor.pipeline import LayeredPipeline

    pipeline = LayeredPipeline.from_pretrained(full_size_model_folder(), device="cuda:0", load_format="dummy")
    layers = CASE.offline(pipeline)
    del pipeline
    release_gpu_memory()
    return layers


def test_served_layers_over_http_equal_the_offline_pipeline(expected, tmp_path):
    with start_server(None, tmp_path, "--load-format", "dummy", "--device", "cuda:0") as server:
        form = {"prompt": PROMPT, "negative_prompt": CASE.negative_prompt, "true_cfg_scale": "4",
                "layers": str(CASE.layers), "resolution": str(CASE.resolution),
                "num_inference_steps": str(CASE.steps), "seed": str(CASE.seed)}
        response = httpx.post(f"{server.base_url}/v1/images/edits", data=form,
                              files={"image": ("input.png", CASE.png(), "image/png")}, timeout=600)
        assert response.status_code == 200, response.text
        layers = [Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))) for item in response.json()["data"]]
    diff = measured(f"server over HTTP {CASE.name}", layer_diff(layers, expected))
    assert diff["max"] == 0, diff

