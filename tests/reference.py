"""diffusers, the reference implementation, is a test-only dependency. Every test that compares with it gets
it from ``import_reference``, so that where it is missing those tests (or their modules) skip with one reason
and every other test still runs."""

from __future__ import annotations

from types import ModuleType

import pytest

MISSING = "diffusers (the reference implementation, a test-only dependency) is not installed"


def import_reference(module: str = "diffusers") -> ModuleType:
    """``module`` (diffusers or one of its submodules); skips the calling test, or module at import, without it."""
    if module != "diffusers" and not module.startswith("diffusers."):
        raise ValueError(f"import_reference is for diffusers and its submodules, got {module!r}")
    return pytest.importorskip(module, reason=MISSING)
