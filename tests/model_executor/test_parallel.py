"""CFG-parallel and Ulysses sequence-parallel forwards (gloo, one process per rank) equal the one-process one."""

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vllm_layered.model_executor.forward_batch import ForwardBatch, PackedMetadata
from vllm_layered.model_executor.models.transformer import LayeredTransformer
from vllm_layered.model_executor.parallel import CheckpointTransformer, ParallelConfig, ParallelTransformer
from vllm_layered.model_executor.parallel.executor import output_rows, split_sequences
from vllm_layered.model_executor.parallel.ulysses import UlyssesExchange
from vllm_layered.model_executor.pipeline import GenerationParams, LayeredPipeline
from vllm_layered.model_executor.sampler import model_timestep
from vllm_layered.model_executor.sequence_layout import SequenceLayout
from vllm_layered.serving.engine.engine import EngineConfig, ThreadedEngine
from vllm_layered.serving.engine.request import EngineError, LayeredRequest, RequestCancelledError

LAYOUTS = [  # three requests' worth of sequences: different text lengths, layer counts and sizes
    SequenceLayout(text_len=7, layers=2, height=3, width=5),
    SequenceLayout(text_len=4, layers=2, height=3, width=5),
    SequenceLayout(text_len=12, layers=5, height=4, width=4),
    SequenceLayout(text_len=5, layers=1, height=2, width=3),
]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def random_batch(layouts: list[SequenceLayout], in_channels: int, text_dim: int) -> ForwardBatch:
    gen = torch.Generator().manual_seed(0)
    img = torch.randn(sum(s.image_tokens for s in layouts), in_channels, generator=gen)
    txt = torch.randn(sum(s.text_len for s in layouts), text_dim, generator=gen)
    sigmas = torch.rand(len(layouts), generator=gen)
    return ForwardBatch(img, txt, model_timestep(sigmas, torch.float32), layouts)


def forward_both_ways(model, factory, config: ParallelConfig, device: torch.device, batch: ForwardBatch):
    """The batch through freshly launched ranks and through the one-process model: (parallel, one process)."""
    parallel = ParallelTransformer.launch(model, factory, config, device)
    try:
        with torch.no_grad():
            return parallel(batch), model(batch)
    finally:
        parallel.close()


def test_split_sequences_balances_tokens_and_separates_cfg_branches():
    cond, uncond = SequenceLayout(9, 4, 8, 8), SequenceLayout(3, 4, 8, 8)
    assert split_sequences([cond, uncond], 2) == [[0], [1]]
    parts = split_sequences(LAYOUTS, 2)
    assert sorted(i for part in parts for i in part) == list(range(len(LAYOUTS)))
    loads = [sum(LAYOUTS[i].total_tokens for i in part) for part in parts]
    assert max(loads) - min(loads) <= max(s.total_tokens for s in LAYOUTS)
    assert split_sequences([cond], 2) == [[0], []]  # one sequence: the second group idles


def test_shards_cover_the_joint_buffer_exactly():
    meta = PackedMetadata.build(LAYOUTS, axes_dims=(8, 12, 12), theta=10000.0, device=torch.device("cpu"))
    size = 3
    img_rows, txt_rows, noisy = [], [], []
    ranges = []
    for rank in range(size):
        exchange = UlyssesExchange.split(meta.total_tokens, None, rank, size)
        local, img, txt = meta.shard(exchange)
        lo, hi = exchange.row_range
        ranges.append((lo, hi))
        assert local.total_tokens == hi - lo and local.img_seg.numel() == img.stop - img.start
        img_rows.append(local.img_rows + lo)
        txt_rows.append(local.txt_rows + lo)
        noisy.append(local.noisy_rows + img.start)
        for stream_rows, spans in ((local.img_rows, local.img_spans), (local.txt_rows, local.txt_spans)):
            for stream_row, joint_row, n in spans:  # spans agree with the per-token rows
                assert stream_rows[stream_row : stream_row + n].tolist() == list(range(joint_row, joint_row + n))
    assert ranges[0][0] == 0 and ranges[-1][1] == meta.total_tokens
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert torch.equal(torch.cat(img_rows), meta.img_rows)
    assert torch.equal(torch.cat(txt_rows), meta.txt_rows)
    assert torch.equal(torch.cat(noisy), meta.noisy_rows)
    assert output_rows(LAYOUTS, split_sequences(LAYOUTS, 1), size) == [n.numel() for n in noisy]


