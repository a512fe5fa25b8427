"""``vllm-layered bench sweep``: `bench serve` at several request rates, one after another, and a plot of
throughput (req/s) against p95 latency."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from vllm_layered.bench.serve import BenchConfig, format_summary, run_benchmark, write_json


def parse_rates(spec: str) -> list[float]:
    """"0.05,0.1,inf" -> [0.05, 0.1, inf]."""
    try:
        rates = [float(part) for part in spec.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--rates must be comma-separated numbers or inf, got {spec!r}") from None
    if not rates or any(not r > 0 for r in rates):
        raise ValueError(f"--rates must be positive numbers or inf, got {spec!r}")
    return rates


def run_sweep(config: BenchConfig, rates: list[float]) -> dict[str, Any]:
    """One `bench serve` run per rate; the warm-up requests go before the first run only."""
    runs = []
    for i, rate in enumerate(rates):
        runs.append(run_benchmark(BenchConfig(**{**config.__dict__, "request_rate": rate,
                                                 "num_warmup": config.num_warmup if i == 0 else 0})))
    return {"config": {**config.to_json(), "rates": ["inf" if math.isinf(r) else r for r in rates]}, "runs": runs}


def plot(result: dict[str, Any], path: str | Path) -> Path:
    """Throughput against p95 latency, one point per rate (labelled with the offered rate)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(run["summary"]["requests_per_s"], run["summary"]["latency_s"]["p95"], run["summary"]["request_rate"])
              for run in result["runs"] if run["summary"]["latency_s"]["p95"] is not None]
    config = result["config"]
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    if points:
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o")
        for throughput, p95, rate in points:
            ax.annotate(f"rate {rate}", (throughput, p95), textcoords="offset points", xytext=(5, 5), fontsize=8)
    else:
        ax.text(0.5, 0.5, "no successful requests", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("throughput (requests/s)")
    ax.set_ylabel("p95 latency (s)")
    ax.set_title(f"{config['backend']}: {config['resolution']}px, layers {config['layers']}, {config['steps']} steps",
                 fontsize=10)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def main(args: Any) -> int:
    """The `bench sweep` command: run every rate, print each table, write the plot and the JSON."""
    result = run_sweep(BenchConfig.from_args(args), parse_rates(args.rates))
    for run in result["runs"]:
        print(format_summary(run["summary"]))
    if args.plot:
        print(f"wrote {plot(result, args.plot)}")
    if args.result_json:
        print(f"wrote {write_json(result, args.result_json)}")
    return 0
