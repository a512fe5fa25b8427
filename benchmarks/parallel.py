"""One request spread over several GPUs: CFG-parallel and Ulysses sequence-parallel vs one GPU, in ONE run.

Random full-size bf16 weights (each rank draws the same seeded weights on its GPU), optionally quantized to FP8
(``--quantization fp8``, with ``--attention-dtype fp8`` FP8 attention too) on every rank. The whole pipeline
runs on GPU 0 as in compare.py (given prompt embeddings, VAE encode, 50 steps with CFG, VAE decode to PIL);
only the transformer is spread. For each layout: parity of one packed forward with the one-GPU forward
(relative error), the mean pixel difference of the final layers from the one-GPU run's, and seconds per
request (median of ``--repeat``).

    python benchmarks/parallel.py [--layouts 2x1,1x2] [--steps 50] [--resolution 640] [--layers 4]
                                  [--quantization fp8] [--attention-dtype fp8]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import bench_ms, write_results, write_text  # noqa: E402
from benchmarks.compare import CAPTION, NEGATIVE, input_image  # noqa: E402
from benchmarks.pipeline_step import random_pipeline, timed  # noqa: E402
from vllm_layered.model_executor.denoise import build_forward_batch  # noqa: E402
from vllm_layered.model_executor.model_loader.dummy_checkpoint import full_size_model_folder  # noqa: E402
from vllm_layered.model_executor.models.fp8_attention import ATTENTION_DTYPES  # noqa: E402
from vllm_layered.model_executor.parallel import ParallelConfig, ParallelTransformer  # noqa: E402
from vllm_layered.model_executor.parallel.executor import CheckpointTransformer  # noqa: E402
from vllm_layered.model_executor.pipeline import GenerationParams  # noqa: E402


def parse_layouts(spec: str) -> list[ParallelConfig]:
    """"2x1,1x2" -> CFG degree x sequence-parallel degree."""
    layouts = []
    for part in spec.split(","):
        cfg, sp = (int(v) for v in part.split("x"))
        layouts.append(ParallelConfig(cfg_degree=cfg, sp_degree=sp))
    return layouts


def request(pipe, image, cond, neg, args, seed: int = 0, steps: int | None = None):
    return pipe(image, prompt=CAPTION, negative_prompt=NEGATIVE, prompt_embeds=cond[None],
                negative_prompt_embeds=neg[None], true_cfg_scale=4.0, layers=args.layers,
                resolution=args.resolution, num_inference_steps=steps or args.steps, seed=seed)


def measure(pipe, image, cond, neg, args) -> tuple[float, list[float], np.ndarray]:
    request(pipe, image, cond, neg, args, steps=2)  # one-time costs
    times = []
    for _ in range(args.repeat):
        output, seconds = timed(lambda: request(pipe, image, cond, neg, args))
        times.append(seconds)
    layers = np.stack([np.asarray(layer, dtype=np.float32) for layer in output.layers])
    return statistics.median(times), times, layers


def profile(transformer, batch, name: str) -> None:
    """Rank 0's view of one forward: where its time goes (its share, waiting in collectives, host work)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        transformer(batch)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
    cpu = prof.key_averages().table(sort_by="cpu_time_total", row_limit=15)
    write_text(name, table + "\n\n" + cpu)
    print(table[:3000], flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layouts", type=parse_layouts, default=parse_layouts("2x1,1x2"))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--resolution", type=int, default=640)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--profile", action="store_true", help="write rank 0's op profile of one forward")
    parser.add_argument("--quantization", choices=("none", "fp8"), default="none", help="every rank's transformer")
    parser.add_argument("--attention-dtype", choices=ATTENTION_DTYPES, default="bf16",
                        help="fp8 needs --quantization fp8")
    args = parser.parse_args()

    quantization = None if args.quantization == "none" else args.quantization
    pipe = random_pipeline(quantization, args.attention_dtype)
    factory = CheckpointTransformer(full_size_model_folder() / "transformer", pipe.dtype, quantization,
                                    args.attention_dtype, load_format="dummy")
    single = pipe.transformer
    image = input_image(args.resolution)
    params = GenerationParams(layers=args.layers, resolution=args.resolution)
    rows = []
    with torch.no_grad():
        cond, neg, _ = pipe.encode_prompts(image, CAPTION, NEGATIVE, params)
        state = pipe.prepare(image, params, cond, neg, generator=torch.Generator().manual_seed(0))
        batch = build_forward_batch([state], pipe.dtype)
        expected = single(batch)
        base_s, base_all, base_layers = measure(pipe, image, cond, neg, args)
        rows.append(dict(layout="1 GPU", gpus=1, seconds=base_s, all_s=base_all, speedup=1.0,
                         forward_ms=bench_ms(lambda: single(batch)),
                         branch_alone_ms=[bench_ms(lambda: single(batch.select([i])))  # noqa: B023
                                          for i in range(batch.num_sequences)]))
        print(rows[-1], flush=True)
        for config in args.layouts:
            pipe.transformer = ParallelTransformer.launch(single, factory, config, pipe.device)
            try:
                got = pipe.transformer(batch)
                forward_err = ((got.float() - expected.float()).norm() / expected.float().norm()).item()
                forward_ms = bench_ms(lambda: pipe.transformer(batch))  # noqa: B023
                if args.profile:
                    profile(pipe.transformer, batch, f"profile_cfg{config.cfg_degree}_sp{config.sp_degree}.txt")
                seconds, all_s, layers = measure(pipe, image, cond, neg, args)
            finally:
                pipe.transformer.close()
                pipe.transformer = single
            rows.append(dict(layout=f"cfg {config.cfg_degree} x sp {config.sp_degree}", gpus=config.world_size,
                             seconds=seconds, all_s=all_s, speedup=base_s / seconds, forward_ms=forward_ms,
                             forward_rel_err=forward_err,
                             layers_mean_abs_diff=float(np.abs(layers - base_layers).mean()),
                             layers_max_abs_diff=float(np.abs(layers - base_layers).max())))
            print(rows[-1], flush=True)

    device = torch.cuda.get_device_name()
    write_results("parallel.json", dict(args={**vars(args), "layouts": [str(c) for c in args.layouts]},
                                        device=device, torch=torch.__version__, rows=rows))
    print(f"\none request {args.resolution}/{args.layers} layers/{args.steps} steps/CFG, given embeddings, "
          f"quantization {args.quantization}, attention {args.attention_dtype}, "
          f"on {torch.cuda.device_count()} x {device}")
    print(f"{'layout':14s} {'GPUs':>4s} {'s/request':>9s} {'speedup':>8s} {'fwd ms':>7s} {'fwd rel err':>11s} "
          f"{'px mean diff':>12s}")
    for r in rows:
        err = f"{r['forward_rel_err']:11.2e} {r['layers_mean_abs_diff']:12.3f}" if "forward_rel_err" in r else ""
        print(f"{r['layout']:14s} {r['gpus']:4d} {r['seconds']:9.2f} {r['speedup']:7.2f}x {r['forward_ms']:7.1f} {err}")
    print(f"each CFG branch alone on 1 GPU: {', '.join(f'{ms:.1f} ms' for ms in rows[0]['branch_alone_ms'])}")


if __name__ == "__main__":
    main()
