"""Where ``decompose`` and ``client decompose`` write their layers: one rule for both, checked before any work.

- ``--format`` not given: taken from ``--out``'s extension (.zip, .psd, .pptx), else png.
- png: ``--out`` is a folder (created if needed) that gets layer_00.png (bottom) ... and composite.png; with
  ``--refine``, each refined layer also gets a folder of its children beside its file (vllm_layered.formats).
- zip, psd, pptx: ``--out`` is the file if it ends in that extension; a folder (one that exists, a path ending
  in "/", or a name without an extension) gets ``<input image name>.<format>``.

Anything else (a png folder that is a file, a .zip name with --format psd, a parent that is a file, a
missing psd-tools) is a ValueError naming the problem. Needs only pillow.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from vllm_layered.formats import PACKAGE_FORMATS, SAVE_FORMATS, missing_dependency
from vllm_layered.layer_tree import Box, LayerNode, LayerTree


@dataclass(frozen=True)
class OutputTarget:
    """``format`` and ``path``: for png the folder of files, for a package the file."""

    format: str
    path: Path


def resolve_output(out: str | os.PathLike, fmt: str | None, image: str | os.PathLike) -> OutputTarget:
    """Apply the rule above to ``--out``, ``--format`` (None: not given) and the input image's path."""
    raw = os.fspath(out)
    path = Path(raw).expanduser()
    suffix = path.suffix.lower().lstrip(".")
    names_folder = path.is_dir() or raw.endswith(("/", os.sep))
    if fmt is None:
        fmt = suffix if suffix in PACKAGE_FORMATS and not names_folder else "png"
    if fmt not in SAVE_FORMATS:
        raise ValueError(f"--format must be one of {', '.join(SAVE_FORMATS)}, got {fmt!r}")
    if fmt == "png":
        if path.exists() and not path.is_dir():
            raise ValueError(f"--out {raw} is a file; PNG layers go into a folder (or pass --format zip/psd/pptx)")
        if suffix in PACKAGE_FORMATS and not names_folder:
            raise ValueError(
                f"--out {raw} names a .{suffix} file, but --format png writes a folder: pass --format {suffix}, "
                "or a folder"
            )
        target = OutputTarget("png", path)
        _check_writable(path)
        return target
    if names_folder or (not suffix and not path.exists()):
        target = OutputTarget(fmt, path / f"{Path(image).stem}.{fmt}")
    elif suffix == fmt:
        target = OutputTarget(fmt, path)
    else:
        raise ValueError(
            f"--out {raw} must be a .{fmt} file or a folder for --format {fmt}"
            + (f" (it names a .{suffix} file)" if suffix else " (it is a file without the extension)")
        )
    if target.path.is_dir():
        raise ValueError(f"{target.path} is a folder; --format {fmt} writes a file there")
    _check_export_dependency(fmt)
    _check_writable(target.path.parent)
    return target


def resize_layers(layers: list[Image.Image], size: tuple[int, int]) -> list[Image.Image]:
    """The layers resampled to ``size`` (width, height) with Lanczos, as the input was resized to the bucket;
    Pillow resizes RGBA with premultiplied alpha, so colours under transparent pixels do not bleed."""
    return [layer.resize(size, resample=Image.Resampling.LANCZOS) for layer in layers]


def resize_tree(tree: LayerTree, size: tuple[int, int]) -> LayerTree:
    """The tree with every layer resampled to ``size`` as resize_layers does; frames (the regions each
    decomposition saw) scaled alike, rounded outward."""
    scale_x, scale_y = size[0] / tree.size[0], size[1] / tree.size[1]

    def frame(box: Box) -> Box:
        left, top, right, bottom = box
        return (math.floor(left * scale_x), math.floor(top * scale_y),
                math.ceil(right * scale_x), math.ceil(bottom * scale_y))

    def resized(nodes: list[LayerNode]) -> list[LayerNode]:
        images = resize_layers([node.image for node in nodes], size)
        return [LayerNode(node.path, image, frame(node.frame), resized(node.children), node.prompt)
                for node, image in zip(nodes, images)]

    return LayerTree(resized(tree.layers), tree.prompt, tree.seed)


def _check_writable(folder: Path) -> None:
    """The nearest existing folder on the way to ``folder`` must be a folder we may write in."""
    for ancestor in (folder, *folder.parents):
        if ancestor.exists():
            if not ancestor.is_dir():
                raise ValueError(f"cannot write under {folder}: {ancestor} is a file, not a folder")
            if not os.access(ancestor, os.W_OK | os.X_OK):
                raise ValueError(f"cannot write under {folder}: no write permission in {ancestor}")
            return


def _check_export_dependency(fmt: str) -> None:
    package = missing_dependency(fmt)
    if package is not None:
        raise ValueError(
            f"--format {fmt} needs {package}, part of the 'export' extra: pip install 'vllm-layered[export]'"
        )
