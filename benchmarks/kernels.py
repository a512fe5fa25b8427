"""Kernel benchmarks on one CUDA GPU (bf16, random inputs, medians of triton.testing.do_bench).

- norm_rope: fused QK RMSNorm + RoPE in GB/s, against a device copy of the same bytes measured in the
  same run, eager PyTorch (qk_norm_rope_ref) and torch.compile of the reference.
- adaln: LayerNorm + modulate and the gated residual, the same way.
- attention: TFLOP/s (4 * seq^2 * H * D per sequence) of the Triton varlen kernel next to SDPA with the
  cuDNN and the flash backends (through our dispatcher and called directly), and FlexAttention.
- fp8: the row kernels of the FP8 step at the 640/4 CFG image rows (the MLP's GELU + quantization, LayerNorm +
  AdaLN (+ quantization, + the gated residual before it), O's mean restored, V's amax and mean) in GB/s, at each
  num_warps, against a device copy of the same bytes and the eager reference.

Usage: python benchmarks/kernels.py [--quick] [--only norm_rope adaln attention fp8] [--no-compile]
A table is printed last; full results go to $OUT/kernels.json when OUT is set (or to --json).
"""

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

SECTIONS = ("norm_rope", "adaln", "attention", "fp8")
DEVICE = "cuda"
HEADS, HEAD_DIM, HIDDEN = 24, 128, 3072
# (tokens, scattered into a joint buffer?): q or k of 2 x 9856 (640 px, 4 layers, CFG) and 1 x 24776 tokens
NORM_ROPE_CASES = [(2 * 9856, False), (2 * 9856, True), (24776, False)]
ADALN_ROWS = 2 * 9600  # image rows at 640 px / 4 layers, cond + uncond
ATTENTION_CASES = [(2, 9856), (1, 24776)]  # (sequences, tokens per sequence)
QUICK_NORM_ROPE_CASES, QUICK_ADALN_ROWS, QUICK_ATTENTION_CASES = [(2048, False), (2048, True)], 2048, [(2, 1024)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes and few repetitions (smoke run)")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="sections to run")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention")
    parser.add_argument("--json", type=Path, default=None, help="results file (default: $OUT/kernels.json)")
    return parser.parse_args(argv)


