"""Input images in, RGBA tensors out, and back: the pixel side of a decomposition.

Everything here reproduces what the reference pipeline does to pixels (the resolution bucket, the
Lanczos resize, the [-1, 1] scaling and the 8-bit rounding on the way out) so that our tensors equal
the reference's bit for bit, and adds what a server taking untrusted uploads needs on top: a size
check made from the header before any pixel is decoded, one error type with a machine-readable code
for every way an upload can be bad, and conversion of every common pixel format to RGBA.

torch is imported by the two tensor conversions only, when first called: the rest needs numpy and pillow
alone. Layer stacks (checking, compositing, files) are formats.py's.
"""

from __future__ import annotations

import io
import math
import os
import struct
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
from PIL import ExifTags, Image, ImageOps

if TYPE_CHECKING:
    import torch

DEFAULT_MAX_PIXELS = 64_000_000
RESOLUTIONS = (640, 1024)
# Within 1:16 the smaller bucket side is at least resolution / 4 (160 px at 640), and the token count
# per frame stays the bucket's. Beyond it the short side shrinks towards nothing and the model has
# never seen such shapes, so those images are refused rather than squashed.
MAX_ASPECT_RATIO = 16
MIN_SIDE = 32
# Raster formats a user may upload (JPEG includes MPO; AVIF needs Pillow >= 11.2, HEIF the pillow-heif
# plugin: those absent from this Pillow are skipped). Leaving the rest out keeps Pillow from running
# exotic decoders on untrusted bytes (EPS, for one, hands the file to Ghostscript).
ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "ICO", "PPM", "TGA", "AVIF", "HEIF", "PSD")

_BOMB = (Image.DecompressionBombError, Image.DecompressionBombWarning)
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Modes that Pillow converts to RGBA only by way of another mode.
_CONVERT_VIA = {"La": "LA", "LAB": "RGB"}
# 16-bit (and 32-bit integer) grayscale: Pillow's own conversion to 8 bits clips instead of scaling.
_WIDE_GRAY_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})

# The reference turns a byte b into float32(b / 255) and then into 2 * x - 1; a table of the 256
# results, computed with the same float32 operations, gives the same bits with one gather.
_BYTE_TO_UNIT = 2.0 * (np.arange(256, dtype=np.float32) / np.float32(255.0)) - 1.0


class InvalidImageError(ValueError):
    """An input image that cannot be decomposed; ``code`` says why in one machine-readable word.

    Codes: ``not_an_image``, ``corrupt_image``, ``empty_image``, ``too_many_pixels``,
    ``unsupported_mode``, ``unreadable_file``, ``bad_aspect_ratio``.
    """

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


SizeCheck = Callable[[int, int], None]


def load_image(
    source: bytes | bytearray | memoryview | str | os.PathLike | Image.Image,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    check_size: SizeCheck | None = None,
) -> Image.Image:
    """Decode an image (encoded bytes, a file path or a PIL image) into a new RGBA image.

    The declared size is checked against ``max_pixels`` before any pixel is decoded, and then handed
    to ``check_size(width, height)``, which may raise to refuse the image as cheaply. EXIF
    orientation is applied (after the check: it may swap width and height); of an animated or
    multi-page file the first frame is used (a PIL image passed in is used at the frame it is on).
    Pillow's own decompression-bomb limit (about 179 megapixels) still applies when ``max_pixels``
    is set above it. Raises InvalidImageError.
    """
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    # Pillow warns about big headers before we get to refuse them; the refusal is the message. (Where
    # warnings are errors, or another thread's catch_warnings undoes this one, _BOMB catches the warning.)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        if isinstance(source, Image.Image):
            return _prepare(source, max_pixels, check_size)
        if isinstance(source, (bytes, bytearray, memoryview)):
            return _open_and_prepare(io.BytesIO(source), max_pixels, check_size)
        if isinstance(source, (str, os.PathLike)):
            try:
                fp = open(source, "rb")
            except OSError as e:
                raise InvalidImageError(
                    "unreadable_file", f"cannot read image file {os.fspath(source)!r}: {e.strerror}"
                ) from e
            with fp:
                return _open_and_prepare(fp, max_pixels, check_size)
    raise TypeError(f"expected image bytes, a path or a PIL image, got {type(source).__name__}")


