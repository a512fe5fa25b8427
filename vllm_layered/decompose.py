"""``vllm-layered decompose IMAGE``: one image into RGBA layers on this machine.

Each stage (load, caption, denoise, decode, write) is labelled on stderr with its time; stdout gets only the
written paths. torch and the model load inside ``decompose``, so importing this module stays light.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vllm_layered.clients.output import OutputTarget

DEFAULT_STEPS = 50
# The embedded tiny model's layers are noise whatever the step count: few steps keep its first run short.
EMBEDDED_MODEL_STEPS = 10


class CommandError(Exception):
    """A command cannot go on; the CLI prints the message, with no traceback."""


def decompose(args: argparse.Namespace, target: OutputTarget) -> int:
    """Run ``decompose`` with its parsed ``args``; ``target`` is where the layers go (checked already)."""
    from tqdm import tqdm

    from vllm_layered.clients.output import resize_layers
    from vllm_layered.model_args import load_pipeline, quantization
    from vllm_layered.model_executor.export import save_layers
    from vllm_layered.model_executor.image_processing import bucket_size, load_image
    from vllm_layered.model_executor.models.text_encoder import CaptionUnavailableError
    from vllm_layered.model_executor.pipeline import GenerationParams
    from vllm_layered.model_executor.summary import describe_pipeline

    # check the input before loading a 54 GB model
    image = load_image(args.image)
    embedded = args.model is None and args.load_format != "dummy"
    steps = args.steps if args.steps is not None else EMBEDDED_MODEL_STEPS if embedded else DEFAULT_STEPS
    GenerationParams(layers=args.layers, resolution=args.resolution, num_inference_steps=steps)
    bucket = bucket_size(image.width, image.height, args.resolution)
    stages = _Stages(quiet=args.quiet)
    if args.quiet:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    if embedded:
        stages.say(f"no --model: the embedded tiny random model, {steps} steps; its layers are noise (for real "
                   "layers pass --model Qwen/Qwen-Image-Layered)")
    stages.begin("load")
    pipe, _ = load_pipeline(args, on_write=lambda path: stages.say(f"first use: writing it to {path}"))
    stages.end()
    stages.say(f"model: {describe_pipeline(pipe, model=args.model, quantization=quantization(args))}")
    stages.say(_size_note(image.size, bucket, args.resolution, args.keep_size))
    prompt = args.prompt
    if not prompt or not prompt.strip():
        stages.begin("caption")
        try:
            prompt = pipe.caption(image, use_en_prompt=not args.chinese_caption)
        except CaptionUnavailableError as exc:
            raise CommandError(str(exc)) from exc
        stages.end()
        stages.say(f"caption: {_shorten(prompt)}")

    def on_step(step: int, total: int) -> None:
        bar.update(1)
        if step == total:  # the pipeline decodes right after its last step
            bar.close()
            stages.begin(f"decode {args.layers} layer{'s' if args.layers > 1 else ''}")

    with tqdm(total=steps, desc="denoise", unit="step", disable=args.quiet) as bar:
        result = pipe(
            image,
            prompt=prompt,
            negative_prompt=args.negative_prompt if args.true_cfg_scale > 1 else None,
            true_cfg_scale=args.true_cfg_scale,
            cfg_normalize=not args.no_cfg_normalize,
            layers=args.layers,
            resolution=args.resolution,
            num_inference_steps=steps,
            seed=args.seed,
            use_en_prompt=not args.chinese_caption,
            callback=on_step,
        )
    layers = resize_layers(result.layers, image.size) if args.keep_size else result.layers
    stages.begin(f"write {target.path}")
    written = save_layers(layers, target.path, target.format)
    stages.end()
    for path in written:
        print(path)
    return 0


class _Stages:
    """Labelled stages on stderr (stdout carries the written paths): "caption ..." when one begins,
    "caption: 0.8 s" when it ends. --quiet drops them."""

    def __init__(self, *, quiet: bool) -> None:
        self.quiet = quiet
        self.label: str | None = None
        self.start = 0.0

    def say(self, message: str) -> None:
        if not self.quiet:
            print(message, file=sys.stderr, flush=True)

    def begin(self, label: str) -> None:
        self.end()
        self.label, self.start = label, time.perf_counter()
        self.say(f"{label} ...")

    def end(self) -> None:
        if self.label is not None:
            self.say(f"{self.label}: {time.perf_counter() - self.start:.1f} s")
            self.label = None


def _size_note(size: tuple[int, int], bucket: tuple[int, int], resolution: int, keep_size: bool) -> str:
    (width, height), (bucket_width, bucket_height) = size, bucket
    where = f"the {resolution} bucket, {bucket_width}x{bucket_height}"
    if keep_size:
        return f"size: the input is {width}x{height}; decomposed at {where}; layers resized back to {width}x{height}"
    if size == bucket:
        return f"size: {width}x{height}, the {resolution} bucket's size"
    return (
        f"size: the input is {width}x{height}; layers come at {where} (as in the official app); "
        f"--keep-size resizes them to {width}x{height}"
    )


def _shorten(text: str, limit: int = 120) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
