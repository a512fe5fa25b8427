"""The whole pipeline at full size (random bf16 weights) on one GPU: peak memory and stage times.

Text encoder (Qwen2.5-VL-7B geometry), transformer (20.4B) and RGBA-VAE all resident, one request at
640 with 4 layers and CFG: text encoding, VAE encode, N denoising steps, VAE decode of the layers.

    python benchmarks/pipeline_step.py [--steps 1] [--layers 4 [20 ...]] [--resolution 640]

Per layer count it also prints the VAE decode's peak memory: GPU allocated above what was allocated before it,
and host resident (VmHWM, reset before the decode; Linux).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import write_results  # noqa: E402
from vllm_layered.model_executor.model_loader.dummy_checkpoint import full_size_model_folder  # noqa: E402
from vllm_layered.model_executor.pipeline import GenerationParams, LayeredPipeline  # noqa: E402

CAPTION = " ".join(["a red fox sitting on a wooden bench in a snowy park with pine trees"] * 14)


def random_pipeline(quantization: str | None = None, attention_dtype: str | None = None) -> LayeredPipeline:
    """The full-size pipeline with seeded random bf16 weights on the GPU (``--load-format dummy``)."""
    return LayeredPipeline.from_pretrained(full_size_model_folder(), device="cuda", dtype=torch.bfloat16,
                                           quantization=quantization, attention_dtype=attention_dtype,
                                           load_format="dummy")


def timed(fn):
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - start


def host_peak_gb() -> float:
    """The process's peak resident memory (VmHWM) since the last reset_host_peak(), in GB."""
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1]) / 1e6


def reset_host_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM to the current resident size


def run_request(pipe: LayeredPipeline, image: Image.Image, params: GenerationParams, steps: int):
    """Each stage of one request, timed: (seconds per stage, (cond embeds, neg embeds, layers), decode peaks:
    GPU allocated above the weights and host resident, both in GB)."""
    (cond, neg, _), text_s = timed(lambda: pipe.encode_prompts(image, CAPTION, " ", params))
    state, prep_s = timed(lambda: pipe.prepare(image, params, cond, neg, generator=torch.Generator().manual_seed(0)))
    _, denoise_s = timed(lambda: [pipe.denoise_step([state]) for _ in range(steps)])
    torch.cuda.reset_peak_memory_stats()
    reset_host_peak()
    before_gpu, before_host = torch.cuda.memory_allocated(), host_peak_gb()
    layers, decode_s = timed(lambda: pipe.decode(state))
    decode_peaks = ((torch.cuda.max_memory_allocated() - before_gpu) / 1e9, host_peak_gb() - before_host)
    return (text_s, prep_s, denoise_s, decode_s), (cond, neg, layers), decode_peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--layers", type=int, nargs="+", default=[4], help="one row per layer count")
    parser.add_argument("--resolution", type=int, default=640)
    args = parser.parse_args()

    pipe, build_s = timed(random_pipeline)
    weights_gb = torch.cuda.memory_allocated() / 1e9
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (args.resolution, args.resolution, 4),
                                                              dtype=np.uint8), "RGBA")
    rows = []
    for layers_count in args.layers:
        params = GenerationParams(layers=layers_count, resolution=args.resolution, num_inference_steps=args.steps)
        with torch.no_grad():
            for _ in range(2):  # the second round is the measured one (the first pays one-time costs)
                torch.cuda.reset_peak_memory_stats()
                stage_s, (cond, neg, layers), decode_peaks = run_request(pipe, image, params, args.steps)
        results = dict(
            device=torch.cuda.get_device_name(), build_s=build_s, weights_gb=weights_gb,
            peak_reserved_gb=torch.cuda.max_memory_reserved() / 1e9, text_tokens=[cond.shape[0], neg.shape[0]],
            text_encode_s=stage_s[0], vae_encode_s=stage_s[1], denoise_step_s=stage_s[2] / args.steps,
            vae_decode_s=stage_s[3], decode_gpu_peak_gb=decode_peaks[0], decode_host_peak_gb=decode_peaks[1],
            layers=len(layers), resolution=args.resolution,
        )
        rows.append(results)
        print(f"\nwhole pipeline, {args.resolution}/{layers_count} layers/CFG on {results['device']}", flush=True)
        for key, value in results.items():
            print(f"  {key:20s} {value:.3f}" if isinstance(value, float) else f"  {key:20s} {value}", flush=True)
    write_results("pipeline_step.json", rows)


if __name__ == "__main__":
    main()
