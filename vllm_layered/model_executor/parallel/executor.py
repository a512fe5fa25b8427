"""Rank 0 drives, the other ranks follow: each forward is broadcast, computed in parts and gathered on rank 0.

Every rank derives the same plan from the layouts rank 0 sends (which sequences its CFG group takes, which
rows of the group's joint buffer it computes), so only the inputs travel to the ranks and only the
velocities of the noisy tokens travel back.

Streams: rank 0 calls the collectives from the engine's step thread; each orders itself after the work queued
on that thread's current stream and makes the stream wait for it to finish (NCCL; gloo is synchronous), so a
forward's inputs, collectives and outputs stay in the step stream's order. Workers use one thread and stream.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import connection as mp_connection
from multiprocessing.connection import Connection
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vllm_layered.model_executor.forward_batch import ForwardBatch
from vllm_layered.model_executor.models.transformer import LayeredTransformer, TransformerConfig
from vllm_layered.model_executor.parallel.config import (
    ParallelConfig,
    ParallelContext,
    init_parallel,
    rank_device,
)
from vllm_layered.model_executor.parallel.ulysses import UlyssesExchange
from vllm_layered.model_executor.sequence_layout import SequenceLayout

logger = logging.getLogger(__name__)

TransformerFactory = Callable[[torch.device], LayeredTransformer]
JOINING = "joining"  # a worker's messages: about to join the process group,
READY = "ready"  # and its transformer is built
ABORT_WAIT_S = 10.0


@dataclass(frozen=True)
class CheckpointTransformer:
    """A TransformerFactory for the worker ranks: each loads the same diffusers ``transformer/`` folder, quantized
    as rank 0's copy is (``quantization``: None or "fp8"), with the same attention (``attention_dtype``: None /
    "bf16" or "fp8"), in the same ``load_format`` (dummy weights are seeded, so every rank draws the same)."""

    folder: Path
    dtype: torch.dtype
    quantization: str | None = None
    attention_dtype: str | None = None
    load_format: str = "safetensors"

    def __call__(self, device: torch.device) -> LayeredTransformer:
        return LayeredTransformer.from_pretrained(
            self.folder, device=device, dtype=self.dtype, quantization=self.quantization,
            attention_dtype=self.attention_dtype, load_format=self.load_format,
        )


def split_sequences(layouts: list[SequenceLayout], groups: int) -> list[list[int]]:
    """Sequence indices per CFG group, balanced by tokens (largest first onto the lightest group), each in
    batch order. One request with CFG: its conditional and unconditional branch land in different groups."""
    loads, parts = [0] * groups, [[] for _ in range(groups)]
    for i in sorted(range(len(layouts)), key=lambda i: -layouts[i].total_tokens):
        group = min(range(groups), key=lambda g: loads[g])
        parts[group].append(i)
        loads[group] += layouts[i].total_tokens
    return [sorted(part) for part in parts]


def output_rows(layouts: list[SequenceLayout], groups: list[list[int]], sp_degree: int) -> list[int]:
    """How many noisy-token rows of the output each rank computes, for the sequences ``groups``."""
    rows = []
    for seqs in groups:
        noisy, start = [], 0  # noisy rows of each sequence as a [begin, end) range of the joint buffer
        for layout in (layouts[i] for i in seqs):
            noisy.append((start + layout.text_len, start + layout.text_len + layout.noisy_tokens))
            start += layout.total_tokens
        for lo, hi in UlyssesExchange.split(start, None, 0, sp_degree).row_ranges:
            rows.append(sum(max(0, min(end, hi) - max(begin, lo)) for begin, end in noisy))
    return rows


def parallel_step(model: LayeredTransformer, batch: ForwardBatch, ctx: ParallelContext) -> torch.Tensor | None:
    """One forward on every rank: this rank's share, then all shares gathered on rank 0 (None elsewhere)."""
    groups = split_sequences(batch.layouts, ctx.config.cfg_degree)
    return _gather(parallel_forward(model, batch, ctx, groups[ctx.cfg_rank]), batch, ctx, groups)


