"""FP8 attention (cuDNN's sdpa_fp8 through the cuDNN frontend) on one GPU, probed and measured in one call.

Every row is printed as it finishes; a row that fails prints its error and a short traceback, and the rest run on.
    a  versions; graphs built and run at 9856 tokens and at odd lengths (9606: a CFG branch's; 77), build times;
    b  error at 9856 and 24776 tokens, inputs like the model's (RMSNorm + RoPE q and k, N(0, 1) v): cuDNN FP8 vs the
       FP8 reference (same e4m3 inputs), vs float32 attention of the unquantized inputs, and bf16 SDPA vs the latter;
    c  time: bf16 cuDNN SDPA vs FP8 at both sizes; the quantization kernels; the attention step of one layer at
       640/4 CFG (both sequences) with its quantizations, bf16 path vs FP8 path;
    d  the full-size transformer forward (random weights), 640/4 and 1024/4 layers, CFG-packed: bf16 GEMMs + bf16
       attention, FP8 GEMMs + bf16 attention, FP8 GEMMs + FP8 attention: ms and velocity relative error vs the first;
    e  the errors that existing FP8 GPU tests bound without a measurement (tests/kernels/test_fp8.py, test_adaln.py);
    f  cuDNN's execution plans for sdpa_fp8 at 9800 and 24776 tokens, under two sets of heuristic modes: each plan's
       name, workspace, time, and its output against the default plan's (the first that builds, which we run);
    g  the FP8 forward (640/4 CFG, FP8 GEMMs + FP8 attention) eager vs replayed as one CUDA graph: the most that
       launch gaps can cost;
    h  where FP8 attention's error comes from on the model's own inputs: q, k, v of some blocks captured from the FP8
       transformer (bf16 attention) at 640/4 and 1024/4, the conditional sequence; the error vs float32 attention of
       cuDNN FP8 (uncentered, and centered as the model runs it), of the FP8 reference (Q, K, V, O rounded, P not), of
       rounding Q and K only, V only, O only; and the logits of 64 query rows of head 0 (spread over the keys,
       softmax mass in keys whose P * 448 is subnormal in e4m3).
    k  key windows: each sequence's keys at its own length vs in a window rounded up to KEY_TILE under cuDNN's
       padding mask (what cudnn_fp8_attention runs), alone and packed: time, and whether the outputs are equal;
       a NaN in the masked rows of K, then of V: does it reach O?

    python benchmarks/attention_fp8.py [--sections abcdefghk] [--repeat 20]

Needs the cuDNN frontend: pip install --no-deps --target /tmp/site .whl/nvidia_cudnn_frontend-*.whl and
PYTHONPATH=/tmp/site. Results also go to $OUT/attention_fp8.json.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import bench_ms, write_results  # noqa: E402
from vllm_layered.kernels import cudnn_fp8_attention as cfa  # noqa: E402
from vllm_layered.kernels.attention import sdpa_varlen_attention  # noqa: E402
from vllm_layered.kernels.fp8 import FP8_MAX, quantize_rows  # noqa: E402
from vllm_layered.kernels.fp8_attention import (  # noqa: E402
    Fp8AttentionScales,
    fp8_attention_ref,
    qk_scale,
    quantize_v,
    restore_mean,
    sequence_amax,
    sequence_mean,
    sequence_sum,
)
from vllm_layered.kernels.qk_norm_rope import qk_norm_rope  # noqa: E402

HEADS, HEAD_DIM = 24, 128
SIZES = (9856, 24776)  # one sequence of 640 px / 4 layers (+ 256 text tokens), one of 1024 px / 4 layers
CFG_PAIR = (9800, 9606)  # 640 px / 4 layers: 6 x 1600 image tokens + 200 (caption) / 6 (negative prompt " ")
results: dict[str, object] = {}


def attempt(label: str, fn: Callable[[], object]) -> object:
    """Run one row; on failure print the error with the last frames and go on (None)."""
    try:
        return fn()
    except Exception as exc:  # one variant failing must not hide the others
        results[label] = f"failed: {type(exc).__name__}: {exc}"
        frames = "".join(traceback.format_exception(exc, limit=-6))
        print(f"[{label}] FAILED {type(exc).__name__}: {exc}\n{frames}", flush=True)
        return None


def report(label: str, text: str, value: object = None) -> None:
    results[label] = value if value is not None else text
    print(f"[{label}] {text}", flush=True)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def tflops(lengths: tuple[int, ...], ms: float) -> float:
    return sum(4 * n * n * HEADS * HEAD_DIM for n in lengths) / ms / 1e9


class Inputs:
    """Packed sequences shaped like the model's: q and k from the QK-norm + RoPE kernel (bf16 and e4m3 outputs of
    the same rows, static scales from the norm weights), N(0, 1) v (bf16, and quantized per sequence)."""

    def __init__(self, lengths: tuple[int, ...], seed: int = 0) -> None:
        gen = torch.Generator("cuda").manual_seed(seed)
        n = sum(lengths)
        self.lengths = lengths
        self.bounds = [0, *torch.tensor(lengths).cumsum(0).tolist()]
        self.cu = torch.tensor(self.bounds, dtype=torch.int32, device="cuda")
        made = []
        for _ in range(2):
            w = (torch.rand(HEAD_DIM, device="cuda", generator=gen) + 0.5).bfloat16()
            x = (torch.randn(n, HEADS, HEAD_DIM, device="cuda", generator=gen) * 3).bfloat16()
            angles = torch.rand(n, HEAD_DIM // 2, device="cuda", generator=gen) * 2 * math.pi
            cos, sin, scale = angles.cos(), angles.sin(), qk_scale([w], HEAD_DIM)
            made.append((x, w, cos, sin, scale))
        self.norm_inputs = made
        (self.q, self.q8), (self.k, self.k8) = ((qk_norm_rope(x, w, c, s), qk_norm_rope(x, w, c, s, out_scale=sc))
                                                for x, w, c, s, sc in made)
        self.v = torch.randn(n, HEADS, HEAD_DIM, device="cuda", generator=gen).bfloat16()
        self.qv = self.quantize_v()
        self.scales = Fp8AttentionScales(*(torch.full((1,), sc, device="cuda") for *_, sc in made), self.qv.scale,
                                         self.qv.o_inv)

    def quantize_v(self):
        rows = self.v.view(self.v.shape[0], -1)
        return quantize_v(rows, sequence_amax(rows, self.bounds), self.cu)

    def fp8(self) -> torch.Tensor:
        return cfa.cudnn_fp8_attention(self.q8, self.k8, self.qv.data.view(self.v.shape), self.scales, self.bounds)

    def bf16(self) -> torch.Tensor:
        return sdpa_varlen_attention(self.q, self.k, self.v, self.cu, sdpa_kernel="cudnn", bounds=self.bounds)

    def dequantize(self, o8: torch.Tensor) -> torch.Tensor:
        return o8.float() * self.qv.o_row_scale[:, None, None]


def section_a(args) -> None:
    import cudnn

    report("versions", f"torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()})"
           f", cudnn frontend {cudnn.__version__} over cuDNN {cudnn.backend_version_string()}, "
           f"{torch.cuda.get_device_name()} sm{''.join(map(str, torch.cuda.get_device_capability()))}")
    for lengths in ((9856,), (9606,), (77,)):
        def build_and_run(lengths=lengths):
            data = Inputs(lengths)
            cfa.clear_graph_cache()
            torch.cuda.synchronize()
            start = time.perf_counter()
            out = data.fp8()
            torch.cuda.synchronize()
            first = time.perf_counter() - start
            steady = bench_ms(data.fp8, warmup=1, repeat=3)
            codes = out.float()
            report(f"a {lengths[0]}", f"graph built and run: first call {first * 1e3:.0f} ms (build + run), then "
                   f"{steady:.3f} ms; finite {bool(torch.isfinite(codes).all())}, max |o8| {codes.abs().max():.0f}, "
                   f"saturated {(codes.abs() == FP8_MAX).float().mean().item():.2e}; cache {cfa.graph_cache_info()}",
                   dict(first_ms=first * 1e3, steady_ms=steady))
        attempt(f"a {lengths[0]}", build_and_run)


def section_b(args) -> None:
    for n in SIZES:
        def errors(n=n):
            data = Inputs((n,))
            got = data.dequantize(data.fp8())
            ref = data.dequantize(fp8_attention_ref(data.q8, data.k8, data.qv.data.view(data.v.shape), data.scales,
                                                    data.bounds))
            exact = F.scaled_dot_product_attention(*(t.float().transpose(0, 1)[None] for t in (data.q, data.k, data.v))
                                                   )[0].transpose(0, 1)
            bf16 = data.bf16()
            errs = dict(fp8_vs_ref=rel_err(got, ref), fp8_vs_fp32=rel_err(got, exact), fp8_vs_bf16=rel_err(got, bf16),
                        ref_vs_fp32=rel_err(ref, exact), bf16_vs_fp32=rel_err(bf16, exact))
            report(f"b {n}", "rel err " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()), errs)
        attempt(f"b {n}", errors)


def section_c(args) -> None:
    for n in SIZES:
        def times(n=n):
            data = Inputs((n,))
            bf16, fp8 = bench_ms(data.bf16, repeat=args.repeat), bench_ms(data.fp8, repeat=args.repeat)
            report(f"c {n} attention", f"bf16 cuDNN {bf16:.3f} ms ({tflops((n,), bf16):.0f} TFLOP/s), FP8 cuDNN "
                   f"{fp8:.3f} ms ({tflops((n,), fp8):.0f} TFLOP/s), {bf16 / fp8:.2f}x", dict(bf16_ms=bf16, fp8_ms=fp8))
            x, w, cos, sin, scale = data.norm_inputs[0]
            rows = data.v.view(n, -1)
            kernels = dict(
                qk_norm_rope_bf16=lambda: qk_norm_rope(x, w, cos, sin),
                qk_norm_rope_e4m3=lambda: qk_norm_rope(x, w, cos, sin, out_scale=scale),
                v_amax_and_quantize=data.quantize_v,
                bf16_out_quantize_rows=lambda: quantize_rows(rows),  # what the bf16-attention path does to its output
            )
            ms = {name: bench_ms(fn, repeat=args.repeat) for name, fn in kernels.items()}
            report(f"c {n} quantization", ", ".join(f"{k} {v * 1e3:.0f} us" for k, v in ms.items()), ms)
        attempt(f"c {n}", times)

    def layer_step():
        data = Inputs(CFG_PAIR)
        rows = data.v.view(data.v.shape[0], -1)

        def bf16_path():
            return quantize_rows(data.bf16().view(rows.shape))  # attention, then the FP8 out-projection's input

        def fp8_path():  # as the model runs it: V centered, attention, the mean restored into the projections' rows
            mean = sequence_mean(sequence_sum(rows, data.bounds), data.cu)
            qv = quantize_v(rows, sequence_amax(rows, data.bounds), data.cu, mean=mean)
            scales = Fp8AttentionScales(data.scales.q, data.scales.k, qv.scale, qv.o_inv)
            out = cfa.cudnn_fp8_attention(data.q8, data.k8, qv.data.view(data.v.shape), scales, data.bounds)
            return restore_mean(out.view(rows.shape), qv.o_row_scale, mean, data.cu)

        bf16, fp8 = bench_ms(bf16_path, repeat=args.repeat), bench_ms(fp8_path, repeat=args.repeat)
        report("c 640/4 CFG layer", f"attention + quantizations of one layer, {CFG_PAIR}: bf16 path {bf16:.3f} ms, "
               f"FP8 path {fp8:.3f} ms, {bf16 / fp8:.2f}x; x 60 layers: {60 * (bf16 - fp8):.1f} ms saved per forward",
               dict(bf16_ms=bf16, fp8_ms=fp8))
    attempt("c 640/4 CFG layer", layer_step)


def section_d(args) -> None:
    from benchmarks.common import fp8_transformer_sharing, random_transformer
    from benchmarks.forward import COND_TEXT, UNCOND_TEXT, inputs
    from vllm_layered.model_executor.models.fp8_attention import set_attention_dtype
    from vllm_layered.model_executor.sequence_layout import SequenceLayout

    models = {}

    def build():
        models["bf16"] = random_transformer()
        models["fp8"] = fp8_transformer_sharing(models["bf16"])

    attempt("d models", build)
    if "fp8" not in models:
        return
    for resolution in (640, 1024):
        side = resolution // 16
        layouts = [SequenceLayout(COND_TEXT, 4, side, side), SequenceLayout(UNCOND_TEXT, 4, side, side)]
        batch = inputs(layouts, torch.Generator("cuda").manual_seed(0))
        with torch.no_grad():
            reference = attempt(f"d {resolution} bf16", lambda: models["bf16"](batch).float())  # noqa: B023
            for name, model, attention in (("bf16 GEMM + bf16 attention", models["bf16"], None),
                                           ("fp8 GEMM + bf16 attention", models["fp8"], "bf16"),
                                           ("fp8 GEMM + fp8 attention", models["fp8"], "fp8")):
                def run(name=name, model=model, attention=attention, batch=batch, reference=reference,
                        resolution=resolution):
                    if attention is not None:
                        set_attention_dtype(model, attention)
                    out = model(batch).float()
                    ms = bench_ms(lambda: model(batch), repeat=max(3, args.repeat // 4))
                    err = rel_err(out, reference) if reference is not None else float("nan")
                    report(f"d {resolution} {name}", f"{resolution}/4 CFG forward {ms:.1f} ms, velocity rel err vs "
                           f"bf16 {err:.2e}", dict(ms=ms, rel_err=err))
                attempt(f"d {resolution} {name}", run)
    models.clear()
    torch.cuda.empty_cache()


def section_e(args) -> None:
    from tests.kernels.fp8_checks import dequantize, rows_with_spread
    from tests.kernels.test_adaln import make_inputs
    from tests.kernels.test_fp8 import make_linear
    from vllm_layered.kernels.adaln import layernorm_modulate_fp8, layernorm_modulate_fp8_ref
    from vllm_layered.kernels.fp8 import fp8_gemm, fp8_gemm_ref, quantize_rows_ref
    from vllm_layered.model_executor.models.fp8_linear import Fp8Linear, fp8_input

    def agree(q, q_ref) -> float:
        return (q.view(torch.uint8) == q_ref.view(torch.uint8)).float().mean().item()

    def gelu():  # test_fp8.py test_quantize_rows_gelu_matches_reference: < 2e-3, > 0.99 agree
        for dtype in (torch.bfloat16, torch.float32):
            torch.manual_seed(0)
            x = (torch.randn(29, 400) * 3).to(dtype).cuda()
            (q, s), (qr, sr) = quantize_rows(x, gelu=True), quantize_rows_ref(x, gelu=True)
            report(f"e gelu {dtype}", f"rel err {rel_err(dequantize(q, s), dequantize(qr, sr)):.2e}, "
                   f"codes agree {agree(q, qr):.4f}, scale max rel {((s - sr).abs() / sr).max().item():.2e}")

    def adaln():  # test_adaln.py test_layernorm_modulate_fp8 vs the reference: < 1e-2, > 0.95 agree
        for dtype in (torch.float32, torch.bfloat16):
            for n, c, segments in [(37, 48, 3), (9, 96, 1), (64, 200, 5)]:
                torch.manual_seed(0)
                x, (shift, scale, *_), seg = make_inputs(n, c, segments, dtype, "cuda")
                shift = shift * torch.logspace(-1, 2, shift.shape[0], device="cuda")[:, None].to(dtype)
                q, qs = layernorm_modulate_fp8(x, shift, scale, seg)
                qr, sr = layernorm_modulate_fp8_ref(x, shift, scale, seg)
                report(f"e adaln {dtype} {n}x{c}", f"rel err {rel_err(dequantize(q, qs), dequantize(qr, sr)):.2e}, "
                       f"codes agree {agree(q, qr):.4f}, scale max rel {((qs - sr).abs() / sr).max().item():.2e}")

    def gemm():  # test_fp8.py test_fp8_gemm_on_gpu: 5e-3 (3e-2 fast accumulation), layer vs nn.Linear 0.08
        for k, n, use_gelu in [(3072, 3072, False), (3072, 12288, False), (12288, 3072, True)]:
            torch.manual_seed(0)
            x = rows_with_spread(2000, k, torch.bfloat16, "cuda")
            xq, x_scale = quantize_rows(x, gelu=use_gelu)
            wq, w_scale = quantize_rows_ref(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k**-0.5)
            bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
            expected = fp8_gemm_ref(xq, x_scale, wq, w_scale, bias)
            errs = {f"fast_accum={fa}": rel_err(fp8_gemm(xq, x_scale, wq, w_scale, bias, fast_accum=fa), expected)
                    for fa in (False, True)}
            errs["few rows (max over 1..206, fast)"] = max(
                rel_err(fp8_gemm(xq[:m], x_scale[:m], wq, w_scale, bias, fast_accum=True), expected[:m])
                for m in (1, 29, 42, 127, 128, 206))
            linear = make_linear(k, n).cuda()
            layer = Fp8Linear.from_linear(linear)
            inputs = F.gelu(x, approximate="tanh") if use_gelu else x
            with torch.no_grad():
                errs["Fp8Linear vs nn.Linear"] = rel_err(layer(inputs), linear(inputs))
                errs["shared rows"] = rel_err(layer(fp8_input(inputs, layer, layer)[5:1005]), linear(inputs[5:1005]))
            report(f"e gemm {k}x{n}", ", ".join(f"{key} {v:.2e}" for key, v in errs.items()), errs)

    for label, fn in (("e gelu", gelu), ("e adaln", adaln), ("e gemm", gemm)):
        attempt(label, fn)


def section_f(args) -> None:
    import cudnn

    modes = {"A, FALLBACK": (cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK),
             "A, B, FALLBACK": (cudnn.heur_mode.A, cudnn.heur_mode.B, cudnn.heur_mode.FALLBACK)}

    def knob_sweep(n, data, handle, engine, knobs):
        """The heuristics' first engine at every value of each of its knobs (the others as the heuristics set)."""
        info = attempt(f"f {n} knobs", lambda: repr(cfa._build_graph(
            cudnn, handle, n, HEADS, HEAD_DIM, 1 / math.sqrt(HEAD_DIM)).graph.get_knobs_for_engine(engine)))
        report(f"f {n} knobs", f"engine {engine}, heuristic knobs {knobs}; knob info {info}")
        out = torch.empty_like(data.q8)
        for knob in knobs:
            for value in range(0, 65):
                def one(value=value, knob=knob):
                    g = cfa._build_graph(cudnn, handle, n, HEADS, HEAD_DIM, 1 / math.sqrt(HEAD_DIM),
                                         plan=(engine, {**knobs, knob: value}))
                    scratch = cfa._scratch(torch.cuda.current_device(), torch.cuda.current_stream().cuda_stream,
                                           g.workspace_size)
                    pack = cfa._variant_pack(g, scratch, (data.q8, data.k8, data.qv.data.view(data.v.shape), out),
                                             data.scales, cfa.KeyWindow(0, 0, n, n, True), 0)
                    ms = bench_ms(lambda: g.graph.execute(pack, scratch.workspace, handle=handle), repeat=args.repeat)
                    report(f"f {n} knob {knob}={value}", f"{ms:.3f} ms ({tflops((n,), ms):.0f} TFLOP/s)",
                           dict(ms=ms))
                try:
                    one()
                except Exception as exc:  # most values are not valid for the engine: one line, no traceback
                    results[f"f {n} knob {knob}={value}"] = f"{type(exc).__name__}"

    for n in (CFG_PAIR[0], SIZES[1]):
        data = Inputs((n,))
        report(f"f {n} bf16", f"bf16 cuDNN SDPA {bench_ms(data.bf16, repeat=args.repeat):.3f} ms")
        default = data.fp8().float()
        for label, heuristics in modes.items():
            def plans(n=n, label=label, heuristics=heuristics, data=data, default=default):
                handle = cfa._handle(cudnn, torch.cuda.current_device())
                cudnn.set_stream(handle, torch.cuda.current_stream().cuda_stream)
                g = cfa._build_graph(cudnn, handle, n, HEADS, HEAD_DIM, 1 / math.sqrt(HEAD_DIM),
                                     heuristics=heuristics, all_plans=True)
                count = g.graph.get_execution_plan_count()
                report(f"f {n} {label}", f"{count} plans")
                out = torch.empty_like(data.q8)
                for i in range(count):
                    def one(i=i):
                        name = g.graph.get_plan_name_at_index(i)
                        ws = g.graph.get_workspace_size_plan_at_index(i)
                        scratch = cfa._scratch(torch.cuda.current_device(), torch.cuda.current_stream().cuda_stream,
                                               ws)
                        pack = cfa._variant_pack(g, scratch, (data.q8, data.k8, data.qv.data.view(data.v.shape), out),
                                                 data.scales, cfa.KeyWindow(0, 0, n, n, True), 0)
                        run = lambda: g.graph.execute_plan_at_index(pack, scratch.workspace, index=i, handle=handle)  # noqa: E731
                        ms = bench_ms(run, repeat=args.repeat)
                        diff = (out.float() - default).abs().max().item()
                        report(f"f {n} {label} plan {i}", f"{name}: workspace {ws} B, {ms:.3f} ms "
                               f"({tflops((n,), ms):.0f} TFLOP/s), max |o8 - default o8| {diff:.3g}",
                               dict(name=name, ms=ms, diff=diff))
                    attempt(f"f {n} {label} plan {i}", one)
                if label == "A, FALLBACK":
                    knob_sweep(n, data, handle, *g.graph.get_engine_and_knobs_at_index(0))
            attempt(f"f {n} {label}", plans)


