"""Flow-matching Euler sampling with the Layered resolution shift, and true CFG.

The schedule follows the ``scheduler/scheduler_config.json`` of the checkpoint (diffusers'
FlowMatchEulerDiscreteScheduler semantics): sigmas ``linspace(1, 0, steps + 1)[:-1]``, shifted with
``mu = sqrt(condition_tokens / 256)`` when dynamic shifting is on (linear: ``mu / (mu + 1/s - 1)``,
exponential: ``e^mu / (e^mu + 1/s - 1)``), optionally stretched to ``shift_terminal``, then a final 0.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass(frozen=True)
class NoiseScheduleConfig:
    """The sigma schedule's settings, read from the checkpoint's ``scheduler/scheduler_config.json`` (diffusers
    calls the noise schedule a scheduler; here "scheduler" is the request scheduler, serving/engine/scheduler.py)."""

    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = True
    time_shift_type: str = "linear"
    shift_terminal: float | None = None

    def __post_init__(self) -> None:
        if self.time_shift_type not in ("linear", "exponential"):
            raise ValueError(f"time_shift_type must be 'linear' or 'exponential', got {self.time_shift_type!r}")

    @classmethod
    def from_json(cls, path: str | Path) -> NoiseScheduleConfig:
        raw = json.loads(Path(path).read_text())
        unsupported = [
            k
            for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas",
                      "stochastic_sampling")
            if raw.get(k)
        ]
        if unsupported:
            raise ValueError(f"scheduler options not supported for Qwen-Image-Layered: {unsupported}")
        return cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})


def layered_mu(condition_tokens: int) -> float:
    """The reference's shift for a condition image of ``condition_tokens`` 2x2 latent patches."""
    return (condition_tokens / 256) ** 0.5


def sigma_schedule(config: NoiseScheduleConfig, num_steps: int, mu: float) -> torch.Tensor:
    """float32 [num_steps + 1]: the sigma of every step, then the terminal 0."""
    if num_steps < 1:
        raise ValueError(f"num_inference_steps must be at least 1, got {num_steps}")
    sigmas = np.linspace(1.0, 0, num_steps + 1)[:-1].astype(np.float32)
    if config.use_dynamic_shifting:
        m = math.exp(mu) if config.time_shift_type == "exponential" else mu
        sigmas = m / (m + (1 / sigmas - 1))
    else:
        sigmas = config.shift * sigmas / (1 + (config.shift - 1) * sigmas)
    if config.shift_terminal and num_steps > 1:  # a single step (sigma 1) has nothing to stretch
        one_minus = 1 - sigmas
        sigmas = 1 - one_minus / (one_minus[-1] / (1 - config.shift_terminal))
    sigmas = torch.from_numpy(np.asarray(sigmas)).to(torch.float32)
    return torch.cat([sigmas, torch.zeros(1)])


def model_timestep(sigma: torch.Tensor, dtype: torch.dtype, num_train_timesteps: int = 1000) -> torch.Tensor:
    """What the reference feeds the transformer: (sigma * 1000) rounded to the model dtype, / 1000."""
    return (sigma * num_train_timesteps).to(dtype) / num_train_timesteps


def euler_step(latents: torch.Tensor, velocity: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """x_{next} = x + (sigma_next - sigma) * v, in float32."""
    return latents.float() + (sigma_next - sigma) * velocity.float()


def combine_cfg(cond: torch.Tensor, uncond: torch.Tensor, scale: float, normalize: bool) -> torch.Tensor:
    """True CFG ``uncond + s * (cond - uncond)``; ``normalize`` rescales each token to the norm of cond."""
    comb = uncond + scale * (cond - uncond)
    if normalize:
        comb = comb * (cond.norm(dim=-1, keepdim=True) / comb.norm(dim=-1, keepdim=True))
    return comb
