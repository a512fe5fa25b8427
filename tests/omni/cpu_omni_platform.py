"""A test-only vLLM-Omni platform for CPU, so vLLM-Omni's diffusion runner and server run here.

vLLM-Omni 0.30 picks its platform from built-in detectors (CUDA, ROCm, NPU, XPU, MUSA) and from the
entry-point group ``vllm_omni.platform_plugins``; without an accelerator it falls back to
UnspecifiedOmniPlatform, which lacks what the diffusion runner calls (``reset_peak_memory_stats``,
``synchronize``, memory queries). tests/omni/conftest.py registers ``platform_plugin`` below as a
throw-away distribution on ``sys.path`` / ``PYTHONPATH`` before vLLM-Omni is first imported (it
resolves its platform on import), so nothing gets installed.
"""

from __future__ import annotations

import psutil
import torch
from vllm.platforms.cpu import CpuPlatform
from vllm.platforms.interface import PlatformEnum
from vllm_omni.platforms.interface import OmniPlatform, OmniPlatformEnum


class CpuOmniPlatform(OmniPlatform, CpuPlatform):
    _omni_enum = OmniPlatformEnum.OOT
    _enum = PlatformEnum.CPU
    device_name = "cpu"
    device_type = "cpu"
    dispatch_key = "CPU"
    dist_backend = "gloo"

    @classmethod
    def get_default_stage_config_path(cls) -> str:
        return "vllm_omni/deploy"

    @classmethod
    def get_diffusion_attn_backend_cls(cls, selected_backend, head_size) -> str:
        from vllm_omni.diffusion.attention.backends.registry import DiffusionAttentionBackendEnum

        return DiffusionAttentionBackendEnum.TORCH_SDPA.get_path()

    @classmethod
    def supports_torch_inductor(cls) -> bool:
        return False

    @classmethod
    def get_torch_device(cls, local_rank: int | None = None) -> torch.device:
        return torch.device("cpu")

    @classmethod
    def get_device_count(cls) -> int:
        return 1

    @classmethod
    def get_device_version(cls) -> str | None:
        return None

    @classmethod
    def synchronize(cls) -> None:
        return None

    @classmethod
    def record_device_event(cls):
        return None

    @classmethod
    def get_free_memory(cls, device: torch.device | None = None) -> int:
        return psutil.virtual_memory().available

    @classmethod
    def get_device_memory(cls, device: torch.device | None = None) -> tuple[int, int]:
        memory = psutil.virtual_memory()
        return memory.available, memory.total

    @classmethod
    def reset_peak_memory_stats(cls, device: torch.device | None = None) -> None:
        return None

    @classmethod
    def max_memory_allocated(cls, device: torch.device | None = None) -> int:
        return 0

    @classmethod
    def max_memory_reserved(cls, device: torch.device | None = None) -> int:
        return 0

    @classmethod
    def is_available(cls) -> bool:
        return True


def platform_plugin() -> str | None:
    """The entry point: activate only where no GPU is present."""
    return None if torch.cuda.is_available() else f"{__name__}.CpuOmniPlatform"

