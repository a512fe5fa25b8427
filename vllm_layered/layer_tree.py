"""Recursive decomposition as a tree: node paths, refinement requests, the crop/paste geometry, the tree.

Layers are numbered bottom first from 0, as their files are. A node is named by its path: "1" is layer 1 of
the root decomposition, "1.0" the bottom layer of the decomposition of layer 1, and so on. A *refinement*
(``"1:2"`` on the CLI, ``{"layer": "1", "layers": 2}`` over HTTP and in Python) decomposes a layer again.

Geometry: a refinement's input is its layer (RGBA) cropped to the layer's alpha bounding box plus a margin
(``refinement_input``); the pipeline bucket-resizes that crop like any input. The children it returns are
resized back to the crop's size and pasted into transparent canvases of the parent's size
(``paste_children``). Every layer of a tree therefore has the root canvas's size (the size of the root
decomposition's layers), and a refined layer's children stack where the layer was.

Seeds: the root decomposition uses the request's seed; the refinement of layer P uses
``refinement_seed(seed, P)``, so each node's noise is fixed by the request seed and the node's path alone.

Torch-free (Pillow and the standard library): the server, the CLI and the thin clients share it.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

# A refined layer's path has at most this many parts ("1.0.2" may be refined, "1.0.2.1" may not), so a
# tree has at most four levels of layers. Each level is one more full decomposition run after its parent
# (latency adds up level by level: four 50-step levels are ~2 min on an H200 at 640), and each level
# magnifies a part of a part: its crop is scaled up to the whole bucket, beyond which the model sees
# mostly resampling blur.
MAX_REFINE_DEPTH = 3
# Enough to refine every layer of the largest decomposition once; with at most 20 layers each this bounds
# a tree at 20 + 20 * 20 layers before any work cap is applied.
MAX_REFINEMENTS = 20
# The crop's margin on each side, as a fraction of the alpha box's longer side (at least 1 px). At the 640
# bucket this is ~40-56 px, 2-3 latent patches of 16 px: the layer's edges stay off the input's border,
# where the VAE and the 2x2 patching see padding instead of the transparent surroundings.
MARGIN_FRACTION = 1 / 16

Box = tuple[int, int, int, int]  # (left, top, right, bottom) in pixels, right and bottom exclusive (PIL's)

_PATH = re.compile(r"^\d+(\.\d+)*$", re.ASCII)
_COUNT = re.compile(r"^\s*\d+\s*$", re.ASCII)


class RefinementError(ValueError):
    """A refinement that cannot be done: bad syntax, a layer that does not exist, a limit exceeded."""


class EmptyLayerError(RefinementError):
    """The layer to refine is fully transparent: there is nothing to decompose."""

    def __init__(self, path: str) -> None:
        super().__init__(f"cannot refine layer {path}: it is empty (fully transparent)")
        self.path = path


# -- paths and refinements ------------------------------------------------------------------------------


def parse_path(value: str | int) -> str:
    """A node path in canonical form ("1.0"): dot-separated layer indices; an int is a root layer."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise RefinementError(f"a layer path is a string such as '1' or '1.0', got {value!r}")
    text = str(value).strip()
    if not _PATH.match(text):
        raise RefinementError(f"bad layer path {value!r}: expected layer indices joined by dots, such as '1' or '1.0'")
    return ".".join(str(int(part)) for part in text.split("."))


def path_parts(path: str) -> tuple[int, ...]:
    """The layer indices of a canonical path, root first: "1.0" -> (1, 0)."""
    return tuple(int(part) for part in path.split("."))


def parent_path(path: str) -> str | None:
    """The path of the layer whose decomposition holds ``path``; None for a layer of the root decomposition."""
    head, _, _ = path.rpartition(".")
    return head or None


