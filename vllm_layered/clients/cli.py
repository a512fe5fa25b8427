"""``vllm-layered client decompose IMAGE --base-url URL --out DIR``: decompose through a server."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import httpx

from vllm_layered.clients.client import LayeredAPIError, LayeredClient, Progress


def _print_progress(progress: Progress) -> None:
    if progress.stage == "queued":
        print(f"queued at position {progress.queue_position}", file=sys.stderr)
    elif progress.stage == "step":
        print(f"step {progress.step}/{progress.num_steps}", file=sys.stderr)
    else:
        print(progress.stage, file=sys.stderr)


def decompose(args: argparse.Namespace) -> int:
    """PNG: DIR/layer_00.png ... DIR/composite.png; zip/psd/pptx: DIR/<image name>.<format>."""
    out = Path(args.out)
    try:
        with LayeredClient(args.base_url, args.api_key, model=args.model) as client:
            layers = client.decompose(
                args.image,
                prompt=args.prompt,
                layers=args.layers,
                resolution=args.resolution,
                steps=args.steps,
                seed=args.seed,
                on_progress=None if args.quiet else _print_progress,
            )
    except (LayeredAPIError, httpx.HTTPError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.format == "png":
        written = layers.save_pngs(out)
    else:
        out.mkdir(parents=True, exist_ok=True)
        save = {"zip": layers.save_zip, "psd": layers.save_psd, "pptx": layers.save_pptx}[args.format]
        written = [save(out / f"{Path(args.image).stem}.{args.format}")]
    for path in written:
        print(path)
    return 0
