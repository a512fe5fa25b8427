"""One denoising step of the full 60-block transformer (random bf16 weights): ours vs diffusers.

A CFG step is a conditional and an unconditional forward. diffusers runs them as two forwards (as its
pipeline does); we pack both sequences into one forward. Every figure is next to the bf16 GEMM rate
measured in the same run and the cost model (docs/cost_model.md). The FP8 rows (quantization="fp8", sm89+) run a
second transformer sharing the bf16 one's unquantized tensors, on the same inputs; their velocity is
compared with ours in bf16 ("+fa": torch._scaled_mm's fast accumulation).

    python benchmarks/forward.py [--shapes 640x4,640x2,640x8,1024x4] [--backends auto,triton,sdpa:cudnn]
                                 [--fp8-backends auto] (an empty list skips FP8)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    bench_ms,
    diffusers_transformer_sharing,
    forward_flops,
    fp8_transformer_sharing,
    gemm_tflops,
    random_transformer,
    write_results,
)
from vllm_layered.kernels.fp8 import fp8_gemm, quantize_rows_ref  # noqa: E402
from vllm_layered.model_executor.forward_batch import ForwardBatch  # noqa: E402
from vllm_layered.model_executor.models.fp8_linear import Fp8Linear  # noqa: E402
from vllm_layered.model_executor.sequence_layout import SequenceLayout  # noqa: E402

COND_TEXT, UNCOND_TEXT = 200, 6  # a ~200-token caption; the negative prompt " " leaves 6 tokens


def inputs(layouts: list[SequenceLayout], gen: torch.Generator) -> ForwardBatch:
    img = [torch.randn(s.image_tokens, 64, generator=gen, device="cuda") for s in layouts]
    txt = [torch.randn(s.text_len, 3584, generator=gen, device="cuda") for s in layouts]
    return ForwardBatch(
        torch.cat(img).bfloat16(), torch.cat(txt).bfloat16(), torch.full((len(layouts),), 0.7, device="cuda"),
        layouts,
    )


def diffusers_step(ref, batch: ForwardBatch):
    """The reference pipeline's CFG step: one forward per branch, batch 1 each."""
    outs, img_off, txt_off = [], 0, 0
    for s in batch.layouts:
        out = ref(
            hidden_states=batch.image_tokens[img_off : img_off + s.image_tokens][None],
            encoder_hidden_states=batch.text_embeds[txt_off : txt_off + s.text_len][None],
            encoder_hidden_states_mask=None,
            timestep=batch.timesteps[:1],
            img_shapes=[[(1, s.height, s.width)] * (s.layers + 2)],
            additional_t_cond=batch.t_cond[:1],
            return_dict=False,
        )[0][0, : s.noisy_tokens]
        outs.append(out)
        img_off += s.image_tokens
        txt_off += s.text_len
    return torch.cat(outs)


def set_backend(model, backend: str) -> None:
    for block in model.transformer_blocks:
        block.attn.backend = backend


def set_fast_accum(model, fast_accum: bool) -> None:
    for module in model.modules():
        if isinstance(module, Fp8Linear):
            module.fast_accum = fast_accum


def fp8_gemm_tflops(n: int = 8192) -> float:
    """Dense e4m3 GEMM rate with row-wise scales and a bf16 output, as the FP8 layers run it."""
    xq, x_scale = quantize_rows_ref(torch.randn(n, n, device="cuda"))
    wq, w_scale = quantize_rows_ref(torch.randn(n, n, device="cuda"))
    ms = bench_ms(lambda: fp8_gemm(xq, x_scale, wq, w_scale), warmup=5, repeat=20)
    return 2 * n**3 / ms / 1e9