@dataclass(frozen=True)
class Refinement:
    """Decompose layer ``path`` again into ``layers`` layers; ``prompt`` None: caption the layer's crop."""

    path: str
    layers: int
    prompt: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", parse_path(self.path))
        if isinstance(self.layers, bool) or not isinstance(self.layers, int):
            raise RefinementError(f"refine {self.path}: layers must be an integer, got {self.layers!r}")
        if self.layers < 1:
            raise RefinementError(f"refine {self.path}: layers must be at least 1, got {self.layers}")
        if self.prompt is not None and not isinstance(self.prompt, str):
            raise RefinementError(f"refine {self.path}: prompt must be a string, got {self.prompt!r}")

    @property
    def depth(self) -> int:
        """1 for a layer of the root decomposition, 2 for one of its children, ..."""
        return len(path_parts(self.path))

    @classmethod
    def parse(cls, value: RefinementSpec) -> Refinement:
        """From "PATH:N" (the CLI), {"layer": PATH, "layers": N[, "prompt": TEXT]} (HTTP, Python) or as is."""
        if isinstance(value, Refinement):
            return value
        if isinstance(value, str):
            path, sep, count = value.rpartition(":")
            if not sep or not _COUNT.match(count):
                raise RefinementError(f"bad refinement {value!r}: expected PATH:N, such as '1:2' or '1.0:3'")
            return cls(path, int(count))
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - {"layer", "layers", "prompt"})
            if unknown:
                raise RefinementError(f"unknown refinement field(s) {', '.join(map(repr, unknown))}: {dict(value)!r}")
            if "layer" not in value or "layers" not in value:
                raise RefinementError(f"a refinement needs 'layer' (a path) and 'layers' (a count): {dict(value)!r}")
            return cls(parse_path(value["layer"]), _count(value["layers"]), value.get("prompt"))
        raise RefinementError(f"a refinement is 'PATH:N' or {{'layer': PATH, 'layers': N}}, got {value!r}")


# A refinement as the interfaces take it: "PATH:N", {"layer": PATH, "layers": N[, "prompt": TEXT]}, or parsed.
RefinementSpec = str | Mapping[str, Any] | Refinement


def _count(value: Any) -> int:
    """A layer count from JSON or a form field: an int, or a string of digits."""
    if isinstance(value, str) and _COUNT.match(value):
        return int(value)
    return value  # Refinement checks the type


def parse_refinements(value: str | Iterable[RefinementSpec] | None) -> list[Refinement]:
    """Refinements from a list (of "PATH:N" strings, dicts or Refinements), a JSON array string, one "PATH:N"
    string, or None (no refinements)."""
    if value is None:
        return []
    if isinstance(value, str):
        if not value.lstrip().startswith("["):
            return [Refinement.parse(value)]
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise RefinementError(f"refine is not a valid JSON array: {e}") from e
    if isinstance(value, Mapping) or not isinstance(value, Iterable):
        raise RefinementError(f"refine must be a list of refinements, got {type(value).__name__}")
    return [Refinement.parse(item) for item in value]


def refinements_from_form(form: Mapping[str, Sequence[str]]) -> list[Refinement]:
    """Refinements from multipart form fields (field name -> its values, in order).

    Accepted: ``refine`` (a JSON array, or one "PATH:N" per value), ``refine[]`` (one "PATH:N" per value), and
    what the openai SDK sends for ``extra_body={"refine": [{"layer": ..., "layers": ...}, ...]}``: it
    flattens the list into the fields ``refine[][layer]``, ``refine[][layers]`` (and ``refine[][prompt]``),
    all values of one field before the next field's, so the i-th values of the fields form the i-th
    refinement. A prompt can only be paired that way when every refinement has one.
    """
    refinements: list[Refinement] = []
    for value in form.get("refine", ()):
        refinements += parse_refinements(value)
    refinements += [Refinement.parse(value) for value in form.get("refine[]", ())]
    paths, counts = form.get("refine[][layer]", ()), form.get("refine[][layers]", ())
    prompts = form.get("refine[][prompt]", ())
    if len(paths) != len(counts):
        raise RefinementError(
            f"refine has {len(paths)} 'layer' and {len(counts)} 'layers' values: every refinement needs both"
        )
    if prompts and len(prompts) != len(paths):
        raise RefinementError(
            f"refine has {len(prompts)} prompts for {len(paths)} refinements: in a multipart form, give every "
            "refinement a prompt or none (or send refine as one JSON string)"
        )
    for i, (path, count) in enumerate(zip(paths, counts)):
        refinements.append(Refinement(parse_path(path), _count(count), prompts[i] if prompts else None))
    return refinements


