"""Input decoding, resolution buckets and tensor conversion, checked against diffusers' reference code."""

from __future__ import annotations

import ast
import functools
import io
import math
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from tests.reference import import_reference
from vllm_layered.model_executor.image_processing import (
    BucketImage,
    InvalidImageError,
    bucket_pixels,
    bucket_size,
    image_to_tensor,
    load_image,
    resize_to_bucket,
    tensor_to_images,
    validate_resolution,
)


@functools.cache
def reference_calculate_dimensions_function():
    """diffusers' calculate_dimensions, compiled from the pipeline's source file: importing the pipeline
    module would pull in transformers' Qwen2.5-VL and cost ~9 s on a 2-core CPU."""
    path = Path(import_reference().__file__).parent / "pipelines" / "qwenimage" / "pipeline_qwenimage_layered.py"
    tree = ast.parse(path.read_text())
    (function,) = [node for node in tree.body if getattr(node, "name", None) == "calculate_dimensions"]
    namespace = {"math": math}
    exec(compile(ast.Module(body=[function], type_ignores=[]), str(path), "exec"), namespace)
    return namespace["calculate_dimensions"]


def reference_calculate_dimensions(target_area: int, ratio: float) -> tuple[int, int]:
    return reference_calculate_dimensions_function()(target_area, ratio)


def reference_processor():
    return import_reference("diffusers.image_processor").VaeImageProcessor(vae_scale_factor=16)


