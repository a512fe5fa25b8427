"""A stack of layers as files (vllm_layered.formats): PNG folder, zip, PSD and PPTX, each reopened with its own
reader; the encoders; checking and compositing a stack."""

from __future__ import annotations

import io
import sys
import zipfile

import numpy as np
import pytest
from PIL import Image

from vllm_layered.formats import (
    composite_layers,
    encode_png,
    encode_webp,
    layer_name,
    package_bytes,
    save_layers,
    stack_tree,
)

WIDTH, HEIGHT = 48, 32
EXPECTED_NAMES = ["layer_00.png", "layer_01.png", "layer_02.png", "composite.png"]


@pytest.fixture
def layers() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    background = rng.integers(0, 256, (HEIGHT, WIDTH, 4), dtype=np.uint8)
    background[..., 3] = 255
    middle = np.zeros((HEIGHT, WIDTH, 4), dtype=np.uint8)
    middle[4:20, 6:30] = (0, 200, 0, 160)
    top = rng.integers(0, 256, (HEIGHT, WIDTH, 4), dtype=np.uint8)
    top[..., 3] = 0
    top[10:14, 10:40, 3] = 255
    return [Image.fromarray(a) for a in (background, middle, top)]


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGBA"))


def test_encoders_round_trip(layers):
    for image in layers:
        assert np.array_equal(pixels(Image.open(io.BytesIO(encode_png(image)))), pixels(image))
        assert np.array_equal(pixels(Image.open(io.BytesIO(encode_png(image, compress_level=1)))), pixels(image))
        webp = Image.open(io.BytesIO(encode_webp(image)))
        assert webp.format == "WEBP" and np.array_equal(pixels(webp), pixels(image))
        lossy = Image.open(io.BytesIO(encode_webp(layers[1], lossless=False, quality=80)))
        assert lossy.size == (WIDTH, HEIGHT)


def test_layer_names():
    assert [layer_name(i, 3) for i in range(3)] == ["Layer 0 (bottom)", "Layer 1", "Layer 2 (top)"]
    assert layer_name(0, 1) == "Layer 0 (bottom)"


def test_png_folder(layers, tmp_path):
    out = tmp_path / "result"
    paths = save_layers(layers, out, "png")
    assert [p.name for p in paths] == EXPECTED_NAMES
    assert sorted(p.name for p in out.iterdir()) == sorted(EXPECTED_NAMES)
    for path, image in zip(paths, layers):
        assert np.array_equal(pixels(Image.open(path)), pixels(image))
    assert np.array_equal(pixels(Image.open(out / "composite.png")), pixels(composite_layers(layers)))


def test_zip(layers, tmp_path):
    data = package_bytes(stack_tree(layers), "zip")
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert archive.namelist() == EXPECTED_NAMES
        for name, image in zip(EXPECTED_NAMES, layers):
            assert np.array_equal(pixels(Image.open(io.BytesIO(archive.read(name)))), pixels(image))
        assert np.array_equal(
            pixels(Image.open(io.BytesIO(archive.read("composite.png")))), pixels(composite_layers(layers))
        )
    assert package_bytes(stack_tree(layers), "zip") == data  # deterministic
    (path,) = save_layers(layers, tmp_path / "sub" / "layers.zip", "zip")
    assert path.read_bytes() == data


def test_psd(layers, tmp_path):
    psd_tools = pytest.importorskip("psd_tools")
    (path,) = save_layers(layers, tmp_path / "layers.psd", "psd")
    assert path.read_bytes() == package_bytes(stack_tree(layers), "psd")
    document = psd_tools.PSDImage.open(path)
    assert document.size == (WIDTH, HEIGHT)
    assert len(document) == 3
    assert [layer.name for layer in document] == ["Layer 0 (bottom)", "Layer 1", "Layer 2 (top)"]
    for layer in document:
        assert layer.kind == "pixel" and layer.bbox == (0, 0, WIDTH, HEIGHT)
    middle = document[1].topil()
    assert middle.mode == "RGBA"
    assert np.array_equal(pixels(middle), pixels(layers[1]))
    merged = np.asarray(document.topil().convert("RGB"))
    assert np.array_equal(merged, pixels(composite_layers(layers))[..., :3])


