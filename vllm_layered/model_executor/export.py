"""Package a decomposition (RGBA layers, bottom first) as PNG files, a zip, a PSD or a PPTX.

Each format has one bytes-returning encoder, which the HTTP server sends as is; ``save_layers``
only writes what those encoders return. psd-tools and python-pptx (the ``export`` extra) are
imported when a PSD or PPTX is asked for, not before.
"""

from __future__ import annotations

import importlib
import io
import zipfile
from pathlib import Path
from types import ModuleType

from PIL import Image

from .image_processing import check_layers, composite_layers

EXPORT_FORMATS = ("png", "zip", "psd", "pptx")
COMPOSITE_FILE_NAME = "composite.png"

# A fixed entry time makes the zip of the same layers the same bytes every time.
_ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)
_EMU_PER_INCH = 914_400
# The slide's long side is PowerPoint's widescreen width (13.333 in); PowerPoint accepts sides of
# 1 to 56 inches.
_SLIDE_LONG_SIDE_EMU = 12_192_000
_SLIDE_MIN_EMU = _EMU_PER_INCH
_SLIDE_MAX_EMU = 56 * _EMU_PER_INCH
_BLANK_SLIDE_LAYOUT = 6  # "Blank" in python-pptx's default template


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


def layers_to_zip_bytes(layers: list[Image.Image], *, composite: Image.Image | None = None) -> bytes:
    """A zip holding layer_00.png (bottom) ... layer_NN.png and composite.png.

    Entries are stored, not deflated: PNG data is already compressed.
    """
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, image in _named_pngs(layers, composite):
            info = zipfile.ZipInfo(name, date_time=_ZIP_DATE_TIME)
            info.external_attr = 0o644 << 16
            archive.writestr(info, encode_png(image))
    return buffer.getvalue()


def layers_to_psd_bytes(layers: list[Image.Image], *, composite: Image.Image | None = None) -> bytes:
    """A layered Photoshop file: one RGBA pixel layer per input layer, bottom first, on a canvas of
    the layers' size. Its merged image (what viewers without layer support show) is ``composite``
    (computed from the layers when None)."""
    psd_tools = _import_optional("psd_tools", "psd-tools", "PSD")
    layers_module = _import_optional("psd_tools.api.layers", "psd-tools", "PSD")
    composite = _checked_composite(layers, composite)
    document = psd_tools.PSDImage.frompil(composite)
    for index, image in enumerate(layers):
        layer = layers_module.PixelLayer.frompil(image, document, layer_name(index, len(layers)))
        # psd-tools >= 1.11 adds the new layer to the document in frompil; 1.10 leaves that to the caller.
        if not any(existing is layer for existing in document):
            document.append(layer)
    buffer = io.BytesIO()
    document.save(buffer)
    return buffer.getvalue()


def layers_to_pptx_bytes(layers: list[Image.Image]) -> bytes:
    """A one-slide PowerPoint file with the layers as full-slide pictures, bottom first; the slide
    has the layers' aspect ratio, its long side 13.333 in (or longer, to keep the short side >= 1 in)."""
    pptx = _import_optional("pptx", "python-pptx", "PPTX")
    width, height = check_layers(layers)
    presentation = pptx.Presentation()
    presentation.slide_width, presentation.slide_height = _slide_size_emu(width, height)
    slide = presentation.slides.add_slide(presentation.slide_layouts[_BLANK_SLIDE_LAYOUT])
    for index, image in enumerate(layers):
        picture = slide.shapes.add_picture(
            io.BytesIO(encode_png(image)), 0, 0, presentation.slide_width, presentation.slide_height
        )
        picture.name = layer_name(index, len(layers))
    buffer = io.BytesIO()
    presentation.save(buffer)
    return buffer.getvalue()


def save_layers(
    layers: list[Image.Image],
    out: str | Path,
    fmt: str,
    *,
    composite: Image.Image | None = None,
) -> list[Path]:
    """Write layers (bottom first) to ``out`` and return the paths written.

    ``png``: ``out`` is a folder (created if needed) that gets layer_00.png ... and composite.png,
    replacing files of those names. ``zip``, ``psd``, ``pptx``: ``out`` is the file written.
    ``composite`` defaults to the layers alpha-composited bottom first; PPTX does not use it.
    """
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"fmt must be one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
    out = Path(out)
    if fmt == "png":
        named = _named_pngs(layers, composite)
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        for name, image in named:
            path = out / name
            path.write_bytes(encode_png(image))
            paths.append(path)
        return paths
    if fmt == "zip":
        data = layers_to_zip_bytes(layers, composite=composite)
    elif fmt == "psd":
        data = layers_to_psd_bytes(layers, composite=composite)
    else:
        data = layers_to_pptx_bytes(layers)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    return [out]


def _checked_composite(layers: list[Image.Image], composite: Image.Image | None) -> Image.Image:
    size = check_layers(layers)
    if composite is None:
        return composite_layers(layers)
    if composite.mode != "RGBA" or composite.size != size:
        raise ValueError(
            f"composite is {composite.mode} {composite.size[0]}x{composite.size[1]}; "
            f"expected an RGBA image of {size[0]}x{size[1]}"
        )
    return composite


def _named_pngs(layers: list[Image.Image], composite: Image.Image | None) -> list[tuple[str, Image.Image]]:
    composite = _checked_composite(layers, composite)
    return [(layer_file_name(i), image) for i, image in enumerate(layers)] + [(COMPOSITE_FILE_NAME, composite)]


def _slide_size_emu(width: int, height: int) -> tuple[int, int]:
    scale = max(_SLIDE_LONG_SIDE_EMU / max(width, height), _SLIDE_MIN_EMU / min(width, height))
    return tuple(min(max(round(side * scale), _SLIDE_MIN_EMU), _SLIDE_MAX_EMU) for side in (width, height))


def _import_optional(module: str, package: str, what: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"{what} export needs {package}, part of the 'export' extra: pip install 'vllm-layered[export]'"
        ) from e
