"""vllm-layered: serve Qwen-Image-Layered (one image in, a stack of RGBA layers out).

``from vllm_layered import LayeredPipeline`` works as in diffusers. The names load on first use, so
``import vllm_layered`` (and the CLI's argument parsing) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "GenerationParams": "vllm_layered.model_executor.pipeline",
    "LayeredOutput": "vllm_layered.model_executor.pipeline",
    "LayeredPipeline": "vllm_layered.model_executor.pipeline",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