def test_config_refuses_what_cannot_run():
    with pytest.raises(ValueError, match="positive"):
        ParallelConfig(cfg_degree=0)
    with pytest.raises(ValueError, match="divide"):
        ParallelConfig(sp_degree=5).check(24, torch.device("cpu"))


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    model = LayeredTransformer.from_pretrained(tiny_checkpoint / "transformer", dtype=torch.float32)
    batch = random_batch(LAYOUTS, model.config.in_channels, model.config.joint_attention_dim)
    with torch.no_grad():
        return model, batch, model(batch)


@pytest.mark.parametrize("cfg_degree,sp_degree", [(2, 1), (1, 2), (2, 2)])
def test_parallel_forward_equals_one_process(tiny_checkpoint, reference, cfg_degree, sp_degree):
    model, batch, expected = reference
    factory = CheckpointTransformer(tiny_checkpoint / "transformer", torch.float32)
    config = ParallelConfig(cfg_degree=cfg_degree, sp_degree=sp_degree)
    parallel = ParallelTransformer.launch(model, factory, config, torch.device("cpu"))
    try:
        with torch.no_grad():
            got = parallel(batch)
            # a batch the groups cannot share evenly, then a single sequence (one group idles)
            small = batch.select([3, 0, 2])
            got_small = parallel(small)
            got_one = parallel(batch.select([1]))
            expected_small, expected_one = model(small), model(batch.select([1]))
    finally:
        parallel.close()
    assert got.shape == expected.shape
    assert rel_err(got, expected) < 1e-5
    assert rel_err(got_small, expected_small) < 1e-5
    assert rel_err(got_one, expected_one) < 1e-5


def test_fp8_sequence_parallel_equals_one_process(tiny_checkpoint, reference):
    """FP8 on sharded rows: each SP rank quantizes its own tokens (per-token scales), so the shards' FP8 forward
    is the one-process FP8 forward (measured: 0 difference; FP8 vs float32 is 3e-2 on this model). The bound
    leaves room for a value on an e4m3 rounding boundary to flip under a different GEMM blocking."""
    _, batch, _ = reference
    folder = tiny_checkpoint / "transformer"
    model = LayeredTransformer.from_pretrained(folder, dtype=torch.float32, quantization="fp8")
    factory = CheckpointTransformer(folder, torch.float32, "fp8")
    got, expected = forward_both_ways(model, factory, ParallelConfig(sp_degree=2), torch.device("cpu"), batch)
    assert rel_err(got, expected) < 1e-4


def test_fp8_attention_sequence_parallel_equals_one_process(tiny_checkpoint, reference):
    """FP8 attention on sharded rows: the group all-reduces each sequence's amax(V) and sum of V, so every rank
    centers and quantizes V and O with the one-process means and scales (also for sequences it holds no row of), and
    the all-to-alls move e4m3 bytes: the shards' forward is the one-process one within float32 summation order."""
    _, batch, _ = reference
    folder = tiny_checkpoint / "transformer"
    model = LayeredTransformer.from_pretrained(folder, dtype=torch.float32, quantization="fp8", attention_dtype="fp8")
    factory = CheckpointTransformer(folder, torch.float32, "fp8", "fp8")
    got, expected = forward_both_ways(model, factory, ParallelConfig(sp_degree=2), torch.device("cpu"), batch)
    assert rel_err(got, expected) < 1e-4


def test_a_dead_rank_fails_fast_and_makes_the_engine_unhealthy(tiny_checkpoint, reference):
    model, batch, _ = reference
    factory = CheckpointTransformer(tiny_checkpoint / "transformer", torch.float32)
    parallel = ParallelTransformer.launch(model, factory, ParallelConfig(sp_degree=2), torch.device("cpu"))
    pipeline = LayeredPipeline(transformer=parallel, vae=None, prompt_encoder=None, noise_schedule_config=None,
                               device=torch.device("cpu"), dtype=torch.float32)

    async def scenario():
        engine = ThreadedEngine(pipeline, EngineConfig(token_budget=1 << 16))
        await engine.start()
        before = engine.is_healthy()
        worker = parallel._workers[0]
        worker.kill()
        worker.join(timeout=30)
        after = engine.is_healthy()
        await engine.shutdown(0.1)
        return before, after

    try:
        before, after = asyncio.run(asyncio.wait_for(scenario(), 120))
        assert before and not after and not parallel.healthy
        with pytest.raises(RuntimeError, match="lost layered-rank1"):
            parallel(batch)
    finally:
        parallel.close()  # must not wait for the dead rank


