"""``vllm-layered bench serve``: a load generator for POST /v1/images/edits.

Requests arrive as a Poisson process (exponential gaps from a seeded RNG; rate inf sends them all at once),
optionally capped at ``max_concurrency`` in flight, after ``num_warmup`` uncounted requests sent one at a
time. Both backends get the same multipart fields; against vllm-layered the requests stream (stream=true) so
the time to the first progress event and to the first denoising step are measured too, vLLM-Omni has no such
events (reported as absent). Failures (HTTP statuses, error events, exceptions such as a refused connection)
are counted, never raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import platform
import time
from collections import Counter
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from tqdm import tqdm

from vllm_layered.bench.datasets import BenchRequest, load_dataset, parse_layers
from vllm_layered.clients.sse import SSEDecoder

BACKENDS = ("vllm-layered", "vllm-omni")
DEFAULT_PROMPT = "a poster with a title, a photo and a logo on a plain background"  # non-empty: no captioning
CONNECT_TIMEOUT_S = 10.0


@dataclass
class BenchConfig:
    """Every knob of one run; written into the result JSON as given."""

    base_url: str
    backend: str = "vllm-layered"
    dataset: str = "random"
    layers: str = "2-8"
    resolution: int = 640
    steps: int = 50
    request_rate: float = math.inf
    max_concurrency: int | None = None
    num_requests: int = 100
    num_warmup: int = 1
    api_key: str | None = None
    model: str | None = None
    seed: int = 0
    slo: float | None = None
    prompt: str | None = None  # None: DEFAULT_PROMPT
    negative_prompt: str = " "
    true_cfg_scale: float = 4.0
    timeout: float = 3600.0
    disable_tqdm: bool = False

    def __post_init__(self) -> None:
        if self.prompt is None:
            self.prompt = DEFAULT_PROMPT
        if self.backend not in BACKENDS:
            raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.num_requests < 1:
            raise ValueError(f"--num-requests must be at least 1, got {self.num_requests}")
        if self.num_warmup < 0:
            raise ValueError(f"--num-warmup must be at least 0, got {self.num_warmup}")
        if not self.request_rate > 0:
            raise ValueError(f"--request-rate must be positive (or inf), got {self.request_rate}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"--max-concurrency must be at least 1, got {self.max_concurrency}")
        if self.slo is not None and not self.slo > 0:
            raise ValueError(f"--slo must be positive seconds, got {self.slo}")
        parse_layers(self.layers)

    @classmethod
    def from_args(cls, args: Any, **overrides: Any) -> BenchConfig:
        """From an argparse namespace holding (some of) the field names."""
        given = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
        return cls(**{**given, **overrides})

    def to_json(self) -> dict[str, Any]:
        config = asdict(self)
        config["request_rate"] = _rate_text(self.request_rate)
        config["api_key"] = None if self.api_key is None else "<set>"
        return config


@dataclass
class RequestRecord:
    """One request's outcome; times in seconds, ``scheduled_s``/``start_s`` from the start of the run."""

    index: int
    layers: int
    seed: int
    scheduled_s: float
    start_s: float = 0.0
    latency_s: float | None = None
    first_progress_s: float | None = None
    first_step_s: float | None = None
    ok: bool = False
    status: int | None = None
    error: str | None = None
    message: str | None = None
    layers_returned: int = 0

    @property
    def failure_kind(self) -> str:
        """"HTTP 503" for an error status (or error event), else the exception's type name."""
        return f"HTTP {self.status}" if self.status is not None and self.status != 200 else str(self.error)


def _rate_text(rate: float) -> str | float:
    return "inf" if math.isinf(rate) else rate


def arrival_offsets(n: int, rate: float, seed: int) -> list[float]:
    """Send times in seconds from the start: all 0 for an infinite rate, else a Poisson process whose first
    request goes at 0 (exponential gaps of mean 1/rate)."""
    if math.isinf(rate):
        return [0.0] * n
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, n - 1)
    return [0.0, *np.cumsum(gaps).tolist()]


def _form(config: BenchConfig, request: BenchRequest, seed: int) -> dict[str, str]:
    form = {
        "prompt": config.prompt, "layers": str(request.layers), "resolution": str(config.resolution),
        "num_inference_steps": str(config.steps), "true_cfg_scale": str(config.true_cfg_scale),
        "negative_prompt": config.negative_prompt, "seed": str(seed), "response_format": "b64_json",
    }
    if config.model:
        form["model"] = config.model
    if config.backend == "vllm-layered":
        form["stream"] = "true"
    return form


