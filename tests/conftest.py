"""Shared fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when a kernel module is first imported.
# Set it here, before any test module (deploy, serving, ...) imports the server and with it the kernels,
# so that on a CPU every kernel runs in Triton's interpreter (tests/kernels).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from vllm_layered.model_executor.model_loader.tiny_checkpoint import make_tiny_checkpoint  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)  # one core per xdist worker: oversubscribed threads make CPU tests slower


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny Qwen-Image-Layered (seed 0) in the official diffusers layout, made once per session."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("checkpoints") / "tiny-qwen-image-layered")
