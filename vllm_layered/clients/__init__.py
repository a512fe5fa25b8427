"""Thin clients of the layered-image server: they need only openai, httpx and pillow (no torch).

The openai-based clients load on first use, so ``vllm_layered.clients.sse`` (used by the bench tool) does
not need the openai package.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AsyncLayeredClient": "vllm_layered.clients.client",
    "DecomposeOptions": "vllm_layered.clients.client",
    "LayeredAPIError": "vllm_layered.clients.client",
    "LayeredClient": "vllm_layered.clients.client",
    "LayeredConnectionError": "vllm_layered.clients.client",
    "Progress": "vllm_layered.clients.client",
    "Layers": "vllm_layered.clients.layers",
    "tree_from_response": "vllm_layered.clients.layers",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
