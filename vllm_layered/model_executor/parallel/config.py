"""Parallel layout: how many ranks, which rank does what, and the process groups."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelConfig:
    """``cfg_degree`` groups share out the sequences; each group has ``sp_degree`` sequence-parallel ranks.

    Rank ``r`` is sequence-parallel rank ``r % sp_degree`` of group ``r // sp_degree``.

    ``collective_timeout_s``: how long a collective may wait for the other ranks before it fails. Collectives run
    only inside a forward (idle workers wait for work on a pipe), so this bounds one forward of the ranks; the
    default is several times the longest forward on an H200 (a 1024-px, 20-layer CFG branch on one rank: 7e18
    FLOP, ~15 s). It catches a rank that hangs; one that dies is noticed at once (ParallelTransformer's watchdog).
    """

    cfg_degree: int = 1
    sp_degree: int = 1
    collective_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if self.cfg_degree < 1 or self.sp_degree < 1:
            raise ValueError(f"cfg_degree and sp_degree must be positive, got {self.cfg_degree}, {self.sp_degree}")
        if not self.collective_timeout_s > 0:
            raise ValueError(f"collective_timeout_s must be positive, got {self.collective_timeout_s}")

    @property
    def world_size(self) -> int:
        return self.cfg_degree * self.sp_degree

    def check(self, num_heads: int, device: torch.device) -> None:
        """Refuse layouts the model or the machine cannot run, before any process starts."""
        if num_heads % self.sp_degree:
            raise ValueError(f"sp_degree {self.sp_degree} must divide the {num_heads} attention heads")
        if device.type == "cuda":
            first = device.index or 0
            if first + self.world_size > torch.cuda.device_count():
                raise ValueError(
                    f"{self.world_size} ranks from cuda:{first} need {first + self.world_size} GPUs, "
                    f"{torch.cuda.device_count()} visible"
                )


@dataclass(frozen=True)
class ParallelContext:
    """What one rank knows about the layout once the process groups exist."""

    config: ParallelConfig
    rank: int
    sp_group: dist.ProcessGroup | None

    @property
    def cfg_rank(self) -> int:
        return self.rank // self.config.sp_degree

    @property
    def sp_rank(self) -> int:
        return self.rank % self.config.sp_degree


def rank_device(first: torch.device, rank: int) -> torch.device:
    """Rank ``r`` runs on the r-th GPU from rank 0's; on the CPU every rank uses the CPU."""
    if first.type == "cuda":
        return torch.device("cuda", (first.index or 0) + rank)
    return first


def init_parallel(config: ParallelConfig, rank: int, device: torch.device, init_method: str) -> ParallelContext:
    """Join the process group (NCCL on GPUs, gloo on the CPU) and build the sequence-parallel groups, all with
    ``config.collective_timeout_s``."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = timedelta(seconds=config.collective_timeout_s)
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=config.world_size, timeout=timeout)
    sp_group = None
    for group in range(config.cfg_degree):  # every rank creates every group, in the same order
        ranks = list(range(group * config.sp_degree, (group + 1) * config.sp_degree))
        handle = dist.new_group(ranks, timeout=timeout) if config.sp_degree > 1 else None
        if rank in ranks:
            sp_group = handle
    return ParallelContext(config, rank, sp_group)
