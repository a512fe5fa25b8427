"""The whole pipeline at full size (random bf16 weights) on one GPU: peak memory and stage times.

Text encoder (Qwen2.5-VL-7B geometry), transformer (20.4B) and RGBA-VAE all resident, one request at
640 with 4 layers and CFG: text encoding, VAE encode, N denoising steps, VAE decode of the layers.

    python benchmarks/pipeline_step.py [--steps 1] [--layers 4] [--resolution 640]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import random_text_encoder, random_transformer, random_vae, write_results  # noqa: E402
from vllm_layered.model_executor.models.text_encoder import PromptEncoder  # noqa: E402
from vllm_layered.model_executor.pipeline import GenerationParams, LayeredPipeline  # noqa: E402
from vllm_layered.model_executor.sampler import SchedulerConfig  # noqa: E402
from vllm_layered.model_executor.tiny_checkpoint import make_tiny_checkpoint  # noqa: E402

CAPTION = " ".join(["a red fox sitting on a wooden bench in a snowy park with pine trees"] * 14)


def random_pipeline() -> LayeredPipeline:
    """Full-size random pipeline; the tokenizer comes from the tiny checkpoint (token ids fit the vocab)."""
    from transformers import AutoTokenizer

    root = make_tiny_checkpoint(Path(tempfile.mkdtemp()) / "tiny")
    encoder = PromptEncoder(random_text_encoder(), AutoTokenizer.from_pretrained(root / "tokenizer"),
                            root / "processor")
    return LayeredPipeline(
        transformer=random_transformer(), vae=random_vae(), prompt_encoder=encoder,
        scheduler_config=SchedulerConfig.from_json(root / "scheduler" / "scheduler_config.json"),
        device=torch.device("cuda"), dtype=torch.bfloat16,
    )


def timed(fn):
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - start


def run_request(pipe: LayeredPipeline, image: Image.Image, params: GenerationParams, steps: int):
    """Each stage of one request, timed: (seconds per stage, (cond embeds, neg embeds, layers))."""
    (cond, neg, _), text_s = timed(lambda: pipe.encode_prompts(image, CAPTION, " ", params))
    state, prep_s = timed(lambda: pipe.prepare(image, params, cond, neg, generator=torch.Generator().manual_seed(0)))
    _, denoise_s = timed(lambda: [pipe.denoise_step([state]) for _ in range(steps)])
    layers, decode_s = timed(lambda: pipe.decode(state))
    return (text_s, prep_s, denoise_s, decode_s), (cond, neg, layers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=640)
    args = parser.parse_args()

    pipe, build_s = timed(random_pipeline)
    weights_gb = torch.cuda.memory_allocated() / 1e9
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (args.resolution, args.resolution, 4),
                                                              dtype=np.uint8), "RGBA")
    params = GenerationParams(layers=args.layers, resolution=args.resolution, num_inference_steps=args.steps)
    with torch.no_grad():
        for _ in range(2):  # the second round is the measured one (the first pays one-time costs)
            torch.cuda.reset_peak_memory_stats()
            stage_s, (cond, neg, layers) = run_request(pipe, image, params, args.steps)
    peak = torch.cuda.max_memory_allocated() / 1e9
    reserved = torch.cuda.max_memory_reserved() / 1e9
    results = dict(
        device=torch.cuda.get_device_name(), build_s=build_s, weights_gb=weights_gb, peak_allocated_gb=peak,
        peak_reserved_gb=reserved, text_tokens=[cond.shape[0], neg.shape[0]], text_encode_s=stage_s[0],
        vae_encode_s=stage_s[1], denoise_step_s=stage_s[2] / args.steps, vae_decode_s=stage_s[3],
        layers=len(layers), resolution=args.resolution,
    )
    write_results("pipeline_step.json", results)
    print(f"\nwhole pipeline, {args.resolution}/{args.layers} layers/CFG on {results['device']}")
    for key, value in results.items():
        print(f"  {key:18s} {value:.3f}" if isinstance(value, float) else f"  {key:18s} {value}")


if __name__ == "__main__":
    main()
