"""Rank 0 drives, the other ranks follow: each forward is broadcast, computed in parts and gathered on rank 0.

Every rank derives the same plan from the broadcast layouts (which sequences its CFG group takes, which
rows of the group's joint buffer it computes), so only the inputs travel to the ranks and only the
velocities of the noisy tokens travel back.
"""

from __future__ import annotations

import atexit
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vllm_layered.model_executor.forward_batch import ForwardBatch, SequenceLayout
from vllm_layered.model_executor.models.transformer import LayeredTransformer, TransformerConfig
from vllm_layered.model_executor.parallel.config import (
    ParallelConfig,
    ParallelContext,
    init_parallel,
    rank_device,
)
from vllm_layered.model_executor.parallel.ulysses import UlyssesExchange

TransformerFactory = Callable[[torch.device], LayeredTransformer]


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
    return model.run(sub.image_tokens[img], sub.text_embeds[txt], sub.timesteps, sub.t_cond, local)


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


def _send_batch(batch: ForwardBatch | None, device: torch.device) -> None:
    """Rank 0: the layouts and tensor shapes first (None: stop), then the tensors."""
    if batch is None:
        dist.broadcast_object_list([None], src=0, device=device)
        return
    tensors = (batch.image_tokens, batch.text_embeds, batch.timesteps, batch.t_cond)
    header = (batch.layouts, [(t.shape, t.dtype) for t in tensors])
    dist.broadcast_object_list([header], src=0, device=device)
    for tensor in tensors:
        dist.broadcast(tensor.contiguous(), src=0)


def _receive_batch(device: torch.device) -> ForwardBatch | None:
    holder = [None]
    dist.broadcast_object_list(holder, src=0, device=device)
    if holder[0] is None:
        return None
    layouts, specs = holder[0]
    tensors = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in specs]
    for tensor in tensors:
        dist.broadcast(tensor, src=0)
    image_tokens, text_embeds, timesteps, t_cond = tensors
    return ForwardBatch(image_tokens, text_embeds, timesteps, layouts, t_cond)


def _barrier(device: torch.device) -> None:
    dist.barrier(device_ids=[device.index]) if device.type == "cuda" else dist.barrier()


def _worker_main(
    config: ParallelConfig, rank: int, first: torch.device, init_method: str, factory: TransformerFactory,
    threads: int,
) -> None:
    torch.set_num_threads(threads)
    device = rank_device(first, rank)
    ctx = init_parallel(config, rank, device, init_method)
    model = factory(device)
    _barrier(device)
    with torch.no_grad():
        while (batch := _receive_batch(device)) is not None:
            parallel_step(model, batch, ctx)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ParallelTransformer:
    """Rank 0's handle on a transformer spread over ``config.world_size`` processes; called like one.

    ``launch`` starts ranks 1.. as processes of their own (one GPU each, from rank 0's GPU on), each
    building its copy of the transformer with ``factory``. A worker found dead before a forward fails that
    forward at once and makes ``healthy`` false (the engine's /health reports it); one that dies inside a
    collective leaves rank 0 waiting until the collective's timeout, and the engine's heartbeat stops.
    """

    def __init__(self, model: LayeredTransformer, ctx: ParallelContext, device: torch.device,
                 workers: list[mp.Process]) -> None:
        self.model = model
        self.ctx = ctx
        self.device = device
        self._workers = workers
        self._open = True
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
        workers = [
            spawn.Process(
                target=_worker_main, args=(config, rank, device, init_method, factory, threads),
                name=f"layered-rank{rank}", daemon=True,
            )
            for rank in range(1, config.world_size)
        ]
        for worker in workers:
            worker.start()
        ctx = init_parallel(config, 0, device, init_method)
        _barrier(device)
        return cls(model, ctx, device, workers)

    @property
    def config(self) -> TransformerConfig:
        return self.model.config

    @property
    def parallel_config(self) -> ParallelConfig:
        return self.ctx.config

    def dead_workers(self) -> list[str]:
        return [f"{w.name} (exit code {w.exitcode})" for w in self._workers if not w.is_alive()]

    @property
    def healthy(self) -> bool:
        """False once a worker rank has exited: every later forward would fail (the engine's health says so)."""
        return self._open and not self.dead_workers()

    def __call__(self, batch: ForwardBatch) -> torch.Tensor:
        """Velocity of every noisy token of ``batch``, as ``LayeredTransformer.forward`` returns it."""
        dead = self.dead_workers()
        if dead:  # fail now rather than wait in a collective for a rank that is gone
            raise RuntimeError(f"the parallel transformer lost {', '.join(dead)}; the server must be restarted")
        _send_batch(batch, self.device)
        return parallel_step(self.model, batch, self.ctx)

    def close(self) -> None:
        """Stop the worker ranks and leave the process group (also run at exit)."""
        if not self._open:
            return
        self._open = False
        if self.dead_workers():  # the stop message would wait for the dead rank: end the others instead
            for worker in self._workers:
                worker.kill()
        else:
            _send_batch(None, self.device)
        for worker in self._workers:
            worker.join(timeout=30)
        dist.destroy_process_group()
