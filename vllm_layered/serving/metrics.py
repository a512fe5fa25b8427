"""Prometheus metrics of the server, vLLM-style names under ``vllm_layered:``, in their own registry.

Two levels, counted separately:

- Engine level, one count per decomposition (an n=3 API request is 3), from the EngineObserver hooks:
  ``request_success_total{tenant}``, ``request_failure_total{tenant,reason}`` (reason: cancelled,
  deadline, error, and overloaded / shutting_down / unhealthy for requests the engine refused), latency, queue
  time, step time, layers per request, denoised tokens, running / waiting gauges, and
  ``engine_healthy`` (1/0, read at scrape time from the engine's heartbeat, as /health) and
  ``max_requests_waiting`` (the queue bound, so dashboards and alerts can show how full the queue is).
- API level, one count per HTTP image request: ``api_requests_total{tenant,endpoint,status}``, where
  status is the HTTP status the request ended with (for a stream: the status its final event
  carries; 499 when the client went away), and ``api_rejections_total{tenant,reason}`` for requests
  refused before reaching the engine (unauthorized, rate_limited, concurrency_limited,
  invalid_request, too_large, model_not_found, overloaded). A load generator's own counts of
  successes and failures match ``api_requests_total`` with status 200 and the other statuses.

Calls without a valid key are counted under tenant "unauthenticated".

Load, for routers (read at scrape time): ``running_work_tokens`` and ``waiting_work_tokens``, the work left
in the admitted and the waiting decompositions in token-forwards (tokens of one forward x steps left).
Tenants (serving/tenant_store.py): ``tenant_limit{tenant,limit}`` (max_concurrency, requests_per_minute: the
limits in force, cluster-wide with ``--tenant-store``, else per replica), ``tenant_store_up{store}`` (1/0,
only with ``--tenant-store``), ``tenant_store_errors_total{operation}`` and
``tenant_settings_reloads_total{source,outcome}``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from vllm_layered.serving.engine.observer import EngineObserver

PREFIX = "vllm_layered:"
UNAUTHENTICATED = "unauthenticated"

_LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 15, 20, 30, 45, 60, 90, 120, 180, 300, 600)
_QUEUE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
_STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10)
_LAYER_BUCKETS = tuple(range(1, 21))
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


class ServingMetrics(EngineObserver):
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.e2e_latency = Histogram(
            PREFIX + "e2e_request_latency_seconds",
            "Arrival to last layer decoded, successful decompositions.",
            ["tenant"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.queue_time = Histogram(
            PREFIX + "request_queue_time_seconds", "Time spent in the waiting queue.",
            ["tenant"], buckets=_QUEUE_BUCKETS, registry=r,
        )
        self.step_time = Histogram(
            PREFIX + "step_time_seconds", "Duration of one packed denoising step (all requests in it).",
            buckets=_STEP_BUCKETS, registry=r,
        )
        self.step_batch = Histogram(
            PREFIX + "step_batch_size", "Requests packed into one denoising step.",
            buckets=_BATCH_BUCKETS, registry=r,
        )
        self.layers = Histogram(
            PREFIX + "layers_per_request", "Layers of each successful decomposition.",
            ["tenant"], buckets=_LAYER_BUCKETS, registry=r,
        )
        self.running = Gauge(
            PREFIX + "num_requests_running", "Decompositions preprocessing, denoising or decoding.", registry=r
        )
        self.waiting = Gauge(PREFIX + "num_requests_waiting", "Decompositions in the waiting queue.", registry=r)
        self.success = Counter(
            PREFIX + "request_success_total", "Decompositions finished successfully.", ["tenant"], registry=r
        )
        self.failure = Counter(
            PREFIX + "request_failure_total", "Decompositions that failed or were refused by the engine.",
            ["tenant", "reason"], registry=r,
        )
        self.tokens = Counter(
            PREFIX + "denoised_tokens_total",
            "Tokens (text + image, all CFG branches) through the transformer; its rate is tokens/s.",
            registry=r,
        )
        self.steps = Counter(PREFIX + "denoising_steps_total", "Packed denoising steps run.", registry=r)
        self.api_requests = Counter(
            PREFIX + "api_requests_total", "Image API requests by the HTTP status they ended with.",
            ["tenant", "endpoint", "status"], registry=r,
        )
        self.api_rejections = Counter(
            PREFIX + "api_rejections_total", "Image API requests refused before reaching the engine.",
            ["tenant", "reason"], registry=r,
        )
        self.api_in_progress = Gauge(
            PREFIX + "api_requests_in_progress", "Image API requests in flight.", ["tenant"], registry=r
        )
        self.queue_capacity = Gauge(
            PREFIX + "max_requests_waiting", "Waiting-queue bound (--max-queue): beyond it requests get 503.",
            registry=r,
        )
        self.healthy = Gauge(
            PREFIX + "engine_healthy",
            "1 while the engine is alive and stepping, 0 when it failed, died or is stuck (what GET /health says).",
            registry=r,
        )
        self.running_work = Gauge(
            PREFIX + "running_work_tokens",
            "Work left in the admitted decompositions, in token-forwards (tokens of one forward x steps left).",
            registry=r,
        )
        self.waiting_work = Gauge(
            PREFIX + "waiting_work_tokens", "Work of the waiting decompositions, in token-forwards.", registry=r
        )
        self.tenant_store_up = Gauge(
            PREFIX + "tenant_store_up",
            "1 while the shared tenant store (--tenant-store) answers, 0 while it is unreachable.",
            ["store"], registry=r,
        )
        self.tenant_store_errors = Counter(
            PREFIX + "tenant_store_errors_total", "Failed calls to the shared tenant store.", ["operation"],
            registry=r,
        )
        self.tenant_limit = Gauge(
            PREFIX + "tenant_limit",
            "The tenants' limits in force (keys file / tenant store): max_concurrency and requests_per_minute.",
            ["tenant", "limit"], registry=r,
        )
        self.tenant_settings_reloads = Counter(
            PREFIX + "tenant_settings_reloads_total",
            "Tenant settings read while serving, from the keys file or the shared store: applied or invalid.",
            ["source", "outcome"], registry=r,
        )
        r.register(_GpuMemoryCollector())

    def watch_engine(self, probe: Callable[[], bool], max_waiting: int) -> None:
        """Read ``engine_healthy`` from ``probe`` at every scrape; export the queue bound."""
        self.healthy.set_function(lambda: float(probe()))
        self.queue_capacity.set(max_waiting)

    def export_tenant_limits(self, limits: dict[str, dict[str, float | None]]) -> None:
        """``tenant_limit{tenant,limit}`` for the limits in force ({tenant: {limit: value or None}}); the
        series of tenants or limits no longer there disappear."""
        self.tenant_limit.clear()
        for tenant, values in limits.items():
            for limit, value in values.items():
                if value is not None:
                    self.tenant_limit.labels(tenant, limit).set(value)

    def watch_load(self, probe: Callable[[], tuple[int, int]]) -> None:
        """Read ``running_work_tokens`` and ``waiting_work_tokens`` from ``probe`` at every scrape."""
        self.running_work.set_function(lambda: float(probe()[0]))
        self.waiting_work.set_function(lambda: float(probe()[1]))

    # -- engine hooks ---------------------------------------------------------------------------

    def on_request_rejected(self, tenant: str, reason: str) -> None:
        self.failure.labels(tenant, reason).inc()

    def on_request_started(self, tenant: str, queue_time_s: float) -> None:
        self.queue_time.labels(tenant).observe(queue_time_s)

    def on_step(self, step_time_s: float, num_requests: int, num_tokens: int) -> None:
        self.step_time.observe(step_time_s)
        self.step_batch.observe(num_requests)
        self.tokens.inc(num_tokens)
        self.steps.inc()

    def on_request_finished(self, tenant: str, outcome: str, e2e_time_s: float, layers: int, num_steps: int) -> None:
        if outcome == "success":
            self.success.labels(tenant).inc()
            self.e2e_latency.labels(tenant).observe(e2e_time_s)
            self.layers.labels(tenant).observe(layers)
        else:
            self.failure.labels(tenant, outcome).inc()

    def on_queue_state(self, num_running: int, num_waiting: int) -> None:
        self.running.set(num_running)
        self.waiting.set(num_waiting)

    # -- API level ------------------------------------------------------------------------------

    def record_api_request(self, tenant: str, endpoint: str, status: int) -> None:
        self.api_requests.labels(tenant, endpoint, str(status)).inc()

    def record_rejection(self, tenant: str, reason: str) -> None:
        self.api_rejections.labels(tenant, reason).inc()

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _GpuMemoryCollector(Collector):
    """``gpu_memory_bytes{device,kind}``: torch's allocated and reserved bytes per GPU, read at scrape
    time. Without CUDA (or before torch is imported) the family has no samples."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            PREFIX + "gpu_memory_bytes", "GPU memory held by this process's tensors.", labels=["device", "kind"]
        )
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            for index in range(torch.cuda.device_count()):
                device = f"cuda:{index}"
                family.add_metric([device, "allocated"], torch.cuda.memory_allocated(index))
                family.add_metric([device, "reserved"], torch.cuda.memory_reserved(index))
        yield family
