"""Deterministic random weights for any module: tiny test checkpoints and full-size benchmarks.

Each tensor is drawn from its own generator seeded by (seed, component, name), so values do not depend
on the order in which a module declares its parameters. Matrices and conv kernels are
randn/sqrt(fan_in), biases 0.02*randn, per-channel scales 1 + 0.1*randn, embedding tables randn.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator

import torch
from torch import nn


def random_tensor(
    name: str,
    shape: tuple[int, ...],
    *,
    key: str,
    is_embedding: bool,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    digest = hashlib.sha256(key.encode()).digest()
    generator = torch.Generator(device).manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    noise = torch.randn(shape, generator=generator, dtype=torch.float32, device=device)
    if is_embedding:
        pass
    elif name.endswith("bias"):
        noise.mul_(0.02)
    elif all(d == 1 for d in shape[1:]):  # a per-channel scale, e.g. an RMSNorm weight or a VAE gamma
        noise.mul_(0.1).add_(1.0)
    else:
        noise.div_(math.sqrt(math.prod(shape[1:])))
    return noise.to(dtype)


def random_weights(
    module: nn.Module,
    *,
    seed: int,
    component: str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    buffers: bool = True,
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for every parameter (and buffer) of ``module``, one at a time, sorted by name."""
    embeddings = {f"{name}.weight" for name, m in module.named_modules() if isinstance(m, nn.Embedding)}
    named = dict(module.named_parameters())
    if buffers:
        named.update(module.named_buffers())
    for name, t in sorted(named.items()):
        key = f"{seed}:{component}:{name}"
        yield name, random_tensor(
            name, tuple(t.shape), key=key, is_embedding=name in embeddings, device=device, dtype=dtype
        )
