"""Stream safetensors checkpoints (single file or sharded with an index) into meta-built modules.

Modules are constructed on the ``meta`` device, so they own no storage. Each checkpoint tensor is
read straight onto the target device in the target dtype and installed as the parameter, so host
memory never holds a second full copy of the model.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import torch
from safetensors import safe_open
from torch import nn

from vllm_layered.model_executor.model_loader.dummy_loader import check_load_format, dummy_weights

# The file name stem of a diffusers component's weights: diffusion_pytorch_model.safetensors (or its shards).
DIFFUSERS_STEM = "diffusion_pytorch_model"
M = TypeVar("M", bound=nn.Module)


class WeightLoadError(ValueError):
    """A checkpoint does not match the module it is loaded into."""


def checkpoint_files(folder: str | Path, stem: str) -> list[Path]:
    """The safetensors files of one component: ``<stem>.safetensors`` or the shards its index names."""
    folder = Path(folder)
    index = folder / f"{stem}.safetensors.index.json"
    single = folder / f"{stem}.safetensors"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"no {stem}.safetensors or {stem}.safetensors.index.json in {folder}")


def iter_safetensors(
    files: Iterable[Path], *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` one at a time, each already on ``device`` (floats cast to ``dtype``)."""
    device = torch.device(device)
    for path in files:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                if dtype is not None and tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                yield name, tensor


def install_weights(
    module: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]],
    *,
    component: str = "model",
) -> set[str]:
    """Install every checkpoint tensor as the module's parameter or buffer of the same name.

    Raises WeightLoadError naming the tensor for an unexpected name, a shape mismatch (with both
    shapes), or parameters the checkpoint leaves unset. Returns the set of loaded names.
    """
    expected = dict(module.named_parameters())
    expected.update(dict(module.named_buffers()))
    loaded: set[str] = set()
    for name, tensor in weights:
        target = expected.get(name)
        if target is None:
            raise WeightLoadError(f"{component}: unexpected tensor {name!r} {tuple(tensor.shape)}")
        if tuple(target.shape) != tuple(tensor.shape):
            raise WeightLoadError(
                f"{component}: tensor {name!r} has shape {tuple(tensor.shape)} in the checkpoint "
                f"but the model expects {tuple(target.shape)}"
            )
        _set_tensor(module, name, tensor)
        loaded.add(name)
    missing = sorted(set(expected) - loaded)
    if missing:
        shown = ", ".join(f"{n!r} {tuple(expected[n].shape)}" for n in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise WeightLoadError(f"{component}: checkpoint lacks {len(missing)} tensors: {shown}{more}")
    return loaded


def _set_tensor(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if attr in owner._parameters:
        owner._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
    else:
        owner._buffers[attr] = tensor


def load_component(
    build: Callable[[], M],
    folder: str | Path,
    *,
    device: torch.device | str,
    dtype: torch.dtype | None,
    component: str,
    load_format: str = "safetensors",
) -> M:
    """The module ``build()`` makes, built on the meta device and filled from one diffusers component folder
    (e.g. ``transformer/``: its diffusion_pytorch_model safetensors), in eval mode. With ``load_format="dummy"``
    its tensors are drawn at random instead (dummy_loader.py) and no file is read."""
    with torch.device("meta"):
        module = build()
    if check_load_format(load_format) == "dummy":
        weights = dummy_weights(module, component=component, device=device, dtype=dtype)
    else:
        weights = iter_safetensors(checkpoint_files(folder, DIFFUSERS_STEM), device=device, dtype=dtype)
    install_weights(module, weights, component=component)
    return module.eval()
