"""Shared fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from vllm_layered.model_executor.tiny_checkpoint import make_tiny_checkpoint

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)  # one core per xdist worker: oversubscribed threads make CPU tests slower


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny Qwen-Image-Layered (seed 0) in the official diffusers layout, made once per session."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("checkpoints") / "tiny-qwen-image-layered")
