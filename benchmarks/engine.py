"""In-process serving benchmark on one GPU (random full-size bf16 weights), Poisson arrivals.

Mixed workload: layers uniform in 2..8 at 640, CFG, the same requests for every system:
  (a) our engine with step-level batching,
  (b) the same engine one request at a time (max_running=1),
  (c) diffusers' QwenImageLayeredPipeline one request at a time (FIFO, sharing the same weights, bf16).
Reports throughput and p50/p95 latency at saturation and at a Poisson rate below it. ``--quantization fp8``
runs (a) and (b) with the FP8 transformer (still against bf16 diffusers). Each row prints as it finishes.

    python benchmarks/engine.py [--requests 8] [--steps 50] [--load 0.7 | 0] [--quantization none|fp8]
                                [--rate R --no-saturation] [--systems a,b,c]   (e.g. the Poisson rows alone)
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import diffusers_transformer_sharing, fp8_pipeline_sharing, write_results  # noqa: E402
from benchmarks.pipeline_step import CAPTION, random_pipeline  # noqa: E402
from vllm_layered.model_executor.models.fp8_linear import QUANTIZATIONS  # noqa: E402
from vllm_layered.model_executor.pipeline import GenerationParams  # noqa: E402
from vllm_layered.serving.engine.engine import EngineConfig, ThreadedEngine  # noqa: E402
from vllm_layered.serving.engine.request import LayeredRequest  # noqa: E402
from vllm_layered.serving.engine.scheduler import STEP_ORDERS  # noqa: E402


def workload(n: int, steps: int, seed: int = 0) -> list[tuple[Image.Image, int]]:
    rng = np.random.default_rng(seed)
    return [
        (Image.fromarray(rng.integers(0, 256, (640, 640, 4), dtype=np.uint8), "RGBA"), int(rng.integers(2, 9)))
        for _ in range(n)
    ]


def arrivals(n: int, rate: float | None, seed: int = 1) -> list[float]:
    """Arrival offsets in seconds: all at 0 for rate None (saturation), else a Poisson process."""
    if rate is None:
        return [0.0] * n
    gaps = np.random.default_rng(seed).exponential(1 / rate, n)
    return list(np.cumsum(gaps) - gaps[0])


def summarize(name: str, latencies: list[float], makespan: float, layers: list[int]) -> dict:
    lat = sorted(latencies)
    return dict(
        system=name, requests=len(lat), makespan_s=makespan, req_per_s=len(lat) / makespan,
        layers_per_s=sum(layers) / makespan, p50_s=statistics.median(lat),
        p95_s=lat[min(len(lat) - 1, int(round(0.95 * (len(lat) - 1))))], mean_s=statistics.fmean(lat),
    )


async def run_engine(
    pipe, work, offsets, steps: int, max_running: int, step_order: str = "srpt"
) -> tuple[list[float], float]:
    engine = ThreadedEngine(pipe, EngineConfig(max_running=max_running, step_order=step_order))
    await engine.start()
    start = time.perf_counter()

    async def one(i: int, image: Image.Image, layers: int) -> float:
        await asyncio.sleep(max(0.0, start + offsets[i] - time.perf_counter()))
        submitted = time.perf_counter()
        params = GenerationParams(layers=layers, num_inference_steps=steps)
        handle = engine.submit(LayeredRequest(f"r{i}", image, params, prompt=CAPTION, seed=i))
        await handle.result()
        return time.perf_counter() - submitted

    latencies = await asyncio.gather(*(one(i, im, n) for i, (im, n) in enumerate(work)))
    makespan = time.perf_counter() - start
    await engine.shutdown(5)
    return list(latencies), makespan


def run_diffusers(ref, pipe, work, offsets, steps: int) -> tuple[list[float], float]:
    """One request at a time in arrival order (a FIFO worker), as a diffusers deployment serves."""
    start = time.perf_counter()
    latencies = []
    for i, (image, layers) in enumerate(work):
        arrival = start + offsets[i]
        time.sleep(max(0.0, arrival - time.perf_counter()))
        cond, neg, _ = pipe.encode_prompts(image, CAPTION, " ", GenerationParams(layers=layers))
        ref(image, prompt=CAPTION, prompt_embeds=cond[None], negative_prompt_embeds=neg[None], true_cfg_scale=4.0,
            layers=layers, resolution=640, num_inference_steps=steps, cfg_normalize=True,
            generator=torch.Generator("cuda").manual_seed(i))
        torch.cuda.synchronize()
        latencies.append(time.perf_counter() - arrival)
    return latencies, time.perf_counter() - start


def diffusers_pipeline(pipe):
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageLayeredPipeline

    from benchmarks.common import full_size_vae_config

    with torch.device("cuda"):
        vae = AutoencoderKLQwenImage(**full_size_vae_config()).to(torch.bfloat16)
    cfg = pipe.noise_schedule_config
    ref = QwenImageLayeredPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=cfg.use_dynamic_shifting,
                                                  time_shift_type=cfg.time_shift_type),
        vae=vae, text_encoder=pipe.prompt_encoder.model, tokenizer=pipe.prompt_encoder.tokenizer, processor=None,
        transformer=diffusers_transformer_sharing(pipe.transformer),
    )
    ref.set_progress_bar_config(disable=True)
    return ref


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--load", type=float, default=0.7,
                        help="Poisson rate as a fraction of (b)'s capacity (0: saturation only)")
    parser.add_argument("--rate", type=float, default=None,
                        help="Poisson rate in req/s (default: --load x (b)'s measured saturation throughput)")
    parser.add_argument("--no-saturation", action="store_true", help="skip the saturation rows (needs --rate)")
    parser.add_argument("--systems", default="a,b,c", help="which of (a), (b), (c) to run, comma separated")
    parser.add_argument("--step-order", default="srpt", choices=STEP_ORDERS, help="(a)'s step order")
    parser.add_argument("--quantization", choices=QUANTIZATIONS, default="none",
                        help="the transformer of (a) and (b); (c) stays bf16")
    args = parser.parse_args()
    systems = set(args.systems.split(","))
    if args.rate is None and args.load > 0 and (args.no_saturation or "b" not in systems):
        parser.error("without --rate the Poisson rate comes from (b)'s saturation row: run (b) at saturation")

    pipe = random_pipeline()
    ours = fp8_pipeline_sharing(pipe) if args.quantization == "fp8" else pipe
    work = workload(args.requests, args.steps)
    layers = [n for _, n in work]
    warm = workload(1, 2, seed=9)
    asyncio.run(run_engine(ours, warm, [0.0], 2, 4))  # warm-up: kernels, autotuning, allocator
    torch.cuda.reset_peak_memory_stats()
    rows = []

    def record(name: str, latencies: list[float], makespan: float) -> None:
        rows.append(summarize(name, latencies, makespan, layers))
        print(rows[-1], flush=True)

    engines = [(name, max_running) for key, name, max_running in (
        ("a", f"(a) engine, batched, {args.step_order}", 32), ("b", "(b) engine, one at a time", 1)) if key in systems]
    sat = arrivals(args.requests, None)
    for name, max_running in () if args.no_saturation else engines:
        record(f"{name}, saturation",
               *asyncio.run(run_engine(ours, work, sat, args.steps, max_running, args.step_order)))
    if args.rate or args.load > 0:
        rate = args.rate or args.load * next(r for r in rows if r["system"].startswith("(b)"))["req_per_s"]
        poisson = arrivals(args.requests, rate)
        print(f"Poisson arrivals at {[round(t, 1) for t in poisson]} s", flush=True)
        for name, max_running in engines:
            record(f"{name}, Poisson {rate:.3f} req/s",
                   *asyncio.run(run_engine(ours, work, poisson, args.steps, max_running, args.step_order)))
    if "c" in systems:
        ref = diffusers_pipeline(pipe)
        with torch.no_grad():
            record("(c) diffusers, one at a time, saturation", *run_diffusers(ref, pipe, work, sat, args.steps))
    peak = torch.cuda.max_memory_allocated() / 1e9
    write_results("engine.json", {"args": vars(args), "layers": layers, "rows": rows, "peak_gb": peak,
                                  "device": torch.cuda.get_device_name(), "threads": threading.active_count()})
    print(f"\n{args.requests} requests, layers {layers}, 640, {args.steps} steps, CFG, ours {args.quantization}, on "
          f"{torch.cuda.get_device_name()}; peak GPU memory {peak:.1f} GB")
    print(f"{'system':52s} {'req/s':>7s} {'layers/s':>8s} {'mean s':>7s} {'p50 s':>7s} {'p95 s':>7s}")
    for r in rows:
        print(f"{r['system']:52s} {r['req_per_s']:7.3f} {r['layers_per_s']:8.2f} {r['mean_s']:7.1f} {r['p50_s']:7.1f} "
              f"{r['p95_s']:7.1f}")
    if not args.no_saturation and {"a", "b", "c"} <= systems:
        a, b, c = (rows[i]["req_per_s"] for i in (0, 1, -1))
        print(f"saturation throughput: (a)/(b) = {a / b:.2f}x, (a)/(c) = {a / c:.2f}x")


if __name__ == "__main__":
    main()