def encode(image: Image.Image, fmt: str = "PNG", **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_with_header(width: int, height: int) -> bytes:
    """A well-formed PNG whose IHDR claims width x height (8-bit RGB) but whose IDAT holds 16 bytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + png_chunk(b"IEND", b"")
    )


def noise_rgba(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
    pixels[: height // 4, :, 3] = 0  # a fully transparent band, whose colour premultiplied resizing drops
    return Image.fromarray(pixels)


def error_code(source, **kwargs) -> str:
    with pytest.raises(InvalidImageError) as info:
        load_image(source, **kwargs)
    assert str(info.value)  # every error names its problem
    return info.value.code


# ---- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", [30000, 10000])
def test_decompression_bomb_is_refused_from_the_header(side):
    bomb = png_with_header(side, side)
    assert len(bomb) < 100
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither PIL's DecompressionBombWarning nor its Error may escape
        assert error_code(bomb) == "too_many_pixels"


class Refused(Exception):
    pass


def test_check_size_sees_the_header_size_before_decoding():
    seen = []

    def check(width: int, height: int) -> None:
        seen.append((width, height))
        raise Refused

    # the pixel data is broken: refusing without corrupt_image shows nothing was decoded
    with pytest.raises(Refused):
        load_image(png_with_header(300, 200), check_size=check)
    with pytest.raises(InvalidImageError):  # the pixel limit comes first
        load_image(png_with_header(300, 200), max_pixels=100, check_size=check)
    assert seen == [(300, 200)]
    assert load_image(noise_rgba(30, 20), check_size=lambda w, h: seen.append((w, h))).size == (30, 20)
    assert seen[-1] == (30, 20)


def test_max_pixels_is_checked_before_decoding():
    # The header is valid but the pixel data is not: refusing it proves the data was never decoded.
    assert error_code(png_with_header(100, 100), max_pixels=9_999) == "too_many_pixels"
    assert error_code(Image.new("RGB", (100, 100)), max_pixels=9_999) == "too_many_pixels"
    assert load_image(Image.new("RGB", (100, 100)), max_pixels=10_000).size == (100, 100)


@pytest.mark.parametrize("data", [b"", b"hello, world", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n"])
def test_bytes_that_are_not_an_image(data):
    assert error_code(data) == "not_an_image"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"])
def test_truncated_data(fmt):
    image = noise_rgba(128, 128)
    data = encode(image if fmt in ("PNG", "TIFF", "WEBP") else image.convert("RGB"), fmt)
    assert load_image(data).size == (128, 128)
    assert error_code(data[: len(data) // 2]) == "corrupt_image"


def test_header_only_png_is_corrupt():
    assert error_code(png_with_header(8, 8)) == "corrupt_image"


@pytest.mark.parametrize("size", [(0, 0), (0, 7), (7, 0)])
def test_zero_area_image(size):
    assert error_code(png_with_header(*size)) == "empty_image"
    assert error_code(Image.new("RGBA", size)) == "empty_image"


def test_missing_file(tmp_path):
    assert error_code(tmp_path / "missing.png") == "unreadable_file"


def test_wrong_source_type():
    with pytest.raises(TypeError):
        load_image(12345)


# ---- decoding and mode conversion ---------------------------------------------------------------------


def test_loads_from_path_and_str(tmp_path):
    path = tmp_path / "in.png"
    image = noise_rgba(20, 10)
    path.write_bytes(encode(image))
    for source in (path, str(path)):
        assert np.array_equal(np.asarray(load_image(source)), np.asarray(image))


def test_rgba_and_rgb_are_exact():
    rgba = noise_rgba(17, 9)
    assert np.array_equal(np.asarray(load_image(encode(rgba))), np.asarray(rgba))
    rgb = load_image(encode(rgba.convert("RGB")))
    assert rgb.mode == "RGBA"
    assert np.array_equal(np.asarray(rgb)[..., :3], np.asarray(rgba)[..., :3])
    assert (np.asarray(rgb)[..., 3] == 255).all()


def test_pil_input_is_copied_not_aliased():
    image = noise_rgba(8, 8)
    loaded = load_image(image)
    assert loaded is not image
    loaded.putpixel((0, 0), (1, 2, 3, 4))
    assert image.getpixel((0, 0)) != (1, 2, 3, 4)


def test_cmyk_converts():
    cmyk = Image.new("RGB", (6, 4), (200, 30, 60)).convert("CMYK")
    loaded = load_image(encode(cmyk, "TIFF"))
    assert loaded.mode == "RGBA"
    assert loaded.getpixel((0, 0)) == (200, 30, 60, 255)
    jpeg = load_image(encode(cmyk, "JPEG", quality=100))  # Adobe CMYK JPEGs store inverted ink values
    assert np.abs(np.asarray(jpeg, dtype=int)[2, 3] - (200, 30, 60, 255)).max() <= 3


def test_palette_without_transparency():
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([255, 0, 0, 0, 0, 255])
    assert load_image(encode(palette)).getpixel((0, 0)) == (0, 0, 255, 255)


def test_palette_with_transparency_keeps_alpha():
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([255, 0, 0, 0, 0, 255])
    palette.putpixel((1, 1), 1)
    data = encode(palette, transparency=0)
    assert Image.open(io.BytesIO(data)).mode == "P"
    loaded = load_image(data)
    assert loaded.getpixel((0, 0))[3] == 0
    assert loaded.getpixel((1, 1)) == (0, 0, 255, 255)


def test_palette_with_partial_alpha_table():
    palette = Image.new("P", (2, 1), 0)
    palette.putpalette([10, 20, 30, 40, 50, 60])
    palette.putpixel((1, 0), 1)
    loaded = load_image(encode(palette, transparency=bytes([128, 255])))
    assert loaded.getpixel((0, 0)) == (10, 20, 30, 128)
    assert loaded.getpixel((1, 0)) == (40, 50, 60, 255)


def test_gray_modes():
    assert load_image(encode(Image.new("L", (3, 3), 77))).getpixel((0, 0)) == (77, 77, 77, 255)
    assert load_image(encode(Image.new("LA", (3, 3), (77, 99)))).getpixel((0, 0)) == (77, 77, 77, 99)
    bits = Image.new("1", (3, 3), 0)
    bits.putpixel((1, 1), 1)
    loaded = load_image(encode(bits))
    assert loaded.getpixel((0, 0)) == (0, 0, 0, 255)
    assert loaded.getpixel((1, 1)) == (255, 255, 255, 255)


def test_gray_with_transparent_key():
    gray = Image.new("L", (3, 3), 10)
    gray.putpixel((1, 1), 200)
    loaded = load_image(encode(gray, transparency=10))
    assert loaded.getpixel((0, 0))[3] == 0
    assert loaded.getpixel((1, 1)) == (200, 200, 200, 255)


def sixteen_bit_gray() -> Image.Image:
    values = np.array([[0, 32768, 65535, 257 * 77]], dtype=np.uint16)
    return Image.fromarray(values)  # mode I;16


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_sixteen_bit_gray_is_scaled_not_clipped(fmt):
    data = encode(sixteen_bit_gray(), fmt)
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    loaded = load_image(data)
    assert loaded.mode == "RGBA"
    assert [loaded.getpixel((x, 0)) for x in range(4)] == [
        (0, 0, 0, 255),
        (128, 128, 128, 255),
        (255, 255, 255, 255),
        (77, 77, 77, 255),
    ]


def test_thirty_two_bit_int_gray_reads_as_sixteen_bit():
    loaded = load_image(sixteen_bit_gray().convert("I"))
    assert [loaded.getpixel((x, 0))[0] for x in range(4)] == [0, 128, 255, 77]


def test_sixteen_bit_pgm():
    data = b"P5 3 1 1000\n" + struct.pack(">3H", 0, 500, 1000)  # maxval 1000: Pillow rescales to 16 bits
    loaded = load_image(data)
    assert [loaded.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_sixteen_bit_gray_transparent_key():
    loaded = load_image(encode(sixteen_bit_gray(), transparency=32768))
    assert loaded.getpixel((1, 0)) == (128, 128, 128, 0)
    assert loaded.getpixel((2, 0)) == (255, 255, 255, 255)


@pytest.mark.parametrize("mode", ["YCbCr", "HSV", "LAB", "RGBX", "RGBa", "La", "PA", "F"])
def test_other_modes_convert(mode):
    image = Image.new("RGBA", (3, 2), (120, 60, 30, 200))
    via = {"La": "LA", "F": "L", "PA": "P"}
    image = image.convert("RGB").convert(via[mode]).convert(mode) if mode in via else image.convert(mode)
    loaded = load_image(image)
    assert loaded.mode == "RGBA" and loaded.size == (3, 2)


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 4, 4))  # marks the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display after turning 90 degrees clockwise
    data = encode(image, exif=exif.tobytes())
    loaded = load_image(data)
    assert loaded.size == (20, 40)
    assert loaded.getpixel((19, 0)) == (255, 0, 0, 255)  # the corner is now top-right
    expected = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGBA")
    assert np.array_equal(np.asarray(loaded), np.asarray(expected))


def test_animated_gif_and_png_use_first_frame():
    frames = [Image.new("RGB", (8, 8), color) for color in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    for fmt in ("GIF", "PNG"):
        data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50)
        assert Image.open(io.BytesIO(data)).n_frames == 3
        assert load_image(data).getpixel((4, 4)) == (255, 0, 0, 255)


# ---- resolution buckets ---------------------------------------------------------------------------------

ASPECT_SIZES = {
    "1:1": (1000, 1000),
    "4:3": (1200, 900),
    "3:4": (900, 1200),
    "16:9": (1920, 1080),
    "9:16": (1080, 1920),
    "21:9": (2520, 1080),
    "1:3": (500, 1500),
}


@pytest.mark.parametrize("resolution", [640, 1024])
@pytest.mark.parametrize("aspect", list(ASPECT_SIZES))
def test_bucket_size_matches_reference(aspect, resolution):
    width, height = ASPECT_SIZES[aspect]
    ref_width, ref_height = reference_calculate_dimensions(resolution * resolution, width / height)
    expected = (ref_width // 16 * 16, ref_height // 16 * 16)
    assert bucket_size(width, height, resolution) == expected
    bucket_width, bucket_height = expected
    assert bucket_width % 32 == 0 and bucket_height % 32 == 0
    assert math.isclose(bucket_width * bucket_height, resolution**2, rel_tol=0.1)


def test_bucket_size_known_values():
    assert bucket_size(1000, 1000, 640) == (640, 640)
    assert bucket_size(1000, 1000, 1024) == (1024, 1024)
    assert bucket_size(1920, 1080, 640) == (864, 480)


@pytest.mark.parametrize("size", [(16000, 1000), (1000, 16000), (1, 16), (16, 1)])
def test_bucket_size_at_the_aspect_limit(size):
    for resolution in (640, 1024):
        width, height = bucket_size(*size, resolution)
        assert min(width, height) >= resolution // 4 >= 32


@pytest.mark.parametrize("size", [(16001, 1000), (1, 17), (100000, 1)])
def test_bucket_size_refuses_extreme_aspect_ratios(size):
    with pytest.raises(InvalidImageError) as info:
        bucket_size(*size, 640)
    assert info.value.code == "bad_aspect_ratio"
    assert "1:16" in str(info.value)


def test_bucket_size_refuses_empty():
    with pytest.raises(InvalidImageError) as info:
        bucket_size(0, 10, 640)
    assert info.value.code == "empty_image"


@pytest.mark.parametrize("resolution", [0, 512, "640", True, 640.5])
def test_validate_resolution_rejects(resolution):
    with pytest.raises(ValueError, match="resolution must be 640 or 1024, got"):
        validate_resolution(resolution)
    with pytest.raises(ValueError, match="resolution must be 640 or 1024"):
        bucket_size(100, 100, resolution)


def test_validate_resolution_message():
    with pytest.raises(ValueError) as info:
        validate_resolution(800)
    assert str(info.value) == "resolution must be 640 or 1024, got 800"
    assert validate_resolution(640) == 640 and validate_resolution(1024) == 1024


# ---- bucket images ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("source_size", "resolution"), [((300, 100), 640), ((96, 64), 640), ((1000, 700), 1024)])
def test_resize_to_bucket_is_the_reference_resize(source_size, resolution):
    image = noise_rgba(*source_size)
    bucket = resize_to_bucket(image, resolution)
    width, height = bucket_size(*source_size, resolution)
    assert (bucket.width, bucket.height, bucket.resolution) == (*source_size, resolution)
    assert bucket.pixels.mode == "RGBA" and bucket.pixels.size == (width, height)
    reference = reference_processor().resize(image, height, width)
    assert np.array_equal(np.asarray(bucket.pixels), np.asarray(reference))
    assert bucket_pixels(bucket, resolution) is bucket.pixels
    assert np.array_equal(np.asarray(bucket_pixels(image, resolution)), np.asarray(reference))


def test_a_bucket_image_keeps_its_source_bucket():
    # 1120x384 is the 640 bucket of 3000x1000 but not its own (1088x384): recomputing the bucket from the
    # resized pixels would pick another shape, so a BucketImage answers with the source size.
    assert bucket_size(3000, 1000, 640) == (1120, 384) and bucket_size(1120, 384, 640) == (1088, 384)
    bucket = resize_to_bucket(Image.new("RGBA", (3000, 1000)), 640)
    assert bucket_size(bucket.width, bucket.height, 640) == bucket.pixels.size == (1120, 384)
    assert bucket_pixels(bucket, 640).size == (1120, 384)


def test_bucket_images_refuse_mismatches():
    bucket = resize_to_bucket(noise_rgba(96, 64), 640)
    with pytest.raises(ValueError, match="resized for resolution 640, not 1024"):
        bucket_pixels(bucket, 1024)
    with pytest.raises(ValueError, match="holds RGBA 768x512 pixels, got RGBA 96x64"):
        BucketImage(noise_rgba(96, 64), 96, 64, 640)
    with pytest.raises(ValueError, match="RGBA"):
        resize_to_bucket(Image.new("RGB", (96, 64)), 640)


# ---- tensors in and out -------------------------------------------------------------------------------


def reference_preprocess(image: Image.Image, width: int, height: int) -> torch.Tensor:
    processor = reference_processor()
    resized = processor.resize(image, height, width)
    return processor.preprocess(resized, height, width)


@pytest.mark.parametrize(("source_size", "resolution"), [((300, 200), 640), ((640, 640), 640), ((200, 500), 1024)])
def test_image_to_tensor_matches_reference_bit_for_bit(source_size, resolution):
    image = noise_rgba(*source_size)
    width, height = bucket_size(*image.size, resolution)
    ours = image_to_tensor(image, width, height)
    reference = reference_preprocess(image, width, height)
    assert ours.shape == (1, 4, height, width) and ours.dtype == torch.float32
    assert torch.equal(ours, reference)
    assert ours.min() >= -1 and ours.max() <= 1


def test_image_to_tensor_rejects_bad_arguments():
    with pytest.raises(ValueError, match="RGBA"):
        image_to_tensor(Image.new("RGB", (32, 32)), 32, 32)
    with pytest.raises(ValueError, match="multiples of 16"):
        image_to_tensor(Image.new("RGBA", (32, 32)), 40, 32)


def reference_postprocess(x: torch.Tensor) -> list[Image.Image]:
    return reference_processor().postprocess(x, output_type="pil")


def rounding_edge_values() -> torch.Tensor:
    # Values whose byte value lands exactly on k + 0.5 (round half to even decides), plus out-of-range ones.
    halves = (torch.arange(256, dtype=torch.float32) + 0.5) / 255 * 2 - 1
    return torch.cat([halves, torch.tensor([-1.5, -1.0, 0.0, 1.0, 1.5])])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_tensor_to_images_matches_reference(dtype):
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(3, 4, 24, 40, generator=generator) * 2.4 - 1.2
    edge = rounding_edge_values()
    x.view(-1)[: edge.numel()] = edge
    x = x.to(dtype)
    ours = tensor_to_images(x)
    reference = reference_postprocess(x)
    assert len(ours) == 3
    for mine, theirs in zip(ours, reference):
        assert mine.mode == theirs.mode == "RGBA"
        assert np.array_equal(np.asarray(mine), np.asarray(theirs))


def test_tensor_round_trip_is_lossless():
    image = noise_rgba(48, 32)
    (back,) = tensor_to_images(image_to_tensor(image, 48, 32))
    assert np.array_equal(np.asarray(back), np.asarray(image))


def test_tensor_to_images_rejects_bad_shapes_and_maps_nan():
    with pytest.raises(ValueError, match=r"\[B, 4, H, W\]"):
        tensor_to_images(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError):
        tensor_to_images(torch.zeros(4, 8, 8))
    (image,) = tensor_to_images(torch.full((1, 4, 2, 2), float("nan")))
    assert image.getpixel((0, 0)) == (0, 0, 0, 0)
