"""/health reports an engine that stopped stepping: the real engine, in-process, told it is stuck at once."""

from __future__ import annotations

from fastapi.testclient import TestClient

from tests.serving.helpers import assert_error
from vllm_layered.model_executor.pipeline import LayeredPipeline
from vllm_layered.serving.api_server import build_app
from vllm_layered.serving.engine.engine import AsyncLayeredEngine, EngineConfig
from vllm_layered.serving.limits import ServerLimits
from vllm_layered.serving.tenants import TenantRegistry


def test_health_is_503_when_the_engine_is_stuck(tiny_checkpoint):
    pipeline = LayeredPipeline.from_pretrained(tiny_checkpoint, device="cpu", load_text_encoder=False)
    engine = AsyncLayeredEngine(pipeline, EngineConfig(stuck_after_s=1e-9, max_waiting=7))
    app = build_app(engine, tenants=TenantRegistry.open(), limits=ServerLimits(), shutdown_grace_s=0.1)
    with TestClient(app) as http:
        assert_error(http.get("/health"), 503, code="engine_unhealthy")
        metrics = http.get("/metrics")
        assert metrics.status_code == 200
        assert "vllm_layered:engine_healthy 0.0" in metrics.text  # what /health says, for alerts
        assert "vllm_layered:max_requests_waiting 7.0" in metrics.text