def _error_message(body: bytes) -> str:
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        return str(json.loads(body)["error"]["message"])[:500]
    return body[:500].decode(errors="replace")


def _count_layers(body: dict[str, Any]) -> int:
    return sum(1 for entry in body.get("data") or [] if entry.get("b64_json"))


async def _stream(client: httpx.AsyncClient, record: RequestRecord, form, files, t0: float) -> None:
    """vllm-layered: read the server-sent events, timing the first progress event and the first step."""
    async with client.stream("POST", "/images/edits", data=form, files=files) as response:
        if response.status_code != 200:
            record.status, record.message = response.status_code, _error_message(await response.aread())
            return
        decoder = SSEDecoder()
        async for line in response.aiter_lines():
            if (item := decoder.feed(line)) is None:
                continue
            event, data = item
            now = time.perf_counter() - t0
            if event == "progress":
                if record.first_progress_s is None:
                    record.first_progress_s = now
                if data.get("stage") == "step" and record.first_step_s is None:
                    record.first_step_s = now
            elif event == "error":
                record.status = int(data.get("status") or 500)
                record.message = str((data.get("error") or {}).get("message"))[:500]
                return
            elif event == "result":
                record.status, record.ok, record.layers_returned = 200, True, _count_layers(data)
                return
    record.error, record.message = "IncompleteStream", "the event stream ended without a result"


async def _plain(client: httpx.AsyncClient, record: RequestRecord, form, files) -> None:
    """vllm-omni (or any server without our events): one JSON body."""
    response = await client.post("/images/edits", data=form, files=files)
    record.status = response.status_code
    if response.status_code != 200:
        record.message = _error_message(response.content)
        return
    try:
        body = response.json()
    except ValueError:
        record.error, record.message = "InvalidResponse", response.text[:500]
        return
    record.ok, record.layers_returned = True, _count_layers(body)


async def send_request(client: httpx.AsyncClient, config: BenchConfig, request: BenchRequest,
                       record: RequestRecord, run_start: float) -> RequestRecord:
    """Fill ``record`` with the outcome of one POST; never raises (but for cancellation)."""
    files = {"image": (request.filename, request.image, "application/octet-stream")}
    form = _form(config, request, record.seed)
    t0 = time.perf_counter()
    record.start_s = t0 - run_start
    try:
        if config.backend == "vllm-layered":
            await _stream(client, record, form, files, t0)
        else:
            await _plain(client, record, form, files)
    except Exception as e:  # noqa: BLE001 - a failing server is a measured outcome, not a crash
        record.ok, record.error, record.message = False, type(e).__name__, str(e)[:500]
    record.latency_s = time.perf_counter() - t0
    return record


def _client(config: BenchConfig) -> httpx.AsyncClient:
    base = config.base_url.rstrip("/")
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    return httpx.AsyncClient(
        base_url=base if base.endswith("/v1") else base + "/v1", headers=headers,
        timeout=httpx.Timeout(config.timeout, connect=CONNECT_TIMEOUT_S),
        limits=httpx.Limits(max_connections=config.max_concurrency, max_keepalive_connections=config.max_concurrency),
    )


async def _run(config: BenchConfig, requests: list[BenchRequest]) -> tuple[list[RequestRecord], list[RequestRecord],
                                                                             float]:
    async with _client(config) as client:
        warmup = []
        for i in range(config.num_warmup):  # one at a time, seeds apart from the measured ones
            request = requests[i % len(requests)]
            record = RequestRecord(i, request.layers, config.seed + len(requests) + i, 0.0)
            warmup.append(await send_request(client, config, request, record, time.perf_counter()))
        offsets = arrival_offsets(len(requests), config.request_rate, config.seed)
        gate = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else contextlib.nullcontext()
        bar = tqdm(total=len(requests), desc="requests", unit="req", disable=config.disable_tqdm)
        start = time.perf_counter()

        async def one(i: int, request: BenchRequest) -> RequestRecord:
            await asyncio.sleep(max(0.0, start + offsets[i] - time.perf_counter()))
            async with gate:
                record = RequestRecord(i, request.layers, config.seed + i, offsets[i])
                await send_request(client, config, request, record, start)
            bar.update(1)
            return record

        try:
            records = await asyncio.gather(*(one(i, r) for i, r in enumerate(requests)))
        finally:
            bar.close()
        duration = max(r.start_s + (r.latency_s or 0.0) for r in records)
    return warmup, list(records), duration


