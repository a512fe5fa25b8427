"""Trees as files (vllm_layered.formats): PNG folders, zip, PSD with layer groups and PPTX with group shapes,
each reopened with its own reader and walked as a tree."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
from PIL import Image

from vllm_layered.formats import composite_layers, package_bytes, save_tree, tree_files
from vllm_layered.layer_tree import LayerNode, LayerTree

SIZE = (48, 32)
FULL = (0, 0, *SIZE)
EXPECTED_FILES = [
    "layer_00.png",
    "layer_01.png",
    "layer_01/layer_00.png",
    "layer_01/layer_00/layer_00.png",
    "layer_01/layer_00/layer_01.png",
    "layer_01/layer_00/composite.png",
    "layer_01/layer_01.png",
    "layer_01/composite.png",
    "layer_02.png",
    "composite.png",
]

_rng = np.random.default_rng(0)


def layer(box: tuple[int, int, int, int], opaque: bool = False) -> Image.Image:
    """Random RGBA pixels inside ``box``, transparent outside."""
    a = np.zeros((SIZE[1], SIZE[0], 4), np.uint8)
    left, top, right, bottom = box
    a[top:bottom, left:right] = _rng.integers(1, 256, (bottom - top, right - left, 4), dtype=np.uint8)
    if opaque:
        a[..., 3] = 255
    return Image.fromarray(a)


def flat_tree() -> LayerTree:
    boxes = [FULL, (4, 2, 40, 30), (10, 10, 20, 20)]
    images = [layer(box, opaque=i == 0) for i, box in enumerate(boxes)]  # an opaque background: psd-tools
    return LayerTree([LayerNode(str(i), im, FULL) for i, im in enumerate(images)], "p", 1)  # merges to RGB


@pytest.fixture
def tree() -> LayerTree:
    """Root of 3 layers; layer 1 refined into 2; layer 1.0 refined into 2 (the issue's example)."""
    tree = flat_tree()
    tree.refine("1", [layer((4, 2, 40, 16)), layer((4, 16, 40, 30))], (2, 0, 42, 32), "q")
    tree.refine("1.0", [layer((4, 2, 20, 16)), layer((20, 2, 40, 16))], (3, 1, 41, 17), "r")
    return tree


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGBA"))


def expected_image(tree: LayerTree, name: str) -> Image.Image:
    """The image a file of the folder layout must hold, looked up in the tree by its own rule."""
    folder, _, file = name.rpartition("/")
    indices = [int(part.removeprefix("layer_")) for part in folder.split("/") if part]
    nodes = tree.layers
    for index in indices:
        nodes = nodes[index].children
    if file == "composite.png":
        return composite_layers([node.image for node in nodes])
    return nodes[int(file.removeprefix("layer_").removesuffix(".png"))].image


def test_folders(tree, tmp_path):
    assert [name for name, _ in tree_files(tree)] == EXPECTED_FILES
    paths = save_tree(tree, tmp_path / "out", "png")
    assert [p.relative_to(tmp_path / "out").as_posix() for p in paths] == EXPECTED_FILES
    written = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.png"))
    assert written == sorted(EXPECTED_FILES)
    for name in EXPECTED_FILES:
        assert np.array_equal(pixels(Image.open(tmp_path / "out" / name)), pixels(expected_image(tree, name)))


def test_zip(tree, tmp_path):
    data = package_bytes(tree, "zip")
    assert package_bytes(tree, "zip") == data  # deterministic
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert archive.namelist() == EXPECTED_FILES
        for name in EXPECTED_FILES:
            image = Image.open(io.BytesIO(archive.read(name)))
            assert np.array_equal(pixels(image), pixels(expected_image(tree, name)))
    (path,) = save_tree(tree, tmp_path / "sub" / "tree.zip", "zip")
    assert path.read_bytes() == data


def psd_layer_pixels(psd_layer, size) -> np.ndarray:
    """A PSD pixel layer on a transparent canvas of the document's size (psd-tools may trim layers)."""
    canvas = Image.new("RGBA", size, (0, 0, 0, 0))
    canvas.paste(psd_layer.topil().convert("RGBA"), (psd_layer.left, psd_layer.top))
    return pixels(canvas)


def test_psd_reopens_as_the_tree(tree, tmp_path):
    psd_tools = pytest.importorskip("psd_tools")
    (path,) = save_tree(tree, tmp_path / "tree.psd", "psd")
    document = psd_tools.PSDImage.open(path)
    assert document.size == SIZE
    seen = []

    def walk(group, nodes):
        assert len(group) == len(nodes)
        for psd_layer, node in zip(group, nodes):
            seen.append(node.path)
            assert psd_layer.name == {"0": "Layer 0 (bottom)", "1": "Layer 1", "2": "Layer 2 (top)"}.get(
                node.path, "Layer 0 (bottom)" if node.index == 0 else "Layer 1 (top)"
            )
            if node.children:
                assert psd_layer.kind == "group"
                walk(psd_layer, node.children)
            else:
                assert psd_layer.kind == "pixel"
                assert np.array_equal(psd_layer_pixels(psd_layer, SIZE), pixels(node.image)), node.path

    walk(document, tree.layers)
    assert seen == [node.path for node in tree.walk()]
    # the merged image is what the layers show: the finest layers stacked (psd-tools may render it itself)
    merged = np.asarray(document.topil().convert("RGB")).astype(int)
    leaves = pixels(composite_layers([n.image for n in tree.leaves()]))[..., :3].astype(int)
    assert np.abs(merged - leaves).max() <= 1


def test_pptx_reopens_as_the_tree(tree, tmp_path):
    pptx = pytest.importorskip("pptx")
    from pptx.enum.shapes import MSO_SHAPE_TYPE

    (path,) = save_tree(tree, tmp_path / "tree.pptx", "pptx")
    presentation = pptx.Presentation(str(path))
    (slide,) = presentation.slides
    slide_size = (presentation.slide_width, presentation.slide_height)
    seen = []

    def walk(shapes, nodes):
        shapes = list(shapes)
        assert len(shapes) == len(nodes)
        for shape, node in zip(shapes, nodes):
            seen.append(node.path)
            assert shape.name.startswith(f"Layer {node.index}")
            if node.children:
                assert shape.shape_type == MSO_SHAPE_TYPE.GROUP
                walk(shape.shapes, node.children)
            else:
                assert shape.shape_type == MSO_SHAPE_TYPE.PICTURE
                assert (shape.left, shape.top, shape.width, shape.height) == (0, 0, *slide_size)
                assert np.array_equal(pixels(Image.open(io.BytesIO(shape.image.blob))), pixels(node.image))

    walk(slide.shapes, tree.layers)
    assert seen == [node.path for node in tree.walk()]


def test_bad_format(tree, tmp_path):
    with pytest.raises(ValueError, match="fmt must be one of png, zip, psd, pptx"):
        save_tree(tree, tmp_path / "x", "tiff")
