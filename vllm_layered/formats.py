"""Layers as files, the one home of every format the server, both CLIs and the clients write: a layer as PNG or
WebP; a decomposition as a folder of PNGs, a zip, a PSD or a PPTX, of a stack of layers or of a tree of
decompositions (layer_tree.py).

Folders: each decomposition is a folder of layer_00.png (bottom) ... and composite.png; a refined layer keeps
its file (layer_01.png) and gets a folder beside it (layer_01/) holding its children, their own folders and
their composite.png, recursively. PSD and PPTX: a refined layer becomes a group of its children, named as the
layer would be. A stack of layers is a tree without refinements (``stack_tree``) and is written as one.

Each package has one bytes-returning encoder (``package_bytes``), which the HTTP server sends as is; the save
functions write only what the encoders return. Needs pillow alone (torch never loads); psd-tools and
python-pptx (the ``export`` extra) are imported when a PSD or PPTX is made, not before.
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import zipfile
from pathlib import Path
from types import ModuleType
from typing import Any, Literal, get_args

from PIL import Image

from vllm_layered.layer_tree import LayerNode, LayerTree

# One file holding every layer of a decomposition.
PackageFormat = Literal["zip", "psd", "pptx"]
# The encodings of one layer in a response (both keep the alpha channel).
ImageFormat = Literal["png", "webp"]
PACKAGE_FORMATS: tuple[str, ...] = get_args(PackageFormat)
IMAGE_FORMATS: tuple[str, ...] = get_args(ImageFormat)
# What save_layers and save_tree (and the CLIs' --format) write: png is a folder of PNG files.
SAVE_FORMATS = ("png", *PACKAGE_FORMATS)
MIME_TYPES = {
    "png": "image/png",
    "webp": "image/webp",
    "zip": "application/zip",
    "psd": "image/vnd.adobe.photoshop",
    "pptx": "application/vnd.openxmlformats-officedocument.presentationml.presentation",
}
COMPOSITE_FILE_NAME = "composite.png"

# The module each package format imports, and the distribution (in the export extra) that provides it.
_OPTIONAL_MODULES = {"psd": ("psd_tools", "psd-tools"), "pptx": ("pptx", "python-pptx")}
# A fixed entry time makes the zip of the same layers the same bytes every time.
_ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)
_EMU_PER_INCH = 914_400
# The slide's long side is PowerPoint's widescreen width (13.333 in); PowerPoint accepts sides of
# 1 to 56 inches.
_SLIDE_LONG_SIDE_EMU = 12_192_000
_SLIDE_MIN_EMU = _EMU_PER_INCH
_SLIDE_MAX_EMU = 56 * _EMU_PER_INCH
_BLANK_SLIDE_LAYOUT = 6  # "Blank" in python-pptx's default template


# -- one layer ------------------------------------------------------------------------------------------


def layer_file_name(index: int) -> str:
    """File name of layer ``index`` (0 = bottom) in a PNG folder or zip."""
    return f"layer_{index:02d}.png"


def layer_name(index: int, count: int) -> str:
    """Display name of layer ``index`` of ``count`` in PSD and PPTX files: "Layer 0 (bottom)" ..."""
    if index == 0:
        return "Layer 0 (bottom)"
    if index == count - 1:
        return f"Layer {index} (top)"
    return f"Layer {index}"


def encode_png(image: Image.Image, *, compress_level: int = 6) -> bytes:
    """PNG bytes of ``image``; ``compress_level`` 0-9 trades size for encoding time (1 is ~3x faster)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


def encode_webp(image: Image.Image, *, lossless: bool = True, quality: int = 90) -> bytes:
    """WebP bytes of ``image``. Lossless keeps the layer exact, colour under transparent pixels too;
    lossy uses ``quality`` (0-100) and is several times smaller."""
    buffer = io.BytesIO()
    if lossless:
        image.save(buffer, format="WEBP", lossless=True, exact=True)
    else:
        image.save(buffer, format="WEBP", quality=quality)
    return buffer.getvalue()


# -- a stack of layers ----------------------------------------------------------------------------------


def check_layers(layers: list[Image.Image]) -> tuple[int, int]:
    """The common (width, height) of a non-empty list of RGBA layers; ValueError naming the odd one out."""
    if not layers:
        raise ValueError("expected at least one layer")
    for i, layer in enumerate(layers):
        if not isinstance(layer, Image.Image):
            raise ValueError(f"layer {i} is a {type(layer).__name__}, not a PIL image")
        width, height = layers[0].size
        if layer.mode != "RGBA" or layer.size != (width, height):
            raise ValueError(
                f"layer {i} is {layer.mode} {layer.size[0]}x{layer.size[1]}; expected RGBA {width}x{height}"
            )
    return layers[0].size


def composite_layers(layers: list[Image.Image]) -> Image.Image:
    """Alpha-composite RGBA layers of one size, the first at the bottom, into a new RGBA image."""
    check_layers(layers)
    result = layers[0].copy()
    for layer in layers[1:]:
        result.alpha_composite(layer)
    return result


def stack_tree(layers: list[Image.Image]) -> LayerTree:
    """Layers (RGBA, one size, bottom first) as a tree without refinements; ValueError naming a bad layer."""
    check_layers(layers)
    return LayerTree.from_layers(layers, "", 0)


def save_layers(layers: list[Image.Image], out: str | Path, fmt: str) -> list[Path]:
    """Write layers (bottom first) as ``save_tree`` writes their tree, and return the paths written: for png
    the folder ``out`` gets layer_00.png ... and composite.png (the layers alpha-composited bottom first)."""
    return save_tree(stack_tree(layers), out, fmt)


# -- a tree ---------------------------------------------------------------------------------------------


