"""``vllm-layered client decompose IMAGE --base-url URL [--out PATH]``: decompose through a server.

Writes where ``vllm-layered decompose`` would, as it would (vllm_layered.clients.output; refined layers with
vllm_layered.formats.save_tree), checked before the upload.
"""

from __future__ import annotations

import argparse
import sys

import httpx
import openai
from PIL import Image, ImageOps

from vllm_layered.clients.client import LayeredAPIError, LayeredClient, LayeredConnectionError, Progress
from vllm_layered.clients.output import resize_tree, resolve_output
from vllm_layered.formats import save_tree
from vllm_layered.layer_tree import parse_refinements


def queue_position_text(position: int) -> str:
    """The server's 0-based queue position in words: 0 -> "1st in line", 1 -> "2nd in line", ..."""
    place = position + 1
    suffix = "th" if 10 <= place % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(place % 10, "th")
    return f"{place}{suffix} in line"


def _print_progress(progress: Progress) -> None:
    node = "" if progress.node is None else f"refine {progress.node}: "
    if progress.stage == "queued":
        print(f"queued: {queue_position_text(progress.queue_position or 0)}", file=sys.stderr)
    elif progress.stage == "step":
        print(f"{node}step {progress.step}/{progress.num_steps}", file=sys.stderr)
    else:
        print(f"{node}{progress.stage}", file=sys.stderr)


def _input_size(path) -> tuple[int, int] | None:
    """The input's (width, height) as the server sees it (EXIF orientation applied); None if Pillow cannot
    read it (the server then says why)."""
    try:
        with Image.open(path) as image:
            return ImageOps.exif_transpose(image).size
    except (OSError, ValueError):
        return None


def decompose(args: argparse.Namespace) -> int:
    """PNG: a folder of layer_00.png ... composite.png; zip/psd/pptx: one file (see clients.output)."""
    target = resolve_output(args.out, args.format, args.image)
    refine = parse_refinements(args.refine)  # their syntax before the upload; the server checks the rest
    size = _input_size(args.image)
    if args.keep_size and size is None:
        raise ValueError(f"--keep-size: cannot read the size of {args.image}")
    try:
        with LayeredClient(args.base_url, args.api_key, model=args.model) as client:
            layers = client.decompose(
                args.image,
                prompt=args.prompt,
                layers=args.layers,
                resolution=args.resolution,
                steps=args.steps,
                seed=args.seed,
                refine=refine,
                on_progress=None if args.quiet else _print_progress,
            )
    except (LayeredAPIError, LayeredConnectionError, httpx.HTTPError, openai.APIError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    tree = layers.tree
    if args.keep_size:
        tree = resize_tree(tree, size)
    elif size is not None and layers[0].size != size and not args.quiet:
        print(f"size: the input is {size[0]}x{size[1]}; layers come at the server's resolution bucket, "
              f"{layers[0].width}x{layers[0].height}; --keep-size resizes them to {size[0]}x{size[1]}", file=sys.stderr)
    written = save_tree(tree, target.path, target.format)
    for path in written:
        print(path)
    return 0
