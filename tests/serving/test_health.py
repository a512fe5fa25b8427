"""/health reports an engine that stopped stepping (the real engine, in-process, told it is stuck at once) or
that failed."""

from __future__ import annotations

from fastapi.testclient import TestClient

from tests.serving.helpers import assert_error, wait_until
from vllm_layered.model_executor.pipeline import LayeredPipeline
from vllm_layered.serving.api_server import build_app
from vllm_layered.serving.engine.engine import EngineConfig, ThreadedEngine
from vllm_layered.serving.engine.observer import EngineObserver
from vllm_layered.serving.limits import ServerLimits
from vllm_layered.serving.metrics import ServingMetrics
from vllm_layered.serving.tenants import TenantRegistry


def test_health_is_503_when_the_engine_is_stuck(tiny_checkpoint):
    pipeline = LayeredPipeline.from_pretrained(tiny_checkpoint, device="cpu", load_text_encoder=False)
    engine = ThreadedEngine(pipeline, EngineConfig(stuck_after_s=1e-9, max_waiting=7))
    app = build_app(engine, tenants=TenantRegistry.open(), limits=ServerLimits(), shutdown_grace_s=0.1)
    with TestClient(app) as http:
        assert_error(http.get("/health"), 503, code="engine_unhealthy")
        metrics = http.get("/metrics")
        assert metrics.status_code == 200
        assert "vllm_layered:engine_healthy 0.0" in metrics.text  # what /health says, for alerts
        assert "vllm_layered:max_requests_waiting 7.0" in metrics.text


class BrokenObserver(EngineObserver):
    def on_queue_state(self, num_running: int, num_waiting: int) -> None:
        raise RuntimeError("observer bug")


def test_health_is_503_once_the_engine_failed(tiny_checkpoint):
    """The step thread dies at its first admission pass (the observer it reports to raises): the engine has
    failed for good, and /health and engine_healthy say so."""
    pipeline = LayeredPipeline.from_pretrained(tiny_checkpoint, device="cpu", load_text_encoder=False)
    engine = ThreadedEngine(pipeline, EngineConfig(), observer=BrokenObserver())
    app = build_app(engine, tenants=TenantRegistry.open(), limits=ServerLimits(), metrics=ServingMetrics(),
                    shutdown_grace_s=0.1)
    with TestClient(app) as http:
        wait_until(lambda: not engine._thread.is_alive(), 30, "the step thread to die")
        assert_error(http.get("/health"), 503, code="engine_unhealthy")
        assert "vllm_layered:engine_healthy 0.0" in http.get("/metrics").text
