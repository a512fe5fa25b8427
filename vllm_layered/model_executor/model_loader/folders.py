"""The folders this package writes itself (the embedded tiny model, the dummy checkpoint's configs).

Each is written into a temporary sibling and renamed into place, so a reader never sees a half-written folder,
and is reused for as long as it holds the configs the writing code would write.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def cached_folder(
    path: Path, configs: dict[str, dict], write: Callable[[Path], None], on_write: Callable[[Path], None] | None = None
) -> Path:
    """``path`` if it holds ``configs`` (file name -> JSON content), else written by ``write(folder)`` first, with
    ``on_write(path)`` called before. Two processes writing at once each write a temporary copy; the first rename
    wins and the other copy is discarded."""
    if folder_holds(path, configs):
        return path
    if on_write is not None:
        on_write(path)
    try:
        write_atomically(path, write, replace=path.exists())
    except OSError:
        if not folder_holds(path, configs):
            raise
    return path


def folder_holds(path: Path, configs: dict[str, dict]) -> bool:
    """Every file named in ``configs`` is in ``path`` and holds that JSON content."""
    try:
        return all(json.loads((path / name).read_text()) == config for name, config in configs.items())
    except (OSError, ValueError):
        return False


def write_atomically(path: Path, write: Callable[[Path], None], *, replace: bool = False) -> None:
    """``write(folder)`` into a temporary sibling, then rename it to ``path`` (moving an old folder aside first
    if ``replace``). The rename fails if another writer has meanwhile put a non-empty folder there."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private
    trash = None
    try:
        write(tmp)
        if replace and path.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.rename(path, trash / "old")
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)


def write_json(path: Path, data: dict) -> None:
    """``data`` as sorted, indented JSON (the layout diffusers and transformers write), its folders made."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