def _open_and_prepare(fp: BinaryIO, max_pixels: int, check_size: SizeCheck | None) -> Image.Image:
    Image.init()  # registers every plugin (once), so the filter below sees them all
    formats = tuple(name for name in ACCEPTED_FORMATS if name in Image.OPEN)
    try:
        image = Image.open(fp, formats=formats)
    except _BOMB as e:
        raise InvalidImageError("too_many_pixels", f"image declares too many pixels: {e}") from e
    except Image.UnidentifiedImageError as e:
        fp.seek(0)
        declared = _png_declared_size(fp.read(24))
        if declared is not None and 0 in declared:
            raise InvalidImageError("empty_image", f"image has no pixels ({declared[0]}x{declared[1]})") from e
        raise InvalidImageError(
            "not_an_image", f"data is not an image in a supported format ({', '.join(formats)})"
        ) from e
    except Exception as e:  # each Pillow plugin fails on a malformed header in its own way
        raise InvalidImageError("corrupt_image", f"image header is corrupt: {e}") from e
    with image:
        return _prepare(image, max_pixels, check_size)


def _png_declared_size(head: bytes) -> tuple[int, int] | None:
    """Width and height from a PNG's IHDR. Pillow refuses zero-area PNGs as unidentifiable; this tells
    an empty PNG from data that is no image at all."""
    if len(head) < 24 or head[:8] != _PNG_SIGNATURE or head[12:16] != b"IHDR":
        return None
    return struct.unpack(">II", head[16:24])