def section_g(args) -> None:
    from benchmarks.common import random_transformer
    from benchmarks.forward import COND_TEXT, UNCOND_TEXT, inputs
    from vllm_layered.model_executor.models.fp8_attention import set_attention_dtype
    from vllm_layered.model_executor.models.fp8_linear import quantize_fp8
    from vllm_layered.model_executor.sequence_layout import SequenceLayout

    model = random_transformer()
    quantize_fp8(model)
    set_attention_dtype(model, "fp8")
    side = 640 // 16
    layouts = [SequenceLayout(COND_TEXT, 4, side, side), SequenceLayout(UNCOND_TEXT, 4, side, side)]
    batch = inputs(layouts, torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        eager_out = model(batch)
        eager = bench_ms(lambda: model(batch), repeat=5)
        report("g eager", f"640/4 CFG FP8 + FP8 attention forward, eager: {eager:.1f} ms")

        def graphed():
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                model(batch)  # warm on the capture stream (workspaces, handles)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = model(batch)
            graph.replay()
            torch.cuda.synchronize()
            same = torch.equal(out, eager_out)
            ms = bench_ms(graph.replay, repeat=5)
            report("g graph", f"replayed as one CUDA graph: {ms:.1f} ms ({eager / ms:.3f}x eager), output equal to "
                   f"eager: {same}", dict(eager_ms=eager, graph_ms=ms, equal=same))
        attempt("g graph", graphed)


def section_h(args) -> None:
    from benchmarks.common import random_transformer
    from benchmarks.forward import COND_TEXT, UNCOND_TEXT, inputs
    from vllm_layered.kernels.fp8 import quantize_with_scale_ref
    from vllm_layered.model_executor.models.fp8_attention import Fp8AttentionLayer
    from vllm_layered.model_executor.models.fp8_linear import quantize_fp8
    from vllm_layered.model_executor.sequence_layout import SequenceLayout

    model = random_transformer()
    quantize_fp8(model)
    blocks = (0, 20, 40, 59)
    layers = {i: Fp8AttentionLayer.from_attention(model.transformer_blocks[i].attn) for i in blocks}
    for resolution in (640, 1024):
        captured: dict[int, tuple[torch.Tensor, ...]] = {}
        for i in blocks:
            attn = model.transformer_blocks[i].attn

            def capture(q, k, v, meta, i=i, attn=attn, original=type(attn)._attention, captured=captured):
                end = meta.seq_bounds[1]  # the conditional sequence
                captured[i] = (q[:end].clone(), k[:end].clone(), v[:end].clone())
                return original(attn, q, k, v, meta)
            attn._attention = capture
        side = resolution // 16
        layouts = [SequenceLayout(COND_TEXT, 4, side, side), SequenceLayout(UNCOND_TEXT, 4, side, side)]
        with torch.no_grad():
            model(inputs(layouts, torch.Generator("cuda").manual_seed(0)))
        for i in blocks:
            del model.transformer_blocks[i].attn._attention
            q, k, v = captured.pop(i)
            attempt(f"h {resolution} block {i}", lambda args=(resolution, i, q, k, v, layers[i]): error_sources(
                *args, quantize_with_scale_ref))
    del model
    torch.cuda.empty_cache()


def error_sources(resolution, block, q, k, v, layer, quantize_with_scale_ref) -> None:
    n = q.shape[0]
    bounds = [0, n]
    cu = torch.tensor(bounds, dtype=torch.int32, device=q.device)

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(*(t.float().transpose(0, 1)[None] for t in (q, k, v)))[0].transpose(0, 1)

    exact = sdpa(q, k, v)
    q8, k8 = quantize_with_scale_ref(q, layer.q_scale), quantize_with_scale_ref(k, layer.k_scale)
    rows = v.view(n, -1)
    qv = quantize_v(rows, sequence_amax(rows, bounds), cu)
    v8 = qv.data.view(v.shape)
    scales = Fp8AttentionScales(layer.q_descale, layer.k_descale, qv.scale, qv.o_inv)
    deq_q, deq_k = q8.float() * layer.q_scale, k8.float() * layer.k_scale
    deq_v = v8.float() * qv.scale[0]
    o_scale = qv.o_row_scale[:, None, None]
    o_only = (exact * qv.o_inv[0]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * o_scale
    def centered() -> torch.Tensor:
        """The model's path: V centered on its mean over the sequence, cuDNN FP8, the mean added back (dequantized
        here, before restore_mean's quantization for the projections)."""
        mean = sequence_mean(sequence_sum(rows, bounds), cu)
        qc = quantize_v(rows, sequence_amax(rows, bounds), cu, mean=mean)
        sc = Fp8AttentionScales(layer.q_descale, layer.k_descale, qc.scale, qc.o_inv)
        o8 = cfa.cudnn_fp8_attention(q8, k8, qc.data.view(v.shape), sc, bounds)
        return o8.float() * qc.o_row_scale[:, None, None] + mean.view(1, *v.shape[1:])

    errs = dict(
        cudnn_fp8=rel_err(cfa.cudnn_fp8_attention(q8, k8, v8, scales, bounds).float() * o_scale, exact),
        cudnn_fp8_v_centered=rel_err(centered(), exact),
        fp8_reference=rel_err(fp8_attention_ref(q8, k8, v8, scales, bounds).float() * o_scale, exact),
        qk_only=rel_err(sdpa(deq_q, deq_k, v), exact),
        v_only=rel_err(sdpa(q, k, deq_v), exact),
        o_only=rel_err(o_only, exact),
        bf16_cudnn=rel_err(sdpa_varlen_attention(q, k, v, cu, sdpa_kernel="cudnn", bounds=bounds), exact),
    )
    rows_q = torch.linspace(0, n - 1, 64, device=q.device).long()
    logits = (q[rows_q, 0].float() @ k[:, 0].float().T) / math.sqrt(q.shape[-1])  # [64, n]
    p_rel = torch.exp(logits - logits.amax(dim=1, keepdim=True))
    mass = p_rel / p_rel.sum(dim=1, keepdim=True)
    stats = dict(
        logit_std=logits.std(dim=1).mean().item(),
        logit_range=(logits.amax(dim=1) - logits.amin(dim=1)).mean().item(),
        mass_subnormal=mass[p_rel * FP8_MAX < 2**-6].sum().item() / 64,
        mass_flushed=mass[p_rel * FP8_MAX < 2**-10].sum().item() / 64,
        effective_keys=(1 / (mass**2).sum(dim=1)).mean().item(),
        amax_v=qv.scale[0].item() * FP8_MAX,
        rms_v=v.float().pow(2).mean().sqrt().item(),
        rms_o=exact.pow(2).mean().sqrt().item(),
        q_scale=layer.q_scale,
        rms_q=q.float().pow(2).mean().sqrt().item(),
    )
    report(f"h {resolution} block {block}", f"{n} tokens: rel err " + ", ".join(f"{k} {v:.2e}" for k, v in
           errs.items()) + "; " + ", ".join(f"{k} {v:.3g}" for k, v in stats.items()), {**errs, **stats})


def section_k(args) -> None:
    tile = cfa.KEY_TILE
    for lengths in ((9800,), (9606,), (9728,), CFG_PAIR, (SIZES[1],), (SIZES[1], SIZES[1] - 194)):
        data = Inputs(lengths)
        outs = {}
        for label, key_tile in (("own length", 1), ("window", tile)):
            cfa.KEY_TILE = key_tile  # a tile of 1 makes every window the sequence's own length
            try:
                ms = bench_ms(data.fp8, repeat=args.repeat)
                outs[label] = data.fp8().view(torch.uint8)
            finally:
                cfa.KEY_TILE = tile
            report(f"k {lengths} {label}", f"{ms:.3f} ms ({tflops(lengths, ms):.0f} TFLOP/s)", dict(ms=ms))
        report(f"k {lengths} equal", str(torch.equal(outs["own length"], outs["window"])))
    n = 9800  # then a second sequence after it, whose first rows are NaN codes (0x7f): does the first stay finite?
    padded = -(-n // tile) * tile
    for name in ("k", "v"):
        data = Inputs((n, padded - n))
        q8, k8, v8 = data.q8, data.k8.clone(), data.qv.data.view(data.v.shape).clone()
        (k8 if name == "k" else v8).view(torch.uint8)[n:] = 0x7F
        out = cfa.cudnn_fp8_attention(q8, k8, v8, data.scales, data.bounds)[:n]
        finite = bool(torch.isfinite(out.float()).all())
        report(f"k NaN in the masked {name} rows", f"first sequence's O finite: {finite}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="abcdefgh", help="which sections to run, e.g. 'abc'")
    parser.add_argument("--repeat", type=int, default=20, help="timed calls per kernel measurement (median)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/attention_fp8.py needs a CUDA GPU")
    error = cfa.cudnn_frontend_error()
    if error is not None:
        print(f"cuDNN frontend missing, sections a-c need it: {error}", flush=True)
    sections = dict(a=section_a, b=section_b, c=section_c, d=section_d, e=section_e, f=section_f, g=section_g,
                    h=section_h, k=section_k)
    for key in args.sections:
        start = time.perf_counter()
        attempt(f"section {key}", lambda key=key: sections[key](args))
        print(f"-- section {key}: {time.perf_counter() - start:.1f} s", flush=True)
        write_results("attention_fp8.json", results)


if __name__ == "__main__":
    main()