def _stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "p50": None, "p95": None, "p99": None}
    arr = np.asarray(values, dtype=float)
    return {"mean": float(arr.mean()), **{f"p{q}": float(np.percentile(arr, q)) for q in (50, 95, 99)}}


def summarize(config: BenchConfig, records: list[RequestRecord], duration: float) -> dict[str, Any]:
    """Counts, throughput, latency percentiles, time to first progress event / step, goodput under the SLO."""
    ok = [r for r in records if r.ok]
    duration = max(duration, 1e-9)
    streamed = config.backend == "vllm-layered"
    summary: dict[str, Any] = {
        "backend": config.backend, "request_rate": _rate_text(config.request_rate),
        "max_concurrency": config.max_concurrency, "num_requests": len(records), "successes": len(ok),
        "failures": len(records) - len(ok),
        "failures_by_kind": dict(sorted(Counter(r.failure_kind for r in records if not r.ok).items())),
        "duration_s": duration, "requests_per_s": len(ok) / duration,
        "layers_per_s": sum(r.layers_returned for r in ok) / duration,
        "latency_s": _stats([r.latency_s for r in ok]),
        "first_progress_s": _stats([r.first_progress_s for r in ok]) if streamed else None,
        "first_step_s": _stats([r.first_step_s for r in ok if r.first_step_s is not None]) if streamed else None,
        "slo_s": config.slo, "goodput_requests_per_s": None, "slo_attainment": None,
    }
    if config.slo is not None:
        met = sum(1 for r in ok if r.latency_s <= config.slo)
        summary["goodput_requests_per_s"] = met / duration
        summary["slo_attainment"] = met / len(records)
    return summary


def run_benchmark(config: BenchConfig) -> dict[str, Any]:
    """One run: {"config", "environment", "summary", "requests", "warmup"} (JSON-ready)."""
    requests = load_dataset(config.dataset, config.num_requests, parse_layers(config.layers), seed=config.seed,
                            image_size=config.resolution)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    warmup, records, duration = asyncio.run(_run(config, requests))
    return {
        "config": config.to_json(),
        "environment": {"started": started, "client_host": platform.node(), "python": platform.python_version()},
        "summary": summarize(config, records, duration),
        "requests": [asdict(r) for r in records],
        "warmup": [asdict(r) for r in warmup],
    }


def _fmt(value: Any, unit: str = "", digits: int = 3) -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}{unit}" if isinstance(value, float) else f"{value}{unit}"


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as a fixed-width table."""
    rows: list[tuple[str, str]] = [
        ("Backend", summary["backend"]),
        ("Request rate (req/s)", _fmt(summary["request_rate"])),
        ("Max concurrency", _fmt(summary["max_concurrency"])),
        ("Successful requests", _fmt(summary["successes"])),
        ("Failed requests", _fmt(summary["failures"])),
    ]
    rows += [(f"  {kind}", str(count)) for kind, count in summary["failures_by_kind"].items()]
    rows += [
        ("Duration (s)", _fmt(summary["duration_s"], digits=2)),
        ("Requests/s", _fmt(summary["requests_per_s"])),
        ("Layers/s", _fmt(summary["layers_per_s"])),
    ]
    for key, title in (("latency_s", "Latency"), ("first_progress_s", "First progress event"),
                       ("first_step_s", "First denoising step")):
        stats = summary[key]
        for stat in ("mean", "p50", "p95", "p99"):
            rows.append((f"{title} {stat} (s)", "absent" if stats is None else _fmt(stats[stat])))
    if summary["slo_s"] is not None:
        rows += [
            (f"Goodput, latency <= {summary['slo_s']:g} s (req/s)", _fmt(summary["goodput_requests_per_s"])),
            ("SLO attainment", _fmt(summary["slo_attainment"])),
        ]
    width = max(len(label) for label, _ in rows) + 2
    line = "=" * (width + 16)
    body = "\n".join(f"{label:<{width}}{value:>16}" for label, value in rows)
    return f"{' Serving benchmark '.center(len(line), '=')}\n{body}\n{line}"


def write_json(result: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def main(args: Any) -> int:
    """The `bench serve` command: run, print the table, write the JSON."""
    config = BenchConfig.from_args(args)
    result = run_benchmark(config)
    print(format_summary(result["summary"]))
    if getattr(args, "result_json", None):
        print(f"wrote {write_json(result, args.result_json)}")
    return 0