def test_pptx(layers, tmp_path):
    pptx = pytest.importorskip("pptx")
    (path,) = save_layers(layers, tmp_path / "layers.pptx", "pptx")
    presentation = pptx.Presentation(str(path))
    assert len(presentation.slides) == 1
    assert presentation.slide_width * HEIGHT == pytest.approx(presentation.slide_height * WIDTH, rel=1e-6)
    pictures = [s for s in presentation.slides[0].shapes if s.shape_type == pptx.enum.shapes.MSO_SHAPE_TYPE.PICTURE]
    assert len(pictures) == 3
    assert [p.name for p in pictures] == ["Layer 0 (bottom)", "Layer 1", "Layer 2 (top)"]
    for picture, image in zip(pictures, layers):
        assert (picture.left, picture.top) == (0, 0)
        assert (picture.width, picture.height) == (presentation.slide_width, presentation.slide_height)
        assert np.array_equal(pixels(Image.open(io.BytesIO(picture.image.blob))), pixels(image))


@pytest.mark.parametrize(("size", "long_side_emu"), [((4096, 256), 14_630_400), ((640, 640), 12_192_000)])
def test_pptx_slide_stays_within_powerpoint_limits(size, long_side_emu):
    pptx = pytest.importorskip("pptx")
    presentation = pptx.Presentation(io.BytesIO(package_bytes(stack_tree([Image.new("RGBA", size)]), "pptx")))
    width, height = presentation.slide_width, presentation.slide_height
    assert max(width, height) == long_side_emu
    assert min(width, height) >= 914_400
    assert width * size[1] == pytest.approx(height * size[0], rel=1e-6)


def test_missing_optional_dependency_names_the_extra(layers, monkeypatch):
    monkeypatch.setitem(sys.modules, "pptx", None)
    with pytest.raises(ImportError, match=r"python-pptx.*vllm-layered\[export\]"):
        package_bytes(stack_tree(layers), "pptx")
    monkeypatch.setitem(sys.modules, "psd_tools", None)
    with pytest.raises(ImportError, match=r"psd-tools.*vllm-layered\[export\]"):
        package_bytes(stack_tree(layers), "psd")


def test_bad_requests(layers, tmp_path):
    with pytest.raises(ValueError, match="fmt must be one of png, zip, psd, pptx, got 'jpg'"):
        save_layers(layers, tmp_path / "x.jpg", "jpg")
    with pytest.raises(ValueError, match="at least one layer"):
        save_layers([], tmp_path / "x.zip", "zip")
    with pytest.raises(ValueError, match="layer 1"):
        package_bytes(stack_tree([layers[0], layers[1].resize((8, 8))]), "zip")
    with pytest.raises(ValueError, match="a package is one of zip, psd, pptx, got 'png'"):
        package_bytes(stack_tree(layers), "png")
    with pytest.raises(ValueError, match="layer 2"):
        package_bytes(stack_tree([layers[0], layers[1], layers[2].convert("RGB")]), "pptx")
    assert not any(tmp_path.iterdir())  # nothing is written for a refused request


def test_composite_layers_bottom_first():
    bottom = Image.new("RGBA", (4, 4), (255, 0, 0, 255))
    top = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    top.putpixel((1, 1), (0, 0, 255, 128))
    merged = composite_layers([bottom, top])
    assert merged.getpixel((0, 0)) == (255, 0, 0, 255)
    assert merged.getpixel((1, 1)) == Image.alpha_composite(bottom, top).getpixel((1, 1))
    assert composite_layers([top, bottom]).getpixel((1, 1)) == (255, 0, 0, 255)
    assert bottom.getpixel((1, 1)) == (255, 0, 0, 255)  # inputs are left alone


def test_composite_layers_rejects_bad_stacks():
    with pytest.raises(ValueError):
        composite_layers([])
    with pytest.raises(ValueError, match="layer 1"):
        composite_layers([Image.new("RGBA", (4, 4)), Image.new("RGBA", (4, 5))])
    with pytest.raises(ValueError, match="layer 0"):
        composite_layers([Image.new("RGB", (4, 4))])
