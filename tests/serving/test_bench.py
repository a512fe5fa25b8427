"""`vllm-layered bench serve|sweep` (vllm_layered.bench) against a real server process with the tiny model.

Every request is the cheapest there is (1-2 layers, 1 step, no CFG: ~4 s each on a CPU core); the counts
the tool reports are checked against the server's own /metrics.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image

from tests.serving.helpers import png_bytes, start_server
from vllm_layered.bench.datasets import load_dataset, parse_layers
from vllm_layered.bench.serve import BenchConfig, arrival_offsets, format_summary, run_benchmark

CHEAP = dict(layers="1-2", steps=1, true_cfg_scale=1.0, disable_tqdm=True)
API_REQUESTS = "vllm_layered:api_requests_total"


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    with start_server(tiny_checkpoint, tmp_path_factory.mktemp("logs"), "--max-running", "4") as server:
        yield server


def api_requests(server, status: int) -> float:
    return server.sample(API_REQUESTS, tenant="default", endpoint="edits", status=str(status))


def test_fixed_rate_counts_match_the_server_metrics(server):
    before = api_requests(server, 200)
    result = run_benchmark(BenchConfig(server.base_url, num_requests=3, num_warmup=1, request_rate=2.0, seed=3,
                                       slo=600.0, **CHEAP))
    summary = result["summary"]
    assert (summary["successes"], summary["failures"], summary["failures_by_kind"]) == (3, 0, {})
    assert api_requests(server, 200) - before == 3 + 1  # the warm-up request reached the server, uncounted
    assert len(result["warmup"]) == 1 and result["warmup"][0]["ok"]

    records = result["requests"]
    assert [r["scheduled_s"] for r in records] == pytest.approx(arrival_offsets(3, 2.0, seed=3))
    assert all(r["start_s"] >= r["scheduled_s"] for r in records)
    assert [r["layers_returned"] for r in records] == [r["layers"] for r in records]
    assert all(r["first_progress_s"] <= r["first_step_s"] <= r["latency_s"] for r in records)
    assert summary["layers_per_s"] == pytest.approx(sum(r["layers"] for r in records) / summary["duration_s"])
    assert summary["latency_s"]["p50"] <= summary["latency_s"]["p95"] <= summary["latency_s"]["p99"]
    assert summary["goodput_requests_per_s"] == pytest.approx(summary["requests_per_s"])  # generous SLO: all met
    assert result["config"]["request_rate"] == 2.0 and result["config"]["num_requests"] == 3
    json.dumps(result, allow_nan=False)  # strict JSON
    assert "Successful requests" in format_summary(summary)


def test_max_concurrency_caps_requests_in_flight(server):
    before = api_requests(server, 200)
    result = run_benchmark(BenchConfig(server.base_url, num_requests=3, num_warmup=0, max_concurrency=2, seed=1,
                                       slo=1e-3, **{**CHEAP, "layers": "1"}))
    summary = result["summary"]
    assert summary["successes"] == 3 and summary["request_rate"] == "inf"
    assert api_requests(server, 200) - before == 3
    spans = [(r["start_s"], r["start_s"] + r["latency_s"]) for r in result["requests"]]
    most_in_flight = max(sum(s <= t < e for s, e in spans) for t, _ in spans)
    assert most_in_flight == 2
    assert summary["goodput_requests_per_s"] == 0.0 and summary["slo_attainment"] == 0.0


def test_server_errors_are_failures_not_a_crash(server):
    before = api_requests(server, 400)
    result = run_benchmark(BenchConfig(server.base_url, num_requests=3, num_warmup=0, layers="0", seed=2,
                                       disable_tqdm=True))
    summary = result["summary"]
    assert (summary["successes"], summary["failures"]) == (0, 3)
    assert summary["failures_by_kind"] == {"HTTP 400": 3}
    assert api_requests(server, 400) - before == 3
    assert all("layers" in r["message"] for r in result["requests"])
    assert summary["latency_s"]["p95"] is None and "n/a" in format_summary(summary)


def test_nothing_listening_is_failures_not_a_crash(tmp_path):
    out = tmp_path / "dead.json"
    command = [sys.executable, "-m", "vllm_layered.cli", "bench", "serve", "--base-url", "http://127.0.0.1:9",
               "--num-requests", "4", "--request-rate", "50", "--backend", "vllm-omni", "--result-json", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    summary = json.loads(out.read_text())["summary"]
    assert (summary["successes"], summary["failures"]) == (0, 4)
    assert summary["failures_by_kind"] == {"ConnectError": 4}
    assert summary["first_progress_s"] is None  # vLLM-Omni has no progress events
    assert "ConnectError" in done.stdout and "absent" in done.stdout


def test_sweep_writes_a_plot_and_json(server, tmp_path):
    plot, out = tmp_path / "sweep.png", tmp_path / "sweep.json"
    command = [sys.executable, "-m", "vllm_layered.cli", "bench", "sweep", "--base-url", server.base_url,
               "--rates", "4,inf", "--num-requests", "2", "--num-warmup", "0", "--layers", "1", "--steps", "1",
               "--true-cfg-scale", "1", "--disable-tqdm", "--plot", str(plot), "--result-json", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert result["config"]["rates"] == [4.0, "inf"]
    assert [run["summary"]["request_rate"] for run in result["runs"]] == [4.0, "inf"]
    assert all(run["summary"]["successes"] == 2 for run in result["runs"])
    with Image.open(plot) as image:
        assert image.format == "PNG" and image.width > 100


def test_datasets(tmp_path):
    assert parse_layers("4") == (4, 4) and parse_layers("2-8") == (2, 8)
    for bad in ("x", "5-2", "-1"):
        with pytest.raises(ValueError, match="--layers"):
            parse_layers(bad)
    first = load_dataset("random", 20, (2, 8), seed=5, image_size=96)
    assert first == load_dataset("random", 20, (2, 8), seed=5, image_size=96)  # seeded
    assert {r.layers for r in first} <= set(range(2, 9)) and len({r.layers for r in first}) > 1
    assert len({r.image for r in first}) > 1
    (tmp_path / "b.png").write_bytes(png_bytes(32, 24))
    (tmp_path / "a.png").write_bytes(png_bytes(24, 32))
    (tmp_path / "notes.txt").write_text("not an image")
    folder = load_dataset(str(tmp_path), 3, (1, 1))
    assert [r.filename for r in folder] == ["a.png", "b.png", "a.png"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        load_dataset(str(tmp_path / "empty"), 1, (1, 1))
    with pytest.raises(ValueError, match="--dataset"):
        load_dataset(str(tmp_path / "missing"), 1, (1, 1))
