"""UlyssesExchange on a real 2-process gloo group: the all-to-alls move the right rows and heads, started
asynchronously (start_scatter) or not, for bf16 and e4m3 (moved as bytes)."""

from __future__ import annotations

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vllm_layered.model_executor.parallel.ulysses import UlyssesExchange

TOTAL_ROWS, HEADS, DIM, SIZE = 7, 4, 3, 2  # 7 rows: the ranks own 4 and 3


def joint(dtype: torch.dtype) -> torch.Tensor:
    """The whole joint buffer [rows, heads, dim] that every rank can build: each (row, head) a distinct value,
    exact in bf16 and e4m3 (multiples of 1/2 up to 15.5), so a misplaced row or head shows."""
    values = torch.arange(TOTAL_ROWS)[:, None, None] * 4 + torch.arange(HEADS)[None, :, None]
    return ((values + torch.zeros(1, 1, DIM)) / 2).to(dtype)


def _worker(rank: int, port: int, failures) -> None:
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=SIZE)
        exchange = UlyssesExchange.split(TOTAL_ROWS, None, rank, SIZE)
        lo, hi = exchange.row_range
        share = HEADS // SIZE
        for dtype in (torch.bfloat16, torch.float8_e4m3fn):
            full = joint(dtype)
            mine = full[lo:hi].contiguous()
            in_flight = exchange.start_scatter(mine)
            heads = in_flight.wait()
            expected = full[:, rank * share : (rank + 1) * share]
            assert heads.dtype == dtype
            assert torch.equal(heads.view(torch.uint8), expected.contiguous().view(torch.uint8))
            assert torch.equal(exchange.scatter_heads(mine).view(torch.uint8), heads.view(torch.uint8))
            back = exchange.gather_heads(heads)
            assert back.dtype == dtype and torch.equal(back.view(torch.uint8), mine.view(torch.uint8))
        dist.destroy_process_group()
    except BaseException as exc:  # reported to the test process
        failures.put(f"rank {rank}: {type(exc).__name__}: {exc}")
        raise


def test_all_to_alls_move_rows_and_heads_in_both_directions():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.get_context("spawn")
    failures = context.SimpleQueue()
    workers = [context.Process(target=_worker, args=(rank, port, failures)) for rank in range(SIZE)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    errors = []
    while not failures.empty():
        errors.append(failures.get())
    assert not errors and all(worker.exitcode == 0 for worker in workers), errors or [w.exitcode for w in workers]


def test_the_row_split_is_near_equal():
    assert UlyssesExchange.split(7, None, 1, 2).row_ranges == [(0, 4), (4, 7)]
    assert UlyssesExchange.split(7, None, 1, 2).row_range == (4, 7)