def test_idle_workers_outlive_the_collective_timeout(tiny_checkpoint, reference):
    """Workers wait for work on a pipe, not in a collective: idle longer than the timeout, they still serve."""
    model, batch, expected = reference
    factory = CheckpointTransformer(tiny_checkpoint / "transformer", torch.float32)
    config = ParallelConfig(sp_degree=2, collective_timeout_s=3)
    parallel = ParallelTransformer.launch(model, factory, config, torch.device("cpu"))
    try:
        time.sleep(4)
        with torch.no_grad():
            got = parallel(batch)
    finally:
        parallel.close()
    assert rel_err(got, expected) < 1e-5


def test_a_forward_failing_on_rank_0_fails_the_group(tiny_checkpoint, reference, monkeypatch):
    """Rank 0 raises mid-forward while the worker computes its share: the ranks are out of step, so every later
    forward fails at once (not in a mismatched collective) and close() ends the worker left in a collective."""
    model, batch, _ = reference
    factory = CheckpointTransformer(tiny_checkpoint / "transformer", torch.float32)
    parallel = ParallelTransformer.launch(model, factory, ParallelConfig(sp_degree=2), torch.device("cpu"))
    def out_of_memory(*args, **kwargs):
        raise MemoryError("rank 0 OOM")

    try:
        with monkeypatch.context() as patch:
            patch.setattr(model, "run", out_of_memory)
            with pytest.raises(MemoryError):
                parallel(batch)
        assert parallel.failure == "a parallel forward failed on rank 0 (MemoryError: rank 0 OOM)"
        began = time.monotonic()
        with pytest.raises(RuntimeError, match="failed on rank 0"):
            parallel(batch)
        assert time.monotonic() - began < 1
    finally:
        began = time.monotonic()
        parallel.close()
    assert time.monotonic() - began < 30 and not any(w.is_alive() for w in parallel._workers)


@dataclass(frozen=True)
class HangingTransformer:
    """A worker's transformer whose forward never returns: it touches ``marker`` and sleeps (until killed)."""

    inner: CheckpointTransformer
    marker: Path

    def __call__(self, device: torch.device) -> LayeredTransformer:
        model = self.inner(device)

        def run(*args, **kwargs):
            self.marker.touch()
            time.sleep(3600)

        model.run = run
        return model


@pytest.mark.parametrize("device", [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu,
                                pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")]),
])
def test_a_worker_killed_mid_forward_fails_every_request_fast(tiny_checkpoint, tmp_path, device):
    """Rank 0 waits in a collective for a worker that is inside its forward; the worker is killed. The requests
    in the engine (the one in the forward and the one queued) end with an EngineError within seconds, the engine
    reports unhealthy, and nothing is left waiting (shutdown and close return)."""
    single = LayeredPipeline.from_pretrained(tiny_checkpoint, dtype=torch.float32, device=device)
    marker = tmp_path / "worker-in-forward"
    factory = HangingTransformer(CheckpointTransformer(tiny_checkpoint / "transformer", torch.float32), marker)
    parallel = ParallelTransformer.launch(single.transformer, factory, ParallelConfig(sp_degree=2), single.device)
    pipeline = LayeredPipeline(transformer=parallel, vae=single.vae, prompt_encoder=single.prompt_encoder,
                               noise_schedule_config=single.noise_schedule_config, device=single.device,
                               dtype=single.dtype)

    async def scenario():
        engine = ThreadedEngine(pipeline, EngineConfig(max_running=1))
        await engine.start()
        handles = [engine.submit(LayeredRequest(f"r{i}", random_image(64, 64, i), GenerationParams(
            layers=1, num_inference_steps=2, true_cfg_scale=1.0), prompt="a cat", seed=i)) for i in range(2)]
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert time.monotonic() < deadline, "the worker never entered its forward"
            await asyncio.sleep(0.05)
        parallel._workers[0].kill()
        killed = time.monotonic()
        errors = []
        for handle in handles:
            with pytest.raises(EngineError) as failed:
                await handle.result()
            errors.append(failed.value)
        failed_after = time.monotonic() - killed
        healthy = engine.is_healthy()
        await engine.shutdown(1)
        return errors, failed_after, healthy

    try:
        errors, failed_after, healthy = asyncio.run(asyncio.wait_for(scenario(), 300))
    finally:
        began = time.monotonic()
        parallel.close()
        close_s = time.monotonic() - began
    assert failed_after < 10 and not healthy and close_s < 30
    assert not any(isinstance(e, RequestCancelledError) for e in errors)
    assert "lost layered-rank1" in str(errors[-1])  # the queued request learns why


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("cfg_degree,sp_degree", [(2, 1), (1, 2)])
def test_parallel_forward_on_gpus_with_nccl(tiny_checkpoint, cfg_degree, sp_degree):
    device = torch.device("cuda", 0)
    model = LayeredTransformer.from_pretrained(tiny_checkpoint / "transformer", device=device, dtype=torch.float32)
    batch = random_batch(LAYOUTS, model.config.in_channels, model.config.joint_attention_dim)
    batch = ForwardBatch(batch.image_tokens.to(device), batch.text_embeds.to(device), batch.timesteps.to(device),
                         batch.layouts)
    factory = CheckpointTransformer(tiny_checkpoint / "transformer", torch.float32)
    got, expected = forward_both_ways(model, factory, ParallelConfig(cfg_degree, sp_degree), device, batch)
    assert rel_err(got, expected) < 1e-4