def bench_shape(shape: str, ours, ref, fp8, gen, gemm: float, args, rows: list) -> dict:
    res, layers = (int(x) for x in shape.split("x"))
    side = res // 16
    layouts = [SequenceLayout(COND_TEXT, layers, side, side), SequenceLayout(UNCOND_TEXT, layers, side, side)]
    batch = inputs(layouts, gen)
    flops = forward_flops([s.total_tokens for s in layouts])
    entry = {"shape": shape, "tokens": [s.total_tokens for s in layouts], "tflop": flops / 1e12, "ms": {}}

    def report(name: str, ms: float) -> None:
        entry["ms"][name] = ms
        tflops = flops / ms / 1e9
        rows.append((shape, name, ms, tflops, 100 * tflops / gemm))
        print(f"{shape:8s} {name:22s} {ms:9.1f} ms {tflops:6.0f} TFLOP/s {100 * tflops / gemm:5.1f}%", flush=True)

    with torch.no_grad():
        reference = None
        if ref is not None:
            reference = diffusers_step(ref, batch)
            report("diffusers (2 fwd)", bench_ms(lambda: diffusers_step(ref, batch), repeat=args.repeat))
        for backend in args.backends.split(","):
            set_backend(ours, backend)
            try:
                out = ours(batch)
                if reference is not None:
                    err = ((out.float() - reference.float()).norm() / reference.float().norm()).item()
                    entry.setdefault("rel_err_vs_diffusers", {})[backend] = err
                report(f"ours packed [{backend}]", bench_ms(lambda: ours(batch), repeat=args.repeat))
            except Exception as exc:  # one backend failing must not hide the others
                print(f"{shape} {backend}: FAILED {type(exc).__name__}: {exc}", flush=True)
                entry["ms"][f"ours packed [{backend}]"] = f"failed: {exc}"
        for backend in args.fp8_backends.split(",") if fp8 is not None and args.fp8_backends else ():
            set_backend(ours, backend)
            set_backend(fp8, backend)
            for fast_accum in (False, True):
                name = f"ours fp8{'+fa' if fast_accum else ''} [{backend}]"
                set_fast_accum(fp8, fast_accum)
                try:
                    bf16_out = ours(batch).float()  # the same inputs through ours in bf16
                    err = ((fp8(batch).float() - bf16_out).norm() / bf16_out.norm()).item()
                    entry.setdefault("rel_err_fp8_vs_bf16", {})[name] = err
                    report(name, bench_ms(lambda: fp8(batch), repeat=args.repeat))
                except Exception as exc:
                    print(f"{shape} {name}: FAILED {type(exc).__name__}: {exc}", flush=True)
                    entry["ms"][name] = f"failed: {exc}"
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shapes", default="640x4,640x2,640x8,1024x4", help="resolution x layers, comma separated")
    parser.add_argument("--backends", default="sdpa,sdpa:cudnn,sdpa:flash,triton")
    parser.add_argument("--fp8-backends", default="auto",
                        help="attention backends for the FP8 rows, comma separated ('' skips FP8)")
    parser.add_argument("--no-diffusers", action="store_true")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/forward.py needs a CUDA GPU")

    torch.backends.cuda.matmul.allow_tf32 = True
    gemm = gemm_tflops()
    print(f"device {torch.cuda.get_device_name()}  bf16 GEMM {gemm:.0f} TFLOP/s", flush=True)
    ours = random_transformer()
    ref = None if args.no_diffusers else diffusers_transformer_sharing(ours)
    gen = torch.Generator("cuda").manual_seed(0)
    rows, results = [], {"gemm_tflops": gemm, "device": torch.cuda.get_device_name(), "shapes": []}
    fp8 = None
    if args.fp8_backends and torch.cuda.get_device_capability() >= (8, 9):
        results["fp8_gemm_tflops"] = fp8_gemm_tflops()
        print(f"fp8 GEMM (row-wise scales) {results['fp8_gemm_tflops']:.0f} TFLOP/s", flush=True)
        fp8 = fp8_transformer_sharing(ours)
    elif args.fp8_backends:
        print("fp8 skipped: needs compute capability 8.9+", flush=True)

    for shape in args.shapes.split(","):
        results["shapes"].append(bench_shape(shape, ours, ref, fp8, gen, gemm, args, rows))
        torch.cuda.empty_cache()

    write_results("forward.json", results)
    print(f"\nbf16 GEMM {gemm:.0f} TFLOP/s on {torch.cuda.get_device_name()}; one CFG step (cond+uncond)")
    print(f"{'shape':8s} {'impl':22s} {'ms':>9s} {'TFLOP/s':>10s} {'%GEMM':>6s}")
    for shape, name, ms, tflops, pct in rows:
        print(f"{shape:8s} {name:22s} {ms:9.1f} {tflops:10.0f} {pct:6.1f}")
    for entry in results["shapes"]:
        if "rel_err_vs_diffusers" in entry:
            print(entry["shape"], "rel err vs diffusers (bf16):",
                  {k: f"{v:.2e}" for k, v in entry["rel_err_vs_diffusers"].items()})
        if "rel_err_fp8_vs_bf16" in entry:
            print(entry["shape"], "rel err fp8 vs ours bf16:",
                  {k: f"{v:.2e}" for k, v in entry["rel_err_fp8_vs_bf16"].items()})


if __name__ == "__main__":
    main()