def parallel_forward(
    model: LayeredTransformer, batch: ForwardBatch, ctx: ParallelContext, mine: list[int]
) -> torch.Tensor:
    """This rank's part of the forward (its CFG group's sequences ``mine``): the velocities of the noisy
    tokens among its rows."""
    config = ctx.config
    if not mine:
        return batch.image_tokens.new_empty(0, model.proj_out.out_features, dtype=model.proj_out.weight.dtype)
    sub = batch if len(mine) == batch.num_sequences else batch.select(mine)
    meta = model.build_metadata(sub)
    if config.sp_degree == 1:
        return model(sub, meta)
    exchange = UlyssesExchange.split(meta.total_tokens, ctx.sp_group, ctx.sp_rank, config.sp_degree)
    local, img, txt = meta.shard(exchange)
    return model.run(sub.image_tokens[img], sub.text_embeds[txt], sub.timesteps, sub.t_cond, local, sub.modulation)


def _gather(
    local: torch.Tensor, batch: ForwardBatch, ctx: ParallelContext, groups: list[list[int]]
) -> torch.Tensor | None:
    """Every rank's output onto rank 0, reassembled in the batch's sequence order (None elsewhere)."""
    config = ctx.config
    rows = output_rows(batch.layouts, groups, config.sp_degree)
    padded = local.new_zeros(max(rows), local.shape[1])
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in rows] if ctx.rank == 0 else None
    dist.gather(padded, parts, dst=0)
    if ctx.rank != 0:
        return None
    pieces: list[torch.Tensor | None] = [None] * batch.num_sequences
    sp = config.sp_degree
    for group, seqs in enumerate(groups):
        ranks = range(group * sp, (group + 1) * sp)
        output = torch.cat([parts[r][: rows[r]] for r in ranks])
        for i, piece in zip(seqs, output.split([batch.layouts[i].noisy_tokens for i in seqs])):
            pieces[i] = piece
    return torch.cat(pieces)


# a forward's layouts, then (shape, dtype) of each tensor broadcast after it: image_tokens, text_embeds, timesteps,
# t_cond and, when the batch has one, modulation
Header = tuple[list[SequenceLayout], list[tuple[torch.Size, torch.dtype]]]


def _batch_tensors(batch: ForwardBatch) -> list[torch.Tensor]:
    """The tensors of ``batch`` that rank 0 broadcasts, in `Header` order."""
    tensors = [batch.image_tokens, batch.text_embeds, batch.timesteps, batch.t_cond]
    return tensors if batch.modulation is None else [*tensors, batch.modulation]


def _receive_batch(conn: Connection, device: torch.device) -> ForwardBatch | None:
    """A worker's next forward: the header from rank 0's pipe (None: stop, or rank 0 is gone), then the tensors.

    Waiting for work on a pipe rather than in a collective keeps an idle worker out of the collective timeout."""
    try:
        header: Header | None = conn.recv()
    except EOFError:
        return None
    if header is None:
        return None
    layouts, specs = header
    tensors = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in specs]
    for tensor in tensors:
        dist.broadcast(tensor, src=0)
    return ForwardBatch(*tensors[:3], layouts, *tensors[3:])