def plan_refinements(refinements: Iterable[Refinement], *, root_layers: int, max_layers: int) -> list[Refinement]:
    """Check refinements against the tree they describe and order them parents first (by depth, then path).

    ``root_layers``: layers of the root decomposition; ``max_layers``: the most layers one decomposition may
    have (the model's limit). Raises RefinementError naming the refinement at fault.
    """
    refinements = list(refinements)
    if len(refinements) > MAX_REFINEMENTS:
        raise RefinementError(f"at most {MAX_REFINEMENTS} refinements per request, got {len(refinements)}")
    by_path: dict[str, Refinement] = {}
    for refinement in refinements:
        if refinement.path in by_path:
            raise RefinementError(f"layer {refinement.path} is refined twice")
        if refinement.depth > MAX_REFINE_DEPTH:
            raise RefinementError(
                f"refine {refinement.path}: too deep; a refined layer's path has at most {MAX_REFINE_DEPTH} parts"
            )
        if refinement.layers > max_layers:
            raise RefinementError(
                f"refine {refinement.path}: layers must be between 1 and {max_layers}, got {refinement.layers}"
            )
        by_path[refinement.path] = refinement
    for refinement in refinements:
        parent = parent_path(refinement.path)
        index = path_parts(refinement.path)[-1]
        if parent is None:
            if index >= root_layers:
                raise RefinementError(
                    f"refine {refinement.path}: no such layer; the root decomposition has {root_layers} "
                    f"layer(s), 0-{root_layers - 1}"
                )
        elif parent not in by_path:
            raise RefinementError(
                f"refine {refinement.path}: its parent layer {parent} is not refined; refine {parent} too"
            )
        elif index >= by_path[parent].layers:
            count = by_path[parent].layers
            raise RefinementError(
                f"refine {refinement.path}: no such layer; layer {parent} is refined into {count} "
                f"layer(s), {parent}.0-{parent}.{count - 1}"
            )
    return sorted(refinements, key=lambda r: (r.depth, path_parts(r.path)))


