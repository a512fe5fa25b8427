"""Fixtures of the deployment tests."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tests.deploy.helpers import exported_series
from tests.serving.helpers import png_bytes
from vllm_layered.model_executor.pipeline import LayeredPipeline
from vllm_layered.serving.api_server import build_app
from vllm_layered.serving.engine.engine import EngineConfig, ThreadedEngine
from vllm_layered.serving.limits import ServerLimits
from vllm_layered.serving.metrics import ServingMetrics
from vllm_layered.serving.tenants import TenantRegistry


@pytest.fixture(scope="session")
def server_series(tiny_checkpoint) -> dict[str, str]:
    """The series of the real server's GET /metrics after one real image request: the app in-process on the
    tiny model, its ServingMetrics wired as the engine's observer the way `vllm-layered serve` does."""
    pipeline = LayeredPipeline.from_pretrained(tiny_checkpoint, device="cpu")
    metrics = ServingMetrics()
    engine = ThreadedEngine(pipeline, EngineConfig(), observer=metrics)
    app = build_app(engine, tenants=TenantRegistry.open(), limits=ServerLimits(), metrics=metrics,
                    shutdown_grace_s=0.1)
    with TestClient(app) as http:
        response = http.post(
            "/v1/images/edits",
            data={"prompt": "a red ball", "layers": "1", "num_inference_steps": "1", "true_cfg_scale": "1"},
            files={"image": ("input.png", png_bytes(), "image/png")},
        )
        assert response.status_code == 200, response.text
        exposition = http.get("/metrics").text
    assert metrics.registry.get_sample_value("vllm_layered:denoising_steps_total") >= 1  # the engine reported
    return exported_series(exposition)