def _worker_main(
    config: ParallelConfig, rank: int, first: torch.device, init_method: str, factory: TransformerFactory,
    threads: int, conn: Connection,
) -> None:
    torch.set_num_threads(threads)
    device = rank_device(first, rank)
    conn.send(JOINING)
    ctx = init_parallel(config, rank, device, init_method)
    model = factory(device)
    conn.send(READY)
    with torch.no_grad():
        while (batch := _receive_batch(conn, device)) is not None:
            parallel_step(model, batch, ctx)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ParallelTransformer:
    """Rank 0's handle on a transformer spread over ``config.world_size`` processes; called like one.

    ``launch`` starts ranks 1.. as processes of their own (one GPU each, from rank 0's GPU on), each building its
    copy of the transformer with ``factory``. Each forward's header (layouts, tensor shapes) goes to the workers
    over a pipe, the tensors and outputs through the process group.

    A failure fails the group: once a forward raised on rank 0 (the ranks are then out of step: some wait in a
    collective the others left) or a worker exited, ``failure`` says why, every later forward fails at once,
    and the engine's /health reports it so the process is restarted. A worker that dies while rank 0 waits in a
    collective is noticed at once: gloo fails the collective when the peer's connection closes; for NCCL, which
    would wait for the collective timeout (``ParallelConfig.collective_timeout_s``), a watchdog thread aborts
    the process group.
    """

    def __init__(self, model: LayeredTransformer, ctx: ParallelContext, device: torch.device,
                 workers: list[mp.Process], pipes: list[Connection]) -> None:
        self.model = model
        self.ctx = ctx
        self.device = device
        self._workers = workers
        self._pipes = pipes
        self._open = True
        self._failure: str | None = None
        self._watchdog_stop, watchdog_stopped = mp.Pipe()
        threading.Thread(target=self._watch, args=(watchdog_stopped,), name="layered-rank-watchdog",
                         daemon=True).start()
        atexit.register(self.close)

    @classmethod
    def launch(
        cls, model: LayeredTransformer, factory: TransformerFactory, config: ParallelConfig, device: torch.device
    ) -> ParallelTransformer:
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        config.check(model.config.num_attention_heads, device)
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        spawn = mp.get_context("spawn")
        threads = max(1, torch.get_num_threads() // config.world_size)  # host threads: share, don't oversubscribe
        pipes, workers = [], []
        for rank in range(1, config.world_size):
            ours, theirs = spawn.Pipe()
            pipes.append(ours)
            workers.append(spawn.Process(
                target=_worker_main, args=(config, rank, device, init_method, factory, threads, theirs),
                name=f"layered-rank{rank}", daemon=True,
            ))
        for worker in workers:
            worker.start()
        # Join when every worker is about to (process start-up takes seconds, more than a short collective
        # timeout), then wait without a timeout while the workers load their transformers.
        _wait_for(workers, pipes, JOINING)
        ctx = init_parallel(config, 0, device, init_method)
        try:
            _wait_for(workers, pipes, READY)
        except BaseException:
            _leave_group(failed=True)
            raise
        return cls(model, ctx, device, workers, pipes)

    @property
    def config(self) -> TransformerConfig:
        return self.model.config

    @property
    def parallel_config(self) -> ParallelConfig:
        return self.ctx.config

    def modulation_table(self, timesteps: torch.Tensor, t_cond: torch.Tensor | None = None) -> torch.Tensor:
        """Rank 0's `LayeredTransformer.modulation_table`: each forward's rows of it are broadcast with the batch."""
        return self.model.modulation_table(timesteps, t_cond)

    def dead_workers(self) -> list[str]:
        """The worker ranks that have exited. Read from their sentinels, which turn ready when a process ends
        whichever thread reaps it: ``is_alive()`` can still say True while the watchdog's join is reaping it."""
        ended = set(mp_connection.wait([worker.sentinel for worker in self._workers], timeout=0))
        return [_describe(worker) for worker in self._workers if worker.sentinel in ended]

    @property
    def failure(self) -> str | None:
        """Why no forward can run anymore (None while every rank is alive and in step)."""
        dead = self.dead_workers()
        if dead:  # the root cause when a forward failed because of it
            return f"the parallel transformer lost {', '.join(dead)}"
        if self._failure is not None:
            return self._failure
        return None if self._open else "the parallel transformer is closed"

    @property
    def healthy(self) -> bool:
        """False once a worker rank has exited or a forward failed: every later forward would fail."""
        return self.failure is None

    def __call__(self, batch: ForwardBatch) -> torch.Tensor:
        """Velocity of every noisy token of ``batch``, as ``LayeredTransformer.forward`` returns it."""
        failure = self.failure
        if failure is not None:  # fail now rather than wait in a collective for a rank that is gone
            raise RuntimeError(f"{failure}; the server must be restarted")
        try:
            tensors = _batch_tensors(batch)
            header: Header = (batch.layouts, [(t.shape, t.dtype) for t in tensors])
            for pipe in self._pipes:
                pipe.send(header)
            for tensor in tensors:
                dist.broadcast(tensor.contiguous(), src=0)
            return parallel_step(self.model, batch, self.ctx)
        except BaseException as exc:
            self._fail(f"a parallel forward failed on rank 0 ({type(exc).__name__}: {exc})")
            raise

    def close(self) -> None:
        """Stop the worker ranks and leave the process group (also run at exit)."""
        if not self._open:
            return
        self._open = False
        with contextlib.suppress(OSError):  # the watchdog has already returned (it saw a worker die)
            self._watchdog_stop.send(None)
        failed = self._failure is not None or self.dead_workers()
        if failed:  # a stop message would go unheard (a worker dead or inside a collective): end them instead
            for worker in self._workers:
                worker.kill()
        else:
            for pipe in self._pipes:
                with contextlib.suppress(OSError):  # a worker that died just now
                    pipe.send(None)
        for worker in self._workers:
            worker.join(timeout=30)
        _leave_group(failed)

    def _fail(self, reason: str) -> None:
        if self._failure is None:
            self._failure = reason

    def _watch(self, stopped: Connection) -> None:
        """Watchdog thread: when a worker exits before ``close``, fail the group and unblock rank 0 if it waits
        in a collective for the dead rank."""
        ready = mp_connection.wait([stopped, *(worker.sentinel for worker in self._workers)])
        if stopped in ready:
            return
        lost = [worker for worker in self._workers if worker.sentinel in ready]
        for worker in lost:
            worker.join(timeout=5)  # reap it, for its exit code
        self._fail(f"the parallel transformer lost {', '.join(map(_describe, lost))}")
        logger.error("%s: failing the process group", self._failure)
        if dist.is_initialized() and dist.get_backend() == "nccl":  # gloo fails by itself on the closed connection
            _abort_nccl()


def _wait_for(workers: list[mp.Process], pipes: list[Connection], message: str) -> None:
    """Wait, without a timeout, until every worker has sent ``message``; a worker that exits first fails the
    launch (and the other workers are ended)."""
    pending = dict(zip(pipes, workers))
    while pending:
        mp_connection.wait([*pending, *(worker.sentinel for worker in pending.values())])
        for pipe in [pipe for pipe in pending if pipe.poll()]:
            with contextlib.suppress(EOFError):  # EOF: the worker is gone, its sentinel says so next
                if pipe.recv() == message:
                    del pending[pipe]
        lost = [_describe(worker) for worker in pending.values() if not worker.is_alive()]
        if lost:
            for worker in workers:
                worker.kill()
            raise RuntimeError(f"parallel worker {', '.join(lost)} exited while starting")


def _describe(worker: mp.Process) -> str:
    return f"{worker.name} (exit code {worker.exitcode})"


def _leave_group(failed: bool) -> None:
    """Leave the process group: destroy it, or after a failure under NCCL (where destroying waits for the dead
    rank) abort it."""
    if not dist.is_initialized():  # an abort already took it down
        return
    if failed and dist.get_backend() == "nccl":
        _abort_nccl()
    else:
        dist.destroy_process_group()


def _abort_nccl() -> None:
    """Abort the NCCL process groups, so that a collective waiting for a dead rank fails instead of waiting for
    the collective timeout. ncclCommAbort can itself hang on some NCCL versions: it runs on a daemon thread,
    waited for at most ABORT_WAIT_S."""

    def abort() -> None:
        try:
            dist.distributed_c10d._abort_process_group()
        except Exception:
            logger.exception("aborting the NCCL process group failed")

    thread = threading.Thread(target=abort, name="layered-nccl-abort", daemon=True)
    thread.start()
    thread.join(ABORT_WAIT_S)