def _prepare(image: Image.Image, max_pixels: int, check_size: SizeCheck | None) -> Image.Image:
    width, height = image.size
    if width <= 0 or height <= 0:
        raise InvalidImageError("empty_image", f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise InvalidImageError(
            "too_many_pixels",
            f"image is {width}x{height} = {width * height} pixels, more than the limit of {max_pixels}",
        )
    if check_size is not None:
        check_size(width, height)
    try:
        image.load()
    except _BOMB as e:  # an animation frame can declare its own size
        raise InvalidImageError("too_many_pixels", f"image declares too many pixels: {e}") from e
    except Exception as e:  # truncated streams raise OSError, broken ones anything from zlib to struct
        raise InvalidImageError("corrupt_image", f"image data is truncated or corrupt: {e}") from e
    return _to_rgba(_apply_exif_orientation(image))


def _apply_exif_orientation(image: Image.Image) -> Image.Image:
    try:
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # a malformed EXIF block should not reject pixels that decoded fine
        return image
    if orientation in (2, 3, 4, 5, 6, 7, 8):
        return ImageOps.exif_transpose(image)
    return image


def _to_rgba(image: Image.Image) -> Image.Image:
    """A new RGBA image (never the object passed in, which may belong to the caller)."""
    if image.mode in _WIDE_GRAY_MODES:
        return _wide_gray_to_rgba(image)
    try:
        if image.mode in _CONVERT_VIA:
            image = image.convert(_CONVERT_VIA[image.mode])
        return image.convert("RGBA")
    except ValueError as e:
        raise InvalidImageError("unsupported_mode", f"cannot convert pixel mode {image.mode!r} to RGBA") from e


def _wide_gray_to_rgba(image: Image.Image) -> Image.Image:
    """16-bit gray to 8 bits by rounding v / 257, so 0 -> 0, 32768 -> 128 and 65535 -> 255.

    Mode "I" is read as 16-bit data too: Pillow decodes 16-bit PGM to it (scaled to 0..65535), as older
    Pillow releases did 16-bit PNG.
    """
    values = np.asarray(image).astype(np.int32)
    gray = np.rint(np.clip(values, 0, 65535) / 257.0).astype(np.uint8)
    alpha = np.full_like(gray, 255)
    transparent = image.info.get("transparency")
    if isinstance(transparent, int):
        alpha[values == transparent] = 0
    return Image.fromarray(np.stack([gray, gray, gray, alpha], axis=-1))


def validate_resolution(resolution: int) -> int:
    """The bucket resolution as an int; ValueError unless it is one the model was trained at."""
    if isinstance(resolution, bool) or resolution not in RESOLUTIONS:
        raise ValueError(f"resolution must be 640 or 1024, got {resolution!r}")
    return int(resolution)


def bucket_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """The (width, height) an image of this size is decomposed at.

    Like the reference: the area is resolution^2 with the aspect ratio kept, each side rounded to
    the nearest multiple of 32 (Python's round, ties to even), then floored to a multiple of 16.
    Images longer than 16 times their width (or the reverse) raise InvalidImageError.
    """
    resolution = validate_resolution(resolution)
    if width <= 0 or height <= 0:
        raise InvalidImageError("empty_image", f"image has no pixels ({width}x{height})")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise InvalidImageError(
            "bad_aspect_ratio",
            f"aspect ratio of {width}x{height} is beyond 1:{MAX_ASPECT_RATIO}; crop or pad the image first",
        )
    ratio = width / height
    exact_width = math.sqrt(resolution * resolution * ratio)
    exact_height = exact_width / ratio
    bucket_width = round(exact_width / 32) * 32 // 16 * 16
    bucket_height = round(exact_height / 32) * 32 // 16 * 16
    if min(bucket_width, bucket_height) < MIN_SIDE:
        raise InvalidImageError(
            "bad_aspect_ratio", f"{width}x{height} gives a {bucket_width}x{bucket_height} bucket, below {MIN_SIDE} px"
        )
    return bucket_width, bucket_height


@dataclass(frozen=True)
class BucketImage:
    """An RGBA image resized once to the bucket it is decomposed at, and the size of the image it came from.

    What a server keeps of an upload: bucket area x 4 bytes (1.6 MB at 640, 4.2 MB at 1024) instead of the
    full decode (160 MB for 40 megapixels). ``width`` and ``height`` are the SOURCE size: the bucket is
    computed from it, and a bucket is not always its own bucket (at 640, 3000x1000 -> 1120x384 but
    1120x384 -> 1088x384), so code that takes ``bucket_size(image.width, image.height, resolution)`` gets
    the same bucket for a BucketImage as for the image it was made from.
    """

    pixels: Image.Image
    width: int
    height: int
    resolution: int

    def __post_init__(self) -> None:
        expected = bucket_size(self.width, self.height, self.resolution)
        if self.pixels.mode != "RGBA" or self.pixels.size != expected:
            width, height = self.pixels.size
            raise ValueError(
                f"a BucketImage of {self.width}x{self.height} at {self.resolution} holds RGBA "
                f"{expected[0]}x{expected[1]} pixels, got {self.pixels.mode} {width}x{height}"
            )


ConditionImage = Image.Image | BucketImage


def resize_to_bucket(image: Image.Image, resolution: int) -> BucketImage:
    """An RGBA image (see load_image) resized to its bucket as the reference resizes it (Lanczos)."""
    if image.mode != "RGBA":
        raise ValueError(f"resize_to_bucket needs an RGBA image (see load_image), got mode {image.mode!r}")
    size = bucket_size(image.width, image.height, resolution)
    pixels = image if image.size == size else image.resize(size, resample=Image.Resampling.LANCZOS)
    return BucketImage(pixels, image.width, image.height, resolution)


def bucket_pixels(image: ConditionImage, resolution: int) -> Image.Image:
    """The pixels the model sees at ``resolution``: a BucketImage's own, or the image resized to its bucket."""
    if isinstance(image, BucketImage):
        if image.resolution != validate_resolution(resolution):
            raise ValueError(f"the image was resized for resolution {image.resolution}, not {resolution}")
        return image.pixels
    return resize_to_bucket(image, resolution).pixels


def image_to_tensor(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """An RGBA image as a [1, 4, height, width] float32 tensor in [-1, 1], resized as the reference does.

    Pillow's Lanczos resize (which resizes RGBA with premultiplied alpha), then b / 255 * 2 - 1 per
    channel. ``width`` and ``height`` are a bucket size, i.e. multiples of 16.
    """
    import torch

    if image.mode != "RGBA":
        raise ValueError(f"image_to_tensor needs an RGBA image (see load_image), got mode {image.mode!r}")
    if width <= 0 or height <= 0 or width % 16 or height % 16:
        raise ValueError(f"width and height must be positive multiples of 16, got {width}x{height}")
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.Resampling.LANCZOS)
    pixels = _BYTE_TO_UNIT[np.asarray(image)]  # (H, W, 4) float32
    return torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0).contiguous()


def tensor_to_images(x: torch.Tensor) -> list[Image.Image]:
    """[B, 4, H, W] in [-1, 1] (any float dtype, any device) to B RGBA images, rounded as the reference.

    x * 0.5 + 0.5 clamped to [0, 1] in the tensor's own dtype, then float32, * 255, round half to
    even. NaN (a diverged sample) becomes 0 rather than whatever an undefined cast would give.
    """
    import torch

    if x.ndim != 4 or x.shape[1] != 4:
        raise ValueError(f"expected a [B, 4, H, W] tensor, got shape {tuple(x.shape)}")
    unit = (x * 0.5 + 0.5).clamp(0, 1).float()
    pixels = (unit * 255).round().nan_to_num_(0.0).to(torch.uint8)
    pixels = pixels.permute(0, 2, 3, 1).contiguous().cpu().numpy()
    return [Image.fromarray(p) for p in pixels]