class Bench:
    def __init__(self, quick: bool) -> None:
        from triton.testing import do_bench

        self._do_bench = do_bench
        self.warmup, self.rep = (5, 20) if quick else (50, 300)

    def ms(self, fn: Callable[[], object]) -> float:
        fn()  # compile / autotune outside the timed region
        torch.cuda.synchronize()
        return float(self._do_bench(fn, warmup=self.warmup, rep=self.rep, return_mode="median"))

    def try_ms(self, fn: Callable[[], object]) -> tuple[float | None, str | None]:
        try:
            return self.ms(fn), None
        except Exception as exc:  # a baseline that does not run here is reported, not fatal
            return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def copy_ms(bench: Bench, nbytes: int) -> float:
    """A device copy that reads nbytes / 2 and writes nbytes / 2: the bandwidth ceiling for nbytes moved."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=DEVICE).random_(0, 255)
    dst = torch.empty_like(src)
    return bench.ms(lambda: dst.copy_(src))


def bandwidth_rows(
    bench: Bench,
    case: str,
    nbytes: int,
    triton_rel_err: float,
    providers: dict[str, Callable[[], object]],
    no_compile: bool,
) -> list[dict]:
    """Time each provider moving nbytes: GB/s, % of the copy rate, and time / the "triton" time."""
    copy = copy_ms(bench, nbytes)
    rows = [{"case": case, "provider": "copy (same bytes)", "ms": copy, "GB/s": nbytes / copy / 1e6,
             "pct_of_copy": 100.0}]
    for name, fn in providers.items():
        if no_compile and name.startswith("torch.compile"):
            continue
        ms, error = bench.try_ms(fn)
        row = {"case": case, "provider": name, "ms": ms, "error": error}
        if ms is not None:
            row.update({"GB/s": nbytes / ms / 1e6, "pct_of_copy": 100.0 * copy / ms})
        rows.append(row)
    fused = next(r for r in rows if r["provider"] == "triton")
    fused["rel_err_vs_eager"] = triton_rel_err
    for r in rows[1:]:
        if r.get("ms") and fused.get("ms"):
            r["time_vs_triton"] = r["ms"] / fused["ms"]
    return rows


def bench_norm_rope(bench: Bench, args: argparse.Namespace) -> list[dict]:
    from vllm_layered.kernels.qk_norm_rope import qk_norm_rope_ref

    compiled = torch.compile(qk_norm_rope_ref)
    cases = QUICK_NORM_ROPE_CASES if args.quick else NORM_ROPE_CASES
    return [row for n, scatter in cases for row in _norm_rope_case(bench, args, n, scatter, compiled)]


def _norm_rope_case(bench: Bench, args: argparse.Namespace, n: int, scatter: bool, compiled) -> list[dict]:
    from vllm_layered.kernels.qk_norm_rope import qk_norm_rope, qk_norm_rope_ref

    x = torch.randn(n, HEADS, HEAD_DIM, dtype=torch.bfloat16, device=DEVICE)
    weight = torch.rand(HEAD_DIM, device=DEVICE).add_(0.5).bfloat16()
    angles = torch.randn(n, HEAD_DIM // 2, device=DEVICE)
    cos, sin = angles.cos(), angles.sin()
    kw = {"out": torch.empty_like(x), "out_rows": torch.randperm(n, device=DEVICE).to(torch.int32) if scatter else None}
    err = rel_err(qk_norm_rope(x, weight, cos, sin, **kw).clone(), qk_norm_rope_ref(x, weight, cos, sin, **kw))
    nbytes = 2 * x.numel() * x.element_size() + 2 * cos.numel() * cos.element_size() + (n * 4 if scatter else 0)
    case = f"norm+rope {n}x{HEADS}x{HEAD_DIM} bf16" + (" scatter" if scatter else "")
    return bandwidth_rows(bench, case, nbytes, err, {
        "triton": lambda: qk_norm_rope(x, weight, cos, sin, **kw),
        "eager": lambda: qk_norm_rope_ref(x, weight, cos, sin, **kw),
        "torch.compile": lambda: compiled(x, weight, cos, sin, **kw),
    }, args.no_compile)


def bench_adaln(bench: Bench, args: argparse.Namespace) -> list[dict]:
    from vllm_layered.kernels.adaln import (
        gated_residual,
        gated_residual_ref,
        layernorm_modulate,
        layernorm_modulate_ref,
    )

    compiled_ln = torch.compile(layernorm_modulate_ref)
    compiled_res = torch.compile(gated_residual_ref)
    n = QUICK_ADALN_ROWS if args.quick else ADALN_ROWS
    x = torch.randn(n, HIDDEN, dtype=torch.bfloat16, device=DEVICE)
    y = torch.randn_like(x)
    mod = torch.randn(2, 6 * HIDDEN, dtype=torch.bfloat16, device=DEVICE) * 0.1
    shift, scale, gate = mod[:, :HIDDEN], mod[:, HIDDEN:2 * HIDDEN], mod[:, 2 * HIDDEN:3 * HIDDEN]
    seg = (torch.arange(n, device=DEVICE) >= n // 2).to(torch.int32)
    out = torch.empty_like(x)
    act = x.numel() * x.element_size()

    err = rel_err(layernorm_modulate(x, shift, scale, seg), layernorm_modulate_ref(x, shift, scale, seg))
    rows = bandwidth_rows(bench, f"layernorm_modulate {n}x{HIDDEN} bf16", 2 * act + n * 4, err, {
        "triton": lambda: layernorm_modulate(x, shift, scale, seg, out=out),
        "eager": lambda: layernorm_modulate_ref(x, shift, scale, seg),
        "torch.compile": lambda: compiled_ln(x, shift, scale, seg),
    }, args.no_compile)

    err = rel_err(gated_residual(x, y, gate, seg, inplace=False), gated_residual_ref(x, y, gate, seg, inplace=False))
    res_rows = bandwidth_rows(bench, f"gated_residual {n}x{HIDDEN} bf16 in place", 3 * act + n * 4, err, {
        "triton": lambda: gated_residual(out, y, gate, seg),
        "eager": lambda: gated_residual_ref(out, y, gate, seg),
        "torch.compile": lambda: compiled_res(out, y, gate, seg),
    }, args.no_compile)
    return rows + res_rows


def bench_fp8(bench: Bench, args: argparse.Namespace) -> list[dict]:
    """The row kernels of the FP8 step, each at the num_warps that `row_chunks` picks ("triton") and at the others
    (``warps=W``), against the eager reference ("eager") and a copy of the same bytes."""
    from vllm_layered.kernels import adaln, fp8, fp8_attention

    n = QUICK_ADALN_ROWS if args.quick else ADALN_ROWS
    hidden = torch.randn(n, 4 * HIDDEN, dtype=torch.bfloat16, device=DEVICE)
    x = torch.randn(n, HIDDEN, dtype=torch.bfloat16, device=DEVICE)
    y = torch.randn_like(x)
    mod = torch.randn(2, 3 * HIDDEN, dtype=torch.bfloat16, device=DEVICE) * 0.1
    shift, scale, gate = mod[:, :HIDDEN], mod[:, HIDDEN:2 * HIDDEN], mod[:, 2 * HIDDEN:]
    seg = (torch.arange(n, device=DEVICE) >= n // 2).to(torch.int32)
    bounds = [0, n // 2, n]
    cu = torch.tensor(bounds, dtype=torch.int32, device=DEVICE)
    o8 = (torch.randn(n, HIDDEN, device=DEVICE) * 100).to(fp8.FP8_DTYPE)
    o_scale, mean = torch.rand(n, device=DEVICE) * 0.01, torch.randn(2, HIDDEN, device=DEVICE)
    residual = x.clone()  # updated in place by the fused residual (the first call's x is x: the error check)
    cases = (  # name, bytes moved, kernel, reference, sweep num_warps
        (f"gelu+quantize_rows {n}x{4 * HIDDEN} bf16", 3 * hidden.numel() + 4 * n,
         lambda: fp8.quantize_rows(hidden, gelu=True), lambda: fp8.quantize_rows_ref(hidden, gelu=True), True),
        (f"layernorm_modulate_fp8 {n}x{HIDDEN} bf16", 3 * x.numel() + 4 * n,
         lambda: adaln.layernorm_modulate_fp8(x, shift, scale, seg),
         lambda: adaln.layernorm_modulate_fp8_ref(x, shift, scale, seg), True),
        (f"layernorm_modulate {n}x{HIDDEN} bf16 (bf16 out)", 4 * x.numel(),
         lambda: adaln.layernorm_modulate(x, shift, scale, seg),
         lambda: adaln.layernorm_modulate_ref(x, shift, scale, seg), True),
        (f"gated_residual_modulate fp8 {n}x{HIDDEN} bf16", 7 * x.numel() + 4 * n,
         lambda: adaln.gated_residual_modulate(residual, y, gate, shift, scale, seg, fp8=True),
         lambda: adaln.gated_residual_modulate_ref(x.clone(), y, gate, shift, scale, seg, fp8=True), True),
        (f"restore_mean {n}x{HIDDEN} e4m3", 2 * o8.numel() + 8 * n,
         lambda: fp8_attention.restore_mean(o8, o_scale, mean, cu),
         lambda: fp8_attention.restore_mean_ref(o8, o_scale, mean, cu), True),
        (f"sequence_stats {n}x{HIDDEN} bf16 (amax and mean of V)", 2 * x.numel(),
         lambda: fp8_attention.sequence_stats(x, bounds, cu),
         lambda: fp8_attention.sequence_stats_ref(x, bounds, cu), False),
    )
    modules = (adaln, fp8, fp8_attention)
    rows = []
    for case, nbytes, fused, ref, sweep in cases:
        got, expected = fused(), ref()
        if isinstance(got, tuple) and got[0].dtype == fp8.FP8_DTYPE:  # e4m3 rows and their scales
            (q, qs), (qr, sr) = got, expected
            got, expected = q.float() * qs[:, None], qr.float() * sr[:, None]
        elif isinstance(got, tuple):  # sequence_stats: compare the means
            got, expected = got[1], expected[1]
        err = rel_err(got, expected)
        providers = {"triton": fused, "eager": ref}
        for warps in (4, 8, 16, 32) if sweep else ():
            def with_warps(warps=warps, fused=fused):
                chunks = [m.row_chunks for m in modules]
                for m, chosen in zip(modules, chunks):
                    m.row_chunks = lambda k, chosen=chosen: (*chosen(k)[:2], warps)
                try:
                    return fused()
                finally:
                    for m, chosen in zip(modules, chunks):
                        m.row_chunks = chosen
            providers[f"warps={warps}"] = with_warps
        rows += bandwidth_rows(bench, case, nbytes, err, providers, args.no_compile)
        print(format_table({"fp8": rows}), flush=True)
    return rows


def bench_attention(bench: Bench, args: argparse.Namespace) -> list[dict]:
    cases = QUICK_ATTENTION_CASES if args.quick else ATTENTION_CASES
    return [row for batch, seq in cases for row in _attention_case(bench, args, batch, seq)]


def _attention_case(bench: Bench, args: argparse.Namespace, batch: int, seq: int) -> list[dict]:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from vllm_layered.kernels import attention as attn

    total = batch * seq
    q, k, v = (torch.randn(total, HEADS, HEAD_DIM, dtype=torch.bfloat16, device=DEVICE) for _ in range(3))
    cu = torch.arange(0, total + 1, seq, dtype=torch.int32, device=DEVICE)
    dense = [t.view(batch, seq, HEADS, HEAD_DIM).transpose(1, 2) for t in (q, k, v)]  # [B, H, S, D]
    flops = 4 * seq * seq * HEADS * HEAD_DIM * batch

    def direct_sdpa(backend):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(*dense)

    providers = {
        "triton varlen": lambda: attn.varlen_attention(q, k, v, cu, seq),
        "sdpa:cudnn (dispatcher)": lambda: attn.attention(q, k, v, cu, seq, backend="sdpa:cudnn"),
        "sdpa:flash (dispatcher)": lambda: attn.attention(q, k, v, cu, seq, backend="sdpa:flash"),
        "sdpa cudnn (direct)": lambda: direct_sdpa(SDPBackend.CUDNN_ATTENTION),
        "sdpa flash (direct)": lambda: direct_sdpa(SDPBackend.FLASH_ATTENTION),
    }
    if not args.no_flex and attn.flex_attention_available():
        providers["flex (compiled)"] = lambda: attn.attention(q, k, v, cu, seq, backend="flex")
    case = f"{batch}x{seq} H{HEADS} D{HEAD_DIM} bf16"
    expected = attn.attention(q, k, v, cu, seq, backend="sdpa")  # SDPA's default choice, no mask
    rows = []
    for name, fn in providers.items():
        ms, error = bench.try_ms(fn)
        row = {"case": case, "provider": name, "ms": ms, "error": error}
        if ms is not None:
            row["TFLOP/s"] = flops / ms / 1e9
            if "direct" not in name:
                row["rel_err_vs_sdpa"] = rel_err(fn(), expected)
        rows.append(row)
    cudnn = next(r for r in rows if r["provider"] == "sdpa cudnn (direct)")
    for r in rows:
        if r.get("TFLOP/s") and cudnn.get("TFLOP/s"):
            r["pct_of_cudnn"] = 100.0 * r["TFLOP/s"] / cudnn["TFLOP/s"]
    best = getattr(attn._varlen_attn_fwd_kernel, "best_config", None)
    rows[0]["triton_config"] = str(best) if best is not None else None
    return rows


def format_table(results: dict) -> str:
    lines = []
    for section in SECTIONS:
        rows = results.get(section)
        if not rows:
            continue
        lines.append(f"\n== {section} ==")
        if section == "attention":
            lines.append(f"{'case':<28} {'provider':<26} {'ms':>9} {'TFLOP/s':>8} {'%cuDNN':>7} {'rel err':>9}")
            for r in rows:
                lines.append(
                    f"{r['case']:<28} {r['provider']:<26} {_num(r.get('ms'), 3):>9} {_num(r.get('TFLOP/s'), 1):>8} "
                    f"{_num(r.get('pct_of_cudnn'), 1):>7} {_num(r.get('rel_err_vs_sdpa'), 'e'):>9}"
                )
        else:
            lines.append(f"{'case':<44} {'provider':<18} {'ms':>9} {'GB/s':>8} {'%copy':>6} {'t/triton':>8}")
            for r in rows:
                lines.append(
                    f"{r['case']:<44} {r['provider']:<18} {_num(r.get('ms'), 4):>9} {_num(r.get('GB/s'), 0):>8} "
                    f"{_num(r.get('pct_of_copy'), 1):>6} {_num(r.get('time_vs_triton'), 2):>8}"
                )
    return "\n".join(lines)


def _num(value: float | None, digits: int | str) -> str:
    if value is None:
        return "n/a"
    return f"{value:.2e}" if digits == "e" else f"{value:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton

    torch.manual_seed(0)
    bench = Bench(args.quick)
    results: dict = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "quick": args.quick,
        "timing": "triton.testing.do_bench median, ms",
    }
    runners = {"norm_rope": bench_norm_rope, "adaln": bench_adaln, "attention": bench_attention, "fp8": bench_fp8}
    for section in args.only:
        start = time.perf_counter()
        results[section] = runners[section](bench, args)
        print(f"[{section}] done in {time.perf_counter() - start:.1f} s", flush=True)

    out_path = args.json or (Path(os.environ["OUT"]) / "kernels.json" if os.environ.get("OUT") else None)
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(results, indent=2))
        print(f"results written to {out_path}")
    print(f"\n{results['device']}, torch {results['torch']}, triton {results['triton']}")
    print(format_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
