"""Where the time of one packed CFG step goes: GPU kernel time by category, and GPU idle time.

    python benchmarks/profile_step.py [--shape 640x4] [--backend sdpa] [--fp8] [--attention-dtype bf16|fp8]
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import bench_ms, random_transformer, write_results  # noqa: E402
from benchmarks.forward import COND_TEXT, UNCOND_TEXT, inputs, set_backend  # noqa: E402
from vllm_layered.model_executor.models.fp8_attention import ATTENTION_DTYPES, set_attention_dtype  # noqa: E402
from vllm_layered.model_executor.models.fp8_linear import quantize_fp8  # noqa: E402
from vllm_layered.model_executor.sequence_layout import SequenceLayout  # noqa: E402

CATEGORIES = (  # first match wins
    ("attention", ("fmha", "flash", "cudnn", "attn", "sdpa")),
    ("gemm", ("gemm", "cutlass", "nvjet", "xmma", "sm90")),
    ("norm+rope", ("qk_norm_rope",)),
    ("adaln", ("layernorm_modulate", "gated_residual")),
    ("fp8 quantize", ("quantize_rows", "quantize_v", "norminfinity")),  # norminfinity: amax(V) for FP8 attention
    ("copy/index", ("copy", "index", "gather", "scatter", "cat")),
)


def category(name: str) -> str:
    lower = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in lower for k in keys):
            return cat
    return "other elementwise"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", default="640x4")
    parser.add_argument("--backend", default="sdpa")
    parser.add_argument("--fp8", action="store_true", help="profile the FP8 transformer (quantization='fp8')")
    parser.add_argument("--attention-dtype", default="bf16", choices=ATTENTION_DTYPES,
                        help="fp8: FP8 attention too (implies --fp8)")
    args = parser.parse_args()
    args.fp8 = args.fp8 or args.attention_dtype == "fp8"
    res, layers = (int(x) for x in args.shape.split("x"))
    side = res // 16
    model = random_transformer()
    if args.fp8:
        quantize_fp8(model)
    if args.attention_dtype == "fp8":
        set_attention_dtype(model, "fp8")
    set_backend(model, args.backend)
    layouts = [SequenceLayout(COND_TEXT, layers, side, side), SequenceLayout(UNCOND_TEXT, layers, side, side)]
    computed = inputs(layouts, torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        # as served: the modulation rows come from the request's table (LayeredTransformer.modulation_table)
        batch = replace(computed, modulation=model.modulation_table(computed.timesteps, computed.t_cond))
        computed_ms = bench_ms(lambda: model(computed), repeat=3)
        step_ms = bench_ms(lambda: model(batch), repeat=3)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            model(batch)
            torch.cuda.synchronize()
    by_cat: dict[str, float] = defaultdict(float)
    by_kernel: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA and evt.device_time_total > 0:
            by_cat[category(evt.name)] += evt.device_time_total / 1e3
            by_kernel[evt.name][0] += evt.device_time_total / 1e3
            by_kernel[evt.name][1] += 1
    busy = sum(by_cat.values())
    fp8 = (", fp8" if args.fp8 else "") + (" + fp8 attention" if args.attention_dtype == "fp8" else "")
    print(f"\n{args.shape} packed CFG step, backend {args.backend}{fp8}: {step_ms:.1f} ms wall, {busy:.1f} ms kernels "
          f"({computed_ms:.1f} ms wall computing the modulation in the forward)")
    for cat, ms in sorted(by_cat.items(), key=lambda kv: -kv[1]):
        print(f"  {cat:18s} {ms:8.1f} ms  {100 * ms / busy:5.1f}%")
    print("top kernels:")
    top = sorted(by_kernel.items(), key=lambda kv: -kv[1][0])[:15]
    for name, (ms, count) in top:
        print(f"  {ms:8.1f} ms {count:5d}x  {name[:110]}")
    suffix = ("_fp8" if args.fp8 else "") + ("_fp8attn" if args.attention_dtype == "fp8" else "")
    write_results(f"profile_{args.shape}{suffix}.json", {"step_ms": step_ms, "computed_modulation_step_ms": computed_ms,
                                                         "categories": by_cat,
                                                         "kernels": {n: v for n, v in top}})


if __name__ == "__main__":
    main()
