"""The layers a server returned (RGBA, bottom first) and ways to save them; the tree of a request with
refinements (``tree_from_response``).

Needs only pillow; PSD and PPTX saving import psd-tools / python-pptx when called. The files are those of
vllm_layered.formats, the server's own; a tree saves with vllm_layered.formats.save_tree.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from vllm_layered.formats import composite_layers, save_layers
from vllm_layered.layer_tree import LayerTree, path_parts


@dataclass
class Layers:
    """One decomposition: ``images`` are RGBA, bottom (background) first. ``tree``: every layer of the response
    as a layer_tree.LayerTree, refinements included (``images`` are its root layers)."""

    images: list[Image.Image]
    prompt: str | None = None
    seed: int | None = None
    request_id: str | None = None
    tree: LayerTree | None = None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Image.Image:
        return self.images[index]

    def __iter__(self) -> Iterator[Image.Image]:
        return iter(self.images)

    @classmethod
    def from_response(cls, body: dict[str, Any], decomposition_index: int = 0) -> Layers:
        """The layers of one decomposition of an images response body (per-layer entries, not a package)."""
        tree = tree_from_response(body, decomposition_index)
        return cls([node.image for node in tree.layers], prompt=tree.prompt, seed=tree.seed, request_id=body.get("id"),
                   tree=tree)

    def composite(self) -> Image.Image:
        """What the stack looks like: the layers alpha-composited bottom first."""
        return composite_layers(self.images)

    def save_pngs(self, folder: str | Path) -> list[Path]:
        """layer_00.png (bottom) ... and composite.png in ``folder`` (created if needed)."""
        return save_layers(self.images, folder, "png")

    def save_zip(self, path: str | Path) -> Path:
        """The same files as save_pngs, in one zip."""
        return save_layers(self.images, path, "zip")[0]

    def save_psd(self, path: str | Path) -> Path:
        """A layered Photoshop file, one pixel layer per image, bottom first (needs psd-tools)."""
        return save_layers(self.images, path, "psd")[0]

    def save_pptx(self, path: str | Path) -> Path:
        """One slide with the layers as full-slide pictures, bottom first (needs python-pptx)."""
        return save_layers(self.images, path, "pptx")[0]


def tree_from_response(body: dict[str, Any], decomposition_index: int = 0) -> LayerTree:
    """The tree of one decomposition of an images response body (per-layer entries, not a package).

    Each entry's ``path`` and ``parent`` place it, a refined layer's ``crop_box`` is where its children came
    from; a response without paths (a server without trees) is a tree of its layers alone."""
    entries = [e for e in body["data"] if e.get("decomposition_index", 0) == decomposition_index]
    if not entries:
        raise ValueError(f"the response has no decomposition {decomposition_index}")
    if any("layer_index" not in e for e in entries):
        raise ValueError("the response holds a package, not per-layer images")
    by_parent: dict[str | None, list[dict[str, Any]]] = {}
    for entry in entries:
        by_parent.setdefault(entry.get("parent"), []).append(entry)
    for siblings in by_parent.values():
        siblings.sort(key=lambda e: e["layer_index"])
    roots = by_parent.get(None)
    if not roots:
        raise ValueError("the response's layers do not form a tree (no layer without a parent)")
    tree = LayerTree.from_layers([_image(e) for e in roots], roots[0].get("revised_prompt") or "", roots[0].get("seed"))
    groups = [e for e in entries if e.get("role") == "group"]
    for group in sorted(groups, key=lambda e: (len(path_parts(e["path"])), path_parts(e["path"]))):  # parents first
        children = by_parent.get(group["path"], [])
        tree.refine(group["path"], [_image(e) for e in children], tuple(group["crop_box"]), group.get("prompt") or "")
    if sum(1 for _ in tree.walk()) != len(entries):
        raise ValueError("the response's layers do not form a tree (an entry's parent is not a refined layer)")
    return tree


def _image(entry: dict[str, Any]) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(entry["b64_json"]))).convert("RGBA")
