"""The one rule for where `decompose` and `client decompose` write (vllm_layered.clients.output)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

from vllm_layered.clients.output import OutputTarget, resize_layers, resolve_output

IMAGE = "photos/cat.png"


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)


def test_png_writes_a_folder() -> None:
    assert resolve_output("layers", None, IMAGE) == OutputTarget("png", Path("layers"))
    assert resolve_output("out/layers/", "png", IMAGE) == OutputTarget("png", Path("out/layers"))
    Path("existing").mkdir()
    assert resolve_output("existing", "png", IMAGE) == OutputTarget("png", Path("existing"))


def test_the_format_follows_the_extension_when_not_given() -> None:
    for fmt in ("zip", "psd", "pptx"):
        assert resolve_output(f"stack.{fmt}", None, IMAGE) == OutputTarget(fmt, Path(f"stack.{fmt}"))
    assert resolve_output("stack.PSD", None, IMAGE) == OutputTarget("psd", Path("stack.PSD"))
    Path("folder.zip").mkdir()  # a folder is a folder whatever its name
    assert resolve_output("folder.zip", None, IMAGE) == OutputTarget("png", Path("folder.zip"))


def test_a_package_goes_into_a_folder_or_a_file_of_its_extension() -> None:
    Path("existing").mkdir()
    assert resolve_output("existing", "psd", IMAGE) == OutputTarget("psd", Path("existing/cat.psd"))
    assert resolve_output("pkgdir/", "psd", IMAGE) == OutputTarget("psd", Path("pkgdir/cat.psd"))
    assert resolve_output("pkgdir", "zip", IMAGE) == OutputTarget("zip", Path("pkgdir/cat.zip"))
    assert resolve_output("a/b/stack.pptx", "pptx", IMAGE) == OutputTarget("pptx", Path("a/b/stack.pptx"))
    Path("old.zip").write_bytes(b"replaced")
    assert resolve_output("old.zip", None, IMAGE) == OutputTarget("zip", Path("old.zip"))


@pytest.mark.parametrize(
    ("out", "fmt", "message"),
    [
        ("stack.zip", "psd", "must be a .psd file or a folder"),
        ("stack.psd", "png", "names a .psd file, but --format png writes a folder"),
        ("a-file", "png", "is a file; PNG layers go into a folder"),
        ("a-file", "zip", "it is a file without the extension"),
        ("a-file/layers", "png", "a-file is a file, not a folder"),
        ("a-file/stack.psd", None, "a-file is a file, not a folder"),
        ("layers", "gif", "--format must be one of png, zip, psd, pptx"),
    ],
)
def test_what_cannot_work_is_refused_with_the_reason(out: str, fmt: str | None, message: str) -> None:
    Path("a-file").write_bytes(b"x")
    with pytest.raises(ValueError, match="^.*" + message.replace(".", r"\.")):
        resolve_output(out, fmt, IMAGE)


def test_a_folder_where_the_package_file_would_go_is_refused() -> None:
    Path("out/cat.psd").mkdir(parents=True)
    with pytest.raises(ValueError, match="out/cat.psd is a folder"):
        resolve_output("out", "psd", IMAGE)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_a_folder_without_write_permission_is_refused() -> None:
    Path("locked").mkdir(mode=0o500)
    with pytest.raises(ValueError, match="no write permission in locked"):
        resolve_output("locked/layers", "png", IMAGE)


def test_a_missing_export_dependency_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "psd_tools" else real(name, *a))
    with pytest.raises(ValueError, match=r"--format psd needs psd-tools.*pip install 'vllm-layered\[export\]'"):
        resolve_output("stack.psd", None, IMAGE)
    assert resolve_output("stack.zip", None, IMAGE).format == "zip"  # zip needs nothing


def test_resize_layers_keeps_colour_under_transparency_apart() -> None:
    """Premultiplied resampling: a transparent neighbour's colour does not bleed into an opaque edge."""
    layer = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # transparent red
    layer.paste((0, 0, 255, 255), (0, 0, 4, 8))  # opaque blue left half
    (small,) = resize_layers([layer], (3, 5))
    assert small.size == (3, 5) and small.mode == "RGBA"
    red, green, blue, alpha = small.getpixel((0, 2))
    assert alpha == 255 and blue >= 250 and red <= 5