def tree_files(tree: LayerTree) -> list[tuple[str, Image.Image]]:
    """(relative path, image) of every file of the folder layout, each folder's layers before its composite."""
    return _folder_files(tree.layers, "")


def _folder_files(nodes: list[LayerNode], prefix: str) -> list[tuple[str, Image.Image]]:
    files = []
    for node in nodes:
        name = layer_file_name(node.index)
        files.append((prefix + name, node.image))
        if node.children:
            files += _folder_files(node.children, f"{prefix}{Path(name).stem}/")
    files.append((prefix + COMPOSITE_FILE_NAME, composite_layers([node.image for node in nodes])))
    return files


def package_bytes(tree: LayerTree, fmt: str) -> bytes:
    """The package file of a tree: ``zip`` (the folder layout), ``psd`` or ``pptx``."""
    encoders = {"zip": _zip_bytes, "psd": _psd_bytes, "pptx": _pptx_bytes}
    if fmt not in encoders:
        raise ValueError(f"a package is one of {', '.join(PACKAGE_FORMATS)}, got {fmt!r}")
    return encoders[fmt](tree)


def save_tree(tree: LayerTree, out: str | Path, fmt: str) -> list[Path]:
    """Write a tree and return the paths written.

    ``png``: ``out`` is a folder (created if needed) that gets the folder layout, replacing files of the same
    names. ``zip``, ``psd``, ``pptx``: ``out`` is the file written.
    """
    if fmt not in SAVE_FORMATS:
        raise ValueError(f"fmt must be one of {', '.join(SAVE_FORMATS)}, got {fmt!r}")
    out = Path(out)
    if fmt == "png":
        paths = []
        for name, image in tree_files(tree):
            path = out / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(encode_png(image))
            paths.append(path)
        return paths
    data = package_bytes(tree, fmt)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    return [out]


def missing_dependency(fmt: str) -> str | None:
    """The distribution (of the export extra) that format ``fmt`` needs and this Python lacks, else None."""
    if fmt not in _OPTIONAL_MODULES:
        return None
    module, distribution = _OPTIONAL_MODULES[fmt]
    return distribution if importlib.util.find_spec(module) is None else None


def _zip_bytes(tree: LayerTree) -> bytes:
    """A zip of the folder layout (entries stored: PNG data is already compressed)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, image in tree_files(tree):
            info = zipfile.ZipInfo(name, date_time=_ZIP_DATE_TIME)
            info.external_attr = 0o644 << 16
            archive.writestr(info, encode_png(image))
    return buffer.getvalue()


def _psd_bytes(tree: LayerTree) -> bytes:
    """A Photoshop file: a pixel layer per unrefined layer, a layer group per refined one, bottom first, on a
    canvas of the tree's size.

    Its merged image (what viewers without layer support show) is the composite of the finest layers, what
    the layers panel shows: psd-tools >= 1.11 renders that itself on save, 1.10 keeps the image given here.
    """
    psd_tools = _import_optional("psd")
    api = importlib.import_module("psd_tools.api.layers")
    document = psd_tools.PSDImage.frompil(composite_layers([node.image for node in tree.leaves()]))
    _add_psd_layers(api, document, document, tree.layers)
    buffer = io.BytesIO()
    document.save(buffer)
    return buffer.getvalue()


def _add_psd_layers(api: ModuleType, document: Any, parent: Any, nodes: list[LayerNode]) -> None:
    for node in nodes:
        name = layer_name(node.index, len(nodes))
        if node.children:
            # Keywords: psd-tools 1.10 orders these parameters (name, open_folder, parent), later ones (parent, ...).
            group = api.Group.new(name=name, open_folder=True, parent=parent)
            _add_psd_layers(api, document, group, node.children)
            continue
        # Made in the document (psd-tools 1.10 takes only the document here), then moved into its group; 1.10
        # leaves the appending to the caller, later versions append to the document.
        layer = api.PixelLayer.frompil(node.image, document, name)
        if parent is not document or not any(existing is layer for existing in document):
            parent.append(layer)


def _pptx_bytes(tree: LayerTree) -> bytes:
    """A one-slide PowerPoint file: full-slide pictures bottom first, a group shape per refined layer. The
    slide has the layers' aspect ratio, its long side 13.333 in (or longer, to keep the short side >= 1 in)."""
    pptx = _import_optional("pptx")
    presentation = pptx.Presentation()
    presentation.slide_width, presentation.slide_height = _slide_size_emu(*tree.size)
    slide = presentation.slides.add_slide(presentation.slide_layouts[_BLANK_SLIDE_LAYOUT])
    _add_pptx_shapes(slide.shapes, tree.layers, (presentation.slide_width, presentation.slide_height))
    buffer = io.BytesIO()
    presentation.save(buffer)
    return buffer.getvalue()


def _add_pptx_shapes(shapes: Any, nodes: list[LayerNode], slide_size: tuple[int, int]) -> None:
    for node in nodes:
        if node.children:
            shape = shapes.add_group_shape()
            _add_pptx_shapes(shape.shapes, node.children, slide_size)
        else:
            shape = shapes.add_picture(io.BytesIO(encode_png(node.image)), 0, 0, *slide_size)
        shape.name = layer_name(node.index, len(nodes))


def _slide_size_emu(width: int, height: int) -> tuple[int, int]:
    scale = max(_SLIDE_LONG_SIDE_EMU / max(width, height), _SLIDE_MIN_EMU / min(width, height))
    return tuple(min(max(round(side * scale), _SLIDE_MIN_EMU), _SLIDE_MAX_EMU) for side in (width, height))


def _import_optional(fmt: str) -> ModuleType:
    module, distribution = _OPTIONAL_MODULES[fmt]
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"{fmt.upper()} export needs {distribution}, part of the 'export' extra: "
            "pip install 'vllm-layered[export]'"
        ) from e
