"""``vllm-layered decompose IMAGE``: one image into RGBA layers on this machine, and with ``--refine`` some
of them again, as a tree (LayeredPipeline.decompose_tree).

Each stage (load, caption, denoise, decode, and per level of refinements: refine, denoise, decode; then write)
is labelled on stderr with its time; stdout gets only the written paths. torch and the model load inside
``decompose``, so importing this module stays light.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vllm_layered.clients.output import OutputTarget
    from vllm_layered.layer_tree import TreeJob

DEFAULT_STEPS = 50
# The embedded tiny model's layers are noise whatever the step count: few steps keep its first run short.
EMBEDDED_MODEL_STEPS = 10


class CommandError(Exception):
    """A command cannot go on; the CLI prints the message, with no traceback."""


def decompose(args: argparse.Namespace, target: OutputTarget) -> int:
    """Run ``decompose`` with its parsed ``args``; ``target`` is where the layers go (checked already)."""
    from vllm_layered.clients.output import resize_tree
    from vllm_layered.formats import save_tree
    from vllm_layered.layer_tree import parse_refinements, plan_refinements
    from vllm_layered.model_args import load_pipeline, quantization
    from vllm_layered.model_executor.image_processing import bucket_size, load_image
    from vllm_layered.model_executor.models.text_encoder import CaptionUnavailableError
    from vllm_layered.model_executor.pipeline import MAX_LAYERS, GenerationParams
    from vllm_layered.model_executor.summary import describe_pipeline

    # check the input before loading a 54 GB model
    image = load_image(args.image)
    embedded = args.model is None and args.load_format != "dummy"
    steps = args.steps if args.steps is not None else EMBEDDED_MODEL_STEPS if embedded else DEFAULT_STEPS
    GenerationParams(layers=args.layers, resolution=args.resolution, num_inference_steps=steps)
    refine = plan_refinements(parse_refinements(args.refine), root_layers=args.layers, max_layers=MAX_LAYERS)
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

    progress = _TreeProgress(stages, steps)
    try:
        tree = pipe.decompose_tree(
            image,
            refine=refine,
            prompt=prompt,
            negative_prompt=args.negative_prompt if args.true_cfg_scale > 1 else None,
            true_cfg_scale=args.true_cfg_scale,
            cfg_normalize=not args.no_cfg_normalize,
            layers=args.layers,
            resolution=args.resolution,
            num_inference_steps=steps,
            seed=args.seed,
            use_en_prompt=not args.chinese_caption,
            callback=progress.step,
            stage_callback=progress.stage,
        )
    finally:
        progress.close()
    if args.keep_size:
        tree = resize_tree(tree, image.size)
    stages.begin(f"write {target.path}")
    written = save_tree(tree, target.path, target.format)
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


class _TreeProgress:
    """The stages of decompose_tree on stderr: per level, the refinements' preparation ("refine 1:2, 2:3": crops,
    captions, encoding; the root's is part of its denoise bar, as before trees), a bar of denoising steps, and
    the decode."""

    def __init__(self, stages: _Stages, steps: int) -> None:
        self.stages = stages
        self.steps = steps
        self.bar = None

    def stage(self, name: str, jobs: list[TreeJob]) -> None:
        from tqdm import tqdm

        root = jobs[0].path is None
        if name == "prepare" and not root:
            self.stages.begin("refine " + ", ".join(f"{job.path}:{job.layers}" for job in jobs))
        elif name == "denoise":
            self.stages.end()
            label = "denoise" if root else "denoise " + ", ".join(job.path for job in jobs)
            self.bar = tqdm(total=self.steps, desc=label, unit="step", disable=self.stages.quiet)
        elif name == "decode":
            self.close()
            layers = sum(job.layers for job in jobs)
            self.stages.begin(f"decode {layers} layer{'s' if layers > 1 else ''}")

    def step(self, step: int, total: int) -> None:
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


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
