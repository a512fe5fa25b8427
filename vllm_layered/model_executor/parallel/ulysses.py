"""Ulysses sequence parallelism: the all-to-all that swaps a share of the tokens for a share of the heads.

Outside attention every rank of a sequence-parallel group holds a contiguous range of the joint buffer's
rows with all heads (projections, norms and MLPs are per token). Attention needs whole sequences, so
around it one all-to-all hands each rank every row for ``heads / size`` of the heads, and one more
returns the attention output to its owner.

`UlyssesExchange.start_scatter` returns before the all-to-all is done, so that the transformer moves Q and K while
it projects V (JointAttention.forward); `HeadsInFlight.wait` orders the current stream after it. e4m3 tensors move
as bytes: collective backends need not support float8.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

_FLOAT8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def _as_bytes(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.uint8) if x.dtype in _FLOAT8_DTYPES else x


@dataclass(frozen=True)
class HeadsInFlight:
    """The output of an all-to-all that may still be running: ``wait`` before reading it."""

    tensor: torch.Tensor
    work: dist.Work | None
    dtype: torch.dtype

    def wait(self) -> torch.Tensor:
        """The received tensor, once the collective is done (CUDA: the current stream waits for it on the GPU; the
        host does not block)."""
        if self.work is not None:
            self.work.wait()
        return self.tensor.view(self.dtype)


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

    def start_scatter(self, x: torch.Tensor) -> HeadsInFlight:
        """[own rows, H, D] -> [all rows, H / size, D], started: group rank r receives heads r*H/size ..
        (r+1)*H/size of every row. The all-to-all runs while the caller queues more work."""
        rows, heads, dim = x.shape
        share = heads // self.size
        data = _as_bytes(x)
        send = data.view(rows, self.size, share, dim).transpose(0, 1).contiguous().view(self.size * rows, share, dim)
        out = data.new_empty(sum(self.row_counts), share, dim)
        work = dist.all_to_all_single(
            out, send, output_split_sizes=list(self.row_counts), input_split_sizes=[rows] * self.size,
            group=self.group, async_op=True,
        )
        return HeadsInFlight(out, work, x.dtype)

    def scatter_heads(self, x: torch.Tensor) -> torch.Tensor:
        """`start_scatter`, waited for."""
        return self.start_scatter(x).wait()

    def gather_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[all rows, H / size, D] -> [own rows, H, D]: the inverse of ``scatter_heads``."""
        _, share, dim = x.shape
        rows = self.row_counts[self.rank]
        data = _as_bytes(x).contiguous()
        recv = data.new_empty(self.size * rows, share, dim)
        dist.all_to_all_single(
            recv, data, output_split_sizes=[rows] * self.size, input_split_sizes=list(self.row_counts),
            group=self.group,
        )
        out = recv.view(self.size, rows, share, dim).transpose(0, 1).contiguous().view(rows, self.size * share, dim)
        return out.view(x.dtype)
