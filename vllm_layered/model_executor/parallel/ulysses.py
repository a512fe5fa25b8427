"""Ulysses sequence parallelism: the all-to-all that swaps a share of the tokens for a share of the heads.

Outside attention every rank of a sequence-parallel group holds a contiguous range of the joint buffer's
rows with all heads (projections, norms and MLPs are per token). Attention needs whole sequences, so
around it one all-to-all hands each rank every row for ``heads / size`` of the heads, and one more
returns the attention output to its owner.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class UlyssesExchange:
    """One forward's split of the joint buffer over a group: ``row_counts[r]`` rows for group rank ``r``."""

    group: dist.ProcessGroup | None
    rank: int
    row_counts: tuple[int, ...]

    @classmethod
    def split(cls, total_rows: int, group: dist.ProcessGroup | None, rank: int, size: int) -> UlyssesExchange:
        base, extra = divmod(total_rows, size)
        return cls(group, rank, tuple(base + (r < extra) for r in range(size)))

    @property
    def size(self) -> int:
        return len(self.row_counts)

    @property
    def row_ranges(self) -> list[tuple[int, int]]:
        """[start, end) of every group rank's rows, in rank order (end to end, they are the joint buffer)."""
        ranges, start = [], 0
        for count in self.row_counts:
            ranges.append((start, start + count))
            start += count
        return ranges

    @property
    def row_range(self) -> tuple[int, int]:
        return self.row_ranges[self.rank]

    def scatter_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[own rows, H, D] -> [all rows, H / size, D]: group rank r keeps heads r*H/size .. (r+1)*H/size."""
        rows, heads, dim = x.shape
        share = heads // self.size
        send = x.view(rows, self.size, share, dim).transpose(0, 1).contiguous().view(self.size * rows, share, dim)
        out = x.new_empty(sum(self.row_counts), share, dim)
        dist.all_to_all_single(
            out, send, output_split_sizes=list(self.row_counts), input_split_sizes=[rows] * self.size,
            group=self.group,
        )
        return out

    def gather_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[all rows, H / size, D] -> [own rows, H, D]: the inverse of ``scatter_heads``."""
        _, share, dim = x.shape
        rows = self.row_counts[self.rank]
        recv = x.new_empty(self.size * rows, share, dim)
        dist.all_to_all_single(
            recv, x.contiguous(), output_split_sizes=[rows] * self.size, input_split_sizes=list(self.row_counts),
            group=self.group,
        )
        return recv.view(self.size, rows, share, dim).transpose(0, 1).contiguous().view(rows, self.size * share, dim)