def refinement_seed(seed: int, path: str) -> int:
    """The seed of the decomposition that refines layer ``path`` of a request with seed ``seed``.

    The first 8 bytes of SHA-256("{seed}/{path}"), big-endian, shifted right by one: below 2**63. Hashing
    keeps the seeds of siblings, levels and neighbouring request seeds unrelated.
    """
    digest = hashlib.sha256(f"{seed}/{parse_path(path)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


# -- geometry -------------------------------------------------------------------------------------------


def alpha_bbox(image: Image.Image) -> Box | None:
    """The bounding box of the pixels with non-zero alpha; None when the image is fully transparent."""
    return image.getchannel("A").getbbox()


def crop_box(bbox: Box, canvas: tuple[int, int], *, max_aspect_ratio: float) -> Box:
    """The region of a layer given to the model: ``bbox`` grown by the margin, clamped to the canvas.

    Where that region is longer than ``max_aspect_ratio`` times its width (or the reverse), its short side
    grows (centred, within the canvas) until it is not, so that the crop has a resolution bucket.
    """
    left, top, right, bottom = bbox
    margin = max(1, math.ceil(max(right - left, bottom - top) * MARGIN_FRACTION))
    width, height = canvas
    left, right = max(0, left - margin), min(width, right + margin)
    top, bottom = max(0, top - margin), min(height, bottom + margin)
    shortest = math.ceil(max(right - left, bottom - top) / max_aspect_ratio)
    left, right = _grow(left, right, shortest, width)
    top, bottom = _grow(top, bottom, shortest, height)
    return left, top, right, bottom


def _grow(low: int, high: int, length: int, limit: int) -> tuple[int, int]:
    """[low, high) grown, centred, to at least ``length`` (at most ``limit``), kept within [0, limit)."""
    length = min(length, limit)
    if high - low >= length:
        return low, high
    low = max(0, low - (length - (high - low)) // 2)
    high = min(limit, low + length)
    return high - length, high


def refinement_input(layer: Image.Image, path: str, *, max_aspect_ratio: float) -> tuple[Image.Image, Box]:
    """The image that refining ``layer`` (node ``path``) decomposes, and where it lies in the layer's canvas."""
    bbox = alpha_bbox(layer)
    if bbox is None:
        raise EmptyLayerError(path)
    box = crop_box(bbox, layer.size, max_aspect_ratio=max_aspect_ratio)
    return layer.crop(box), box


def paste_children(layers: Sequence[Image.Image], box: Box, canvas: tuple[int, int]) -> list[Image.Image]:
    """A refinement's output layers put back where its input came from.

    Each layer is resized (Lanczos, as the input was) to the crop ``box``'s size when it is not that size
    already, then pasted at the box into a transparent RGBA canvas of size ``canvas``.
    """
    size = (box[2] - box[0], box[3] - box[1])
    pasted = []
    for layer in layers:
        if layer.size != size:
            layer = layer.resize(size, resample=Image.Resampling.LANCZOS)
        canvas_image = Image.new("RGBA", canvas, (0, 0, 0, 0))
        canvas_image.paste(layer.convert("RGBA"), box[:2])
        pasted.append(canvas_image)
    return pasted


# -- the tree -------------------------------------------------------------------------------------------


@dataclass
class LayerNode:
    """One layer of a tree.

    image:    RGBA at the root canvas's size (every layer of a tree has that size)
    frame:    the region of the root canvas that the decomposition producing this layer saw: the whole
              canvas for a root layer, the parent's crop for a child
    bbox:     the alpha bounding box in the root canvas (None: fully transparent)
    children: the layers this layer was refined into, bottom first (empty: not refined)
    prompt:   the prompt its children were decomposed with (None: not refined)
    """

    path: str
    image: Image.Image
    frame: Box
    children: list[LayerNode] = field(default_factory=list)
    prompt: str | None = None
    bbox: Box | None = field(init=False)

    def __post_init__(self) -> None:
        self.bbox = alpha_bbox(self.image)

    @property
    def parent(self) -> str | None:
        return parent_path(self.path)

    @property
    def index(self) -> int:
        """The layer's index among its siblings, 0 = bottom."""
        return path_parts(self.path)[-1]

    @property
    def role(self) -> str:
        """'group' for a refined layer (its children stand for it in PSD and PPTX), 'layer' otherwise."""
        return "group" if self.children else "layer"

    @property
    def bbox_in_frame(self) -> Box | None:
        """The alpha bounding box relative to ``frame``: where the layer lies in the image its decomposition saw."""
        if self.bbox is None:
            return None
        x, y = self.frame[:2]
        return self.bbox[0] - x, self.bbox[1] - y, self.bbox[2] - x, self.bbox[3] - y

    @property
    def crop_box(self) -> Box | None:
        """The region its children were decomposed from (None: not refined)."""
        return self.children[0].frame if self.children else None


@dataclass
class LayerTree:
    """A recursive decomposition: ``layers`` are the root decomposition's, bottom first."""

    layers: list[LayerNode]
    prompt: str
    seed: int

    @property
    def size(self) -> tuple[int, int]:
        """The root canvas: (width, height) of every layer in the tree."""
        return self.layers[0].image.size

    def node(self, path: str) -> LayerNode:
        """The layer at ``path``; RefinementError when there is none."""
        parts = path_parts(parse_path(path))
        nodes, node = self.layers, None
        for depth, index in enumerate(parts):
            if index >= len(nodes):
                where = "the root decomposition" if depth == 0 else f"layer {'.'.join(map(str, parts[:depth]))}"
                raise RefinementError(f"no layer {path}: {where} has {len(nodes)} layer(s)")
            node = nodes[index]
            nodes = node.children
        return node

    def walk(self) -> Iterator[LayerNode]:
        """Every layer, depth first: bottom first, each refined layer followed by its children."""
        stack = list(reversed(self.layers))
        while stack:
            node = stack.pop()
            yield node
            stack.extend(reversed(node.children))

    def leaves(self) -> list[LayerNode]:
        """The finest layers, bottom first: the stack with each refined layer replaced by its children."""
        return [node for node in self.walk() if not node.children]

    @classmethod
    def from_layers(cls, layers: Sequence[Image.Image], prompt: str, seed: int) -> LayerTree:
        """The tree of a root decomposition before any refinement; its layers' size is the root canvas."""
        full = (0, 0, *layers[0].size)
        return cls([LayerNode(str(i), image, full) for i, image in enumerate(layers)], prompt, seed)

    def refine(self, path: str, layers: Sequence[Image.Image], frame: Box, prompt: str) -> list[LayerNode]:
        """Attach the children of layer ``path`` (already pasted into the root canvas) and return them."""
        node = self.node(path)
        if node.children:
            raise RefinementError(f"layer {path} is refined twice")
        node.children = [LayerNode(f"{node.path}.{i}", image, frame) for i, image in enumerate(layers)]
        node.prompt = prompt
        return node.children

    def attach(self, path: str, layers: Sequence[Image.Image], box: Box, prompt: str) -> list[LayerNode]:
        """Attach what the refinement of layer ``path`` returned (its layers, any size, for the crop ``box``):
        pasted back into the root canvas, they become the layer's children."""
        return self.refine(path, paste_children(layers, box, self.size), box, prompt)


# -- building a tree ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TreeJob:
    """One decomposition of a tree: the root (``path`` None) or the refinement of layer ``path``; its input
    image (a crop of the layer for a refinement), layer count, prompt (None: caption it) and seed. (Not
    serving/jobs.py's DecompositionJob, which is one HTTP request's decompositions.)"""

    path: str | None
    image: Image.Image
    layers: int
    prompt: str | None
    seed: int


# Runs the jobs of one level of a tree together; for each job, its layers (any size) and the prompt used.
Decomposer = Callable[[list[TreeJob]], list[tuple[list[Image.Image], str]]]


def refinement_job(tree: LayerTree, refinement: Refinement, *, max_aspect_ratio: float) -> tuple[TreeJob, Box]:
    """The decomposition that refines a layer of ``tree`` (its crop, layer count, prompt and derived seed) and
    the crop's box in the root canvas; EmptyLayerError when the layer is fully transparent."""
    crop, box = refinement_input(tree.node(refinement.path).image, refinement.path, max_aspect_ratio=max_aspect_ratio)
    seed = refinement_seed(tree.seed, refinement.path)
    return TreeJob(refinement.path, crop, refinement.layers, refinement.prompt, seed), box


def build_tree(
    image: Image.Image,
    *,
    layers: int,
    prompt: str | None,
    seed: int,
    plan: Sequence[Refinement],
    decompose: Decomposer,
    max_aspect_ratio: float,
) -> LayerTree:
    """Decompose ``image``, then refine level by level as ``plan`` (from plan_refinements) says.

    Every job of one depth goes to ``decompose`` in one call, so a decomposer can run them together. The
    root decomposition's layers set the canvas; each refinement's children are pasted back into it.
    """
    ((root_layers, root_prompt),) = decompose([TreeJob(None, image, layers, prompt, seed)])
    tree = LayerTree.from_layers(root_layers, root_prompt, seed)
    for depth in sorted({r.depth for r in plan}):
        level = [refinement_job(tree, r, max_aspect_ratio=max_aspect_ratio) for r in plan if r.depth == depth]
        jobs = [job for job, _ in level]
        for (job, box), (children, used_prompt) in zip(level, decompose(jobs)):
            tree.attach(job.path, children, box, used_prompt)
    return tree
