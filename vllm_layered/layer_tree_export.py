"""A layer tree (layer_tree.py) as files: PNG folders, a zip of the same folders, a PSD with layer groups, a
PPTX with grouped shapes.

Folders: each decomposition is a folder of layer_00.png (bottom) ... and composite.png; a refined layer keeps
its file (layer_01.png) and gets a folder beside it (layer_01/) holding its children, their own folders and
their composite.png, recursively. PSD and PPTX: a refined layer becomes a group of its children, named as the
layer would be. File names, layer names and encodings are export.py's, so a tree without refinements gives
the same files as export.py does for its layers.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from types import ModuleType
from typing import Any

from PIL import Image

from vllm_layered.layer_tree import LayerNode, LayerTree
from vllm_layered.model_executor.export import (
    _BLANK_SLIDE_LAYOUT,
    _ZIP_DATE_TIME,
    COMPOSITE_FILE_NAME,
    EXPORT_FORMATS,
    _import_optional,
    _slide_size_emu,
    encode_png,
    layer_file_name,
    layer_name,
)
from vllm_layered.model_executor.image_processing import composite_layers


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


def tree_to_zip_bytes(tree: LayerTree) -> bytes:
    """A zip of the folder layout (entries stored: PNG data is already compressed)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, image in tree_files(tree):
            info = zipfile.ZipInfo(name, date_time=_ZIP_DATE_TIME)
            info.external_attr = 0o644 << 16
            archive.writestr(info, encode_png(image))
    return buffer.getvalue()


def tree_to_psd_bytes(tree: LayerTree) -> bytes:
    """A Photoshop file: a pixel layer per unrefined layer, a layer group per refined one, bottom first.

    Its merged image (what viewers without layer support show) is the composite of the finest layers, what
    the layers panel shows: psd-tools >= 1.11 renders that itself on save, 1.10 keeps the image given here.
    """
    psd_tools = _import_optional("psd_tools", "psd-tools", "PSD")
    api = _import_optional("psd_tools.api.layers", "psd-tools", "PSD")
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


def tree_to_pptx_bytes(tree: LayerTree) -> bytes:
    """A one-slide PowerPoint file: full-slide pictures bottom first, a group shape per refined layer; the
    slide is sized as export.py sizes it."""
    pptx = _import_optional("pptx", "python-pptx", "PPTX")
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


def save_tree(tree: LayerTree, out: str | Path, fmt: str) -> list[Path]:
    """Write a tree and return the paths written.

    ``png``: ``out`` is a folder (created if needed) that gets the folder layout, replacing files of the same
    names. ``zip``, ``psd``, ``pptx``: ``out`` is the file written.
    """
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"fmt must be one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
    out = Path(out)
    if fmt == "png":
        paths = []
        for name, image in tree_files(tree):
            path = out / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(encode_png(image))
            paths.append(path)
        return paths
    encoders = {"zip": tree_to_zip_bytes, "psd": tree_to_psd_bytes, "pptx": tree_to_pptx_bytes}
    data = encoders[fmt](tree)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    return [out]
