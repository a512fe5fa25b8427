"""Fixtures of the serving tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.serving.helpers import png_bytes


@pytest.fixture(scope="session")
def image_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("inputs") / "input.png"
    path.write_bytes(png_bytes())
    return path
