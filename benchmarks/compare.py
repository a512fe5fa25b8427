"""End to end per request, our LayeredPipeline vs diffusers' QwenImageLayeredPipeline, in ONE run on one GPU.

Random full-size bf16 weights (speed does not depend on their values); diffusers' transformer shares our
weight tensors, and both pipelines get the same input image, the same prompt embeddings (made once by our
text encoder, outside the timed region: "text encoding from given embeddings") and the same seed. Timed per
request: VAE encode of the condition image, every denoising step (CFG: two forwards each), VAE decode of the
layers to PIL images.

Compute floor (docs/cost_model.md): the FLOPs of all transformer forwards of the request divided by the
bf16 GEMM rate measured in this run; each pipeline is reported as seconds, seconds / floor and floor % .

With ``--fp8`` our pipeline is also timed with quantization='fp8' (FP8 GEMMs, bf16 attention), and with
``--attention-dtype fp8`` (implies --fp8) once more with FP8 attention on top; each FP8 variant's layers are compared
with ours in bf16 for the same request (mean and p99 |diff| in /255).

    python benchmarks/compare.py [--configs 640x4,1024x4] [--steps 50] [--repeat 1] [--no-diffusers] [--fp8]
                                 [--attention-dtype bf16|fp8]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import forward_flops, fp8_pipeline_sharing, gemm_tflops, write_results  # noqa: E402
from benchmarks.engine import diffusers_pipeline  # noqa: E402
from benchmarks.pipeline_step import CAPTION, random_pipeline, timed  # noqa: E402
from vllm_layered.model_executor.image_processing import bucket_size  # noqa: E402
from vllm_layered.model_executor.models.fp8_attention import ATTENTION_DTYPES, set_attention_dtype  # noqa: E402
from vllm_layered.model_executor.pipeline import GenerationParams  # noqa: E402

CFG_SCALE = 4.0
NEGATIVE = " "


def parse_configs(spec: str) -> list[tuple[int, int]]:
    """"640x4,1024x4" -> [(640, 4), (1024, 4)] (resolution x layers)."""
    try:
        configs = [tuple(int(v) for v in part.split("x")) for part in spec.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"configs are RESxLAYERS,...: {spec!r}") from None
    if not configs or any(len(c) != 2 for c in configs):
        raise argparse.ArgumentTypeError(f"configs are RESxLAYERS,...: {spec!r}")
    return configs


def input_image(resolution: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (resolution, resolution, 4), dtype=np.uint8), "RGBA")


def request_flops(image: Image.Image, resolution: int, layers: int, steps: int, text_lens: list[int]) -> float:
    """All forwards of one request: per step one forward per CFG branch, L = (layers+2)*h*w + text tokens."""
    width, height = bucket_size(image.width, image.height, resolution)
    image_tokens = (layers + 2) * (height // 16) * (width // 16)
    return steps * forward_flops([image_tokens + t for t in text_lens])


def run_ours(pipe, image, cond, neg, steps: int, seed: int, **common):
    return pipe(image, prompt=CAPTION, negative_prompt=NEGATIVE, prompt_embeds=cond[None],
                negative_prompt_embeds=neg[None], num_inference_steps=steps, seed=seed, **common)


def run_diffusers(ref, image, cond, neg, steps: int, seed: int, **common) -> None:
    ref(image, prompt=CAPTION, prompt_embeds=cond[None], negative_prompt_embeds=neg[None], num_inference_steps=steps,
        generator=torch.Generator(ref.device).manual_seed(seed), **common)


def run_ours_attention(pipe, attention_dtype: str, *args, **kwargs):
    """Our FP8 pipeline with its attention switched to ``attention_dtype`` first (a no-op once it is)."""
    if pipe.transformer.attention_dtype != attention_dtype:
        set_attention_dtype(pipe.transformer, attention_dtype)
    return run_ours(pipe, *args, **kwargs)


def measure(pipe, fp8_pipe, ref, resolution: int, layers: int, args: argparse.Namespace, gemm: float) -> dict:
    """One config: the floor, then each pipeline (warm-up request, then the median of ``repeat`` timed ones)."""
    image = input_image(resolution)
    cond, neg, _ = pipe.encode_prompts(image, CAPTION, NEGATIVE, GenerationParams(layers=layers))
    common = dict(true_cfg_scale=CFG_SCALE, layers=layers, resolution=resolution, cfg_normalize=True)
    flops = request_flops(image, resolution, layers, args.steps, [cond.shape[0], neg.shape[0]])
    row = dict(resolution=resolution, layers=layers, steps=args.steps, cfg=CFG_SCALE,
               text_tokens=[cond.shape[0], neg.shape[0]], tflop=flops / 1e12, floor_s=flops / (gemm * 1e12))
    runs = {"ours": functools.partial(run_ours, pipe)}
    if fp8_pipe is not None:  # one FP8 transformer, its attention switched per variant
        runs["ours_fp8"] = functools.partial(run_ours_attention, fp8_pipe, "bf16")
        if args.attention_dtype == "fp8":
            runs["ours_fp8_attn"] = functools.partial(run_ours_attention, fp8_pipe, "fp8")
    if ref is not None:
        runs["diffusers"] = functools.partial(run_diffusers, ref)
    outputs = {}
    for name, run in runs.items():
        run(image, cond, neg, args.warmup_steps, 0, **common)  # one-time costs: kernels, autotuning, cuDNN graphs
        times = []
        for _ in range(args.repeat):  # seed 0 every time, so the pipelines' outputs are comparable
            outputs[name], seconds = timed(functools.partial(run, image, cond, neg, args.steps, 0, **common))
            times.append(seconds)
        seconds = statistics.median(times)
        row.update({f"{name}_s": seconds, f"{name}_all_s": times, f"{name}_vs_floor": seconds / row["floor_s"],
                    f"{name}_floor_pct": 100 * row["floor_s"] / seconds})
    if ref is not None:
        row["speedup"] = row["diffusers_s"] / row["ours_s"]
    ours = np.stack([np.asarray(x, np.float32) for x in outputs["ours"].layers])
    for name, prefix in (("ours_fp8", "fp8"), ("ours_fp8_attn", "fp8_attn")):
        if name in outputs:  # FP8's price in pixels: the same request (seed, inputs) decoded, against bf16
            diff = np.abs(np.stack([np.asarray(x, np.float32) for x in outputs[name].layers]) - ours)
            row[f"{prefix}_px_mean_abs_diff"] = float(diff.mean())
            row[f"{prefix}_px_p99_abs_diff"] = float(np.percentile(diff, 99))
            row[f"{prefix}_speedup_vs_bf16"] = row["ours_s"] / row[f"{name}_s"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", type=parse_configs, default=parse_configs("640x4,1024x4"),
                        help="RESxLAYERS,... (default 640x4,1024x4)")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps per request (shorten for a try)")
    parser.add_argument("--repeat", type=int, default=1, help="timed requests per pipeline and config (median)")
    parser.add_argument("--warmup-steps", type=int, default=2, help="steps of the untimed warm-up request")
    parser.add_argument("--no-diffusers", action="store_true", help="time our pipeline only")
    parser.add_argument("--fp8", action="store_true",
                        help="also time ours with quantization='fp8' and its pixel difference from bf16")
    parser.add_argument("--attention-dtype", default="bf16", choices=ATTENTION_DTYPES,
                        help="fp8: also time ours with FP8 GEMMs and FP8 attention (implies --fp8)")
    args = parser.parse_args()
    args.fp8 = args.fp8 or args.attention_dtype == "fp8"
    if not torch.cuda.is_available():
        sys.exit("compare.py needs a CUDA GPU")

    pipe = random_pipeline()
    ref = None if args.no_diffusers else diffusers_pipeline(pipe)
    fp8_pipe = fp8_pipeline_sharing(pipe) if args.fp8 else None
    gemm = gemm_tflops()
    rows = []
    with torch.no_grad():
        for resolution, layers in args.configs:
            rows.append(measure(pipe, fp8_pipe, ref, resolution, layers, args, gemm))
            print(rows[-1], flush=True)

    device = torch.cuda.get_device_name()
    write_results("compare.json", dict(args={**vars(args), "configs": args.configs}, device=device,
                                       gemm_tflops=gemm, torch=torch.__version__, rows=rows))
    print(f"\nend to end per request, {args.steps} steps, CFG {CFG_SCALE}, given embeddings, on {device}; "
          f"bf16 GEMM {gemm:.0f} TFLOP/s")
    print(f"{'config':10s} {'floor s':>8s} {'ours s':>8s} {'x floor':>8s} {'floor %':>8s} "
          f"{'diffusers s':>11s} {'x floor':>8s} {'floor %':>8s} {'speedup':>8s}")
    for r in rows:
        for name, prefix, label in (("ours_fp8", "fp8", "fp8"), ("ours_fp8_attn", "fp8_attn", "fp8 + fp8 attention")):
            if f"{name}_s" in r:
                print(f"{r['resolution']}x{r['layers']} {label}: {r[f'{name}_s']:.2f} s "
                      f"({r[f'{name}_floor_pct']:.1f}% of the bf16 floor, {r[f'{prefix}_speedup_vs_bf16']:.2f}x bf16), "
                      f"layers vs bf16: mean |diff| "
                      f"{r[f'{prefix}_px_mean_abs_diff']:.2f}/255, p99 {r[f'{prefix}_px_p99_abs_diff']:.0f}/255")
    for r in rows:
        theirs = (f"{r['diffusers_s']:11.2f} {r['diffusers_vs_floor']:8.2f} {r['diffusers_floor_pct']:8.1f} "
                  f"{r['speedup']:7.2f}x" if "diffusers_s" in r else f"{'-':>11s}")
        print(f"{r['resolution']}x{r['layers']:<6d} {r['floor_s']:8.2f} {r['ours_s']:8.2f} {r['ours_vs_floor']:8.2f} "
              f"{r['ours_floor_pct']:8.1f} {theirs}")


if __name__ == "__main__":
    main()
