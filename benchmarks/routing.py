"""Routing over two replicas: round-robin against least-loaded, p50/p95 latency (CPU, the tiny model).

Starts two real `vllm-layered serve` processes (the embedded tiny model, ``--device cpu``, one thread each)
and sends the same seeded workload once per routing policy: Poisson arrivals, a share of long requests
(many steps) among short ones. Policies:

  round_robin     the replicas in turn (a Kubernetes Service, connection by connection)
  least_requests  the replica with the fewest requests this router has in flight (Envoy's LEAST_REQUEST)
  least_work      the replica whose GET /health reports the least work left, running_work_tokens +
                  waiting_work_tokens (a 30-step request weighs fifteen 2-step ones)

    python benchmarks/routing.py [--policies round_robin,least_work] [--requests 16] [--load 0.6 | --rate R]
                                 [--long-steps 16] [--short-steps 2] [--long-share 0.3] [--seed 0]

--load sets the arrival rate to that fraction of the two replicas' capacity, from one long and one short
request timed alone on a replica just before (a shared CPU's speed changes with what else runs on it).
Latency is measured by the client, arrival to response; compare policies within one run.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vllm_layered.bench.serve import arrival_offsets  # noqa: E402

POLICIES = ("round_robin", "least_requests", "least_work")


@contextmanager
def replica(port: int, log_dir: Path):
    """`vllm-layered serve` on loopback with one CPU thread, until the block ends."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "vllm_layered.cli", "serve", "--port", str(port), "--device", "cpu",
               "--log-level", "warning", "--no-access-log", "--shutdown-grace", "1"]
    with open(log_dir / f"replica-{port}.log", "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"replica on port {port} exited; see {log_dir}/replica-{port}.log")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"replica on port {port} did not start")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=60)


class Router:
    """Picks a replica per request; counts what it has in flight on each."""

    def __init__(self, urls: list[str], policy: str) -> None:
        self.urls, self.policy = urls, policy
        self.in_flight = [0] * len(urls)
        self.sent = [0] * len(urls)
        self._next = 0
        self._lock = threading.Lock()

    def pick(self) -> int:
        if self.policy == "least_work":
            loads = [self._work_left(url) for url in self.urls]
        with self._lock:
            if self.policy == "round_robin":
                index, self._next = self._next, (self._next + 1) % len(self.urls)
            elif self.policy == "least_requests":
                index = min(range(len(self.urls)), key=lambda i: (self.in_flight[i], i))
            else:
                index = min(range(len(self.urls)), key=lambda i: (loads[i], self.in_flight[i], i))
            self.in_flight[index] += 1
            self.sent[index] += 1
        return index

    def done(self, index: int) -> None:
        with self._lock:
            self.in_flight[index] -= 1

    @staticmethod
    def _work_left(url: str) -> int:
        health = httpx.get(f"{url}/health", timeout=5).json()
        return health["running_work_tokens"] + health["waiting_work_tokens"]


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGBA", (64, 48), (30, 90, 200, 255)).save(buffer, format="PNG")
    return buffer.getvalue()


def send(url: str, steps: int, image: bytes) -> None:
    form = {"prompt": "x", "layers": "1", "num_inference_steps": str(steps), "true_cfg_scale": "1"}
    response = httpx.post(f"{url}/v1/images/edits", data=form, files={"image": ("in.png", image, "image/png")},
                          timeout=900)
    response.raise_for_status()


def timed(url: str, steps: int) -> float:
    start = time.monotonic()
    send(url, steps, png())
    return time.monotonic() - start


def run_policy(urls: list[str], policy: str, workload: list[int], offsets: list[float]) -> dict:
    router, image = Router(urls, policy), png()
    latencies: list[tuple[int, float]] = []

    def one(steps: int, arrival: float) -> None:
        index = router.pick()
        try:
            send(urls[index], steps, image)
        finally:
            router.done(index)
        latencies.append((steps, time.monotonic() - arrival))

    start = time.monotonic()
    with ThreadPoolExecutor(len(workload)) as pool:
        for steps, offset in zip(workload, offsets):
            time.sleep(max(0.0, start + offset - time.monotonic()))
            pool.submit(one, steps, time.monotonic())
    return {"policy": policy, "seconds": round(time.monotonic() - start, 1), "per_replica": router.sent,
            **summary("all", [t for _, t in latencies]),
            **summary("short", [t for s, t in latencies if s == min(workload)])}


def summary(name: str, values: list[float]) -> dict:
    if not values:
        return {}
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {f"{name}_p50_s": round(statistics.median(ordered), 2), f"{name}_p95_s": round(p95, 2),
            f"{name}_mean_s": round(statistics.fmean(ordered), 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policies", default="round_robin,least_work")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--load", type=float, default=0.6, help="arrival rate as a fraction of capacity")
    parser.add_argument("--rate", type=float, default=None, help="Poisson arrivals per second (instead of --load)")
    parser.add_argument("--long-steps", type=int, default=16)
    parser.add_argument("--short-steps", type=int, default=2)
    parser.add_argument("--long-share", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-dir", type=Path, default=Path("/tmp"))
    args = parser.parse_args()
    policies = args.policies.split(",")
    unknown = set(policies) - set(POLICIES)
    if unknown:
        parser.error(f"unknown policies {sorted(unknown)}; choose from {', '.join(POLICIES)}")
    rng = np.random.default_rng(args.seed)
    workload = [args.long_steps if rng.random() < args.long_share else args.short_steps for _ in range(args.requests)]
    ports = [int(p) for p in os.environ.get("ROUTING_PORTS", "8941,8942").split(",")]
    with ExitStack() as stack:
        urls = [stack.enter_context(replica(port, args.log_dir)) for port in ports]
        for url in urls:  # warm-up: the first request of a process pays one-time costs
            send(url, args.short_steps, png())
        alone = {steps: timed(urls[0], steps) for steps in (args.long_steps, args.short_steps)}
        service_s = statistics.fmean(alone[steps] for steps in workload)
        rate = args.rate or args.load * len(urls) / service_s
        print(f"workload: {workload.count(args.long_steps)} x {args.long_steps} steps and "
              f"{workload.count(args.short_steps)} x {args.short_steps} steps; alone "
              + ", ".join(f"{steps} steps {t:.1f} s" for steps, t in alone.items())
              + f"; {rate:.3f} req/s over {len(urls)} replicas", flush=True)
        offsets = arrival_offsets(args.requests, rate, args.seed)
        for policy in policies:
            print(json.dumps(run_policy(urls, policy, workload, offsets)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