@pytest.fixture(scope="module")
def pipelines(tiny_checkpoint):
    """The tiny pipeline in one process, and with its transformer over 2 CFG groups x 2 sequence ranks.

    A process holds one process group at a time, so this fixture (alive until the module ends) is used
    only by the tests below it; the tests above launch and close their own ranks."""
    single = LayeredPipeline.from_pretrained(tiny_checkpoint, dtype=torch.float32, device="cpu")
    parallel = LayeredPipeline.from_pretrained(
        tiny_checkpoint, dtype=torch.float32, device="cpu", parallel=ParallelConfig(cfg_degree=2, sp_degree=2)
    )
    yield single, parallel
    parallel.transformer.close()


def random_image(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8), "RGBA")


def assert_same_layers(got: list[Image.Image], expected: list[Image.Image]) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        diff = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))
        assert diff.max() <= 1 and (diff == 0).mean() > 0.99


def test_pipeline_with_cfg_and_sequence_parallel_gives_the_same_layers(pipelines):
    """Two images of different sizes in lock-step (packed), CFG on."""
    single, parallel = pipelines
    images = [random_image(64, 96, 0), random_image(80, 48, 1)]
    kwargs = dict(prompt="a cat", negative_prompt=" ", true_cfg_scale=4.0, layers=2, resolution=640,
                  num_inference_steps=2, seed=3)
    for ours, ref in zip(parallel(images, **kwargs), single(images, **kwargs)):
        assert len(ours.layers) == 2
        assert_same_layers(ours.layers, ref.layers)


def test_engine_drives_the_parallel_transformer(pipelines):
    """The engine's one scheduler packs requests of different layers, sizes, steps and CFG into the
    parallel forward; every request gets the layers it gets from the one-process engine."""

    def requests() -> list[LayeredRequest]:
        shapes = [(2, 3, True, (64, 64)), (1, 2, False, (80, 48)), (3, 4, True, (48, 96))]
        return [
            LayeredRequest(
                f"r{i}", random_image(h, w, i),
                GenerationParams(layers=layers, num_inference_steps=steps, true_cfg_scale=4.0 if cfg else 1.0),
                prompt="a cat", negative_prompt=" " if cfg else None, seed=i,
            )
            for i, (layers, steps, cfg, (w, h)) in enumerate(shapes)
        ]

    async def serve(pipeline):
        engine = ThreadedEngine(pipeline, EngineConfig())
        await engine.start()
        outputs = await asyncio.gather(*(engine.submit(r).result() for r in requests()))
        await engine.shutdown(1)
        return outputs

    single, parallel = pipelines
    expected = asyncio.run(asyncio.wait_for(serve(single), 300))
    got = asyncio.run(asyncio.wait_for(serve(parallel), 300))
    for ours, ref in zip(got, expected):
        assert_same_layers(ours.layers, ref.layers)

