"""The step-level batching engine on the tiny model (CPU, float32)."""

import asyncio
import time

import numpy as np
import pytest
import torch

from tests.serving.engine_helpers import Recorder, image, request, run, started_engine, wait_for
from vllm_layered.model_executor.pipeline import LayeredPipeline
from vllm_layered.serving.engine.engine import EngineConfig, request_tokens
from vllm_layered.serving.engine.request import (
    DeadlineExceededError,
    EngineOverloadedError,
    RequestCancelledError,
)


@pytest.fixture(scope="module")
def pipeline(tiny_checkpoint):
    return LayeredPipeline.from_pretrained(tiny_checkpoint, device="cpu", dtype=torch.float32)


@torch.no_grad()
def test_packing_changes_nothing_in_the_denoise_step(pipeline):
    """A request's latents are the same alone or packed with other layer counts, sizes, steps and CFG."""
    def states():
        specs = [
            (request("a", layers=2, steps=2, cfg=True, size=(64, 64), seed=1), 1),
            (request("b", layers=1, steps=1, cfg=False, size=(96, 48), seed=2), 2),
            (request("c", layers=1, steps=3, cfg=True, size=(48, 80), seed=3), 3),
        ]
        out = []
        for req, seed in specs:
            cond, neg, _ = pipeline.encode_prompts(req.image, req.prompt, req.negative_prompt, req.params)
            gen = torch.Generator().manual_seed(seed)
            out.append(pipeline.prepare(req.image, req.params, cond, neg, generator=gen))
        return out

    alone = states()
    for state in alone:
        while not state.done:
            pipeline.denoise_step([state])
    packed = states()
    while not all(s.done for s in packed):
        pipeline.denoise_step([s for s in packed if not s.done])
    for a, p in zip(alone, packed):
        assert ((a.latents - p.latents).norm() / a.latents.norm()).item() < 1e-5


def test_request_alone_equals_request_among_others(pipeline):
    async def scenario():
        engine = await started_engine(pipeline)
        alone = await engine.submit(request("solo", layers=2, steps=3, seed=5)).result()
        handles = [
            engine.submit(request("x", layers=1, steps=2, cfg=True, size=(80, 48), seed=6)),
            engine.submit(request("mixed", layers=2, steps=3, seed=5)),
            engine.submit(request("y", layers=3, steps=4, size=(48, 96), seed=7)),
        ]
        outputs = [await h.result() for h in handles]
        await engine.shutdown(1)
        return alone, outputs

    alone, outputs = run(scenario())
    mixed = outputs[1]
    assert [len(o.layers) for o in outputs] == [1, 2, 3]
    for a, b in zip(alone.layers, mixed.layers):
        diff = np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16))
        assert diff.max() <= 1
    assert set(alone.timings) == {"queue_s", "preprocess_s", "denoise_s", "decode_s", "total_s"}


def test_requests_share_steps(pipeline):
    recorder = Recorder()

    async def scenario():
        engine = await started_engine(pipeline, recorder)
        handles = [engine.submit(request(f"r{i}", steps=20, seed=i)) for i in range(3)]
        for h in handles:
            await h.result()
        await engine.shutdown(1)

    run(scenario())
    assert max(recorder.steps) >= 2  # at least one forward held several requests
    assert sum(recorder.steps) == 3 * 20


def test_queue_bound_rejects_cleanly(pipeline):
    async def scenario():
        engine = await started_engine(pipeline, max_waiting=1, max_running=1)
        first = engine.submit(request("first", steps=6))
        await wait_for(first, "step")
        second = engine.submit(request("second", steps=1))
        with pytest.raises(EngineOverloadedError, match="full"):
            engine.submit(request("third", steps=1))
        assert engine.num_waiting == 1
        await first.result()
        await second.result()
        await engine.shutdown(1)

    run(scenario())


def test_cancel_mid_denoise_frees_the_request(pipeline):
    recorder = Recorder()

    async def scenario():
        engine = await started_engine(pipeline, recorder)
        handle = engine.submit(request("long", steps=200))
        event = await wait_for(handle, "step")
        assert 1 <= event.step < 200
        assert handle.cancel()
        with pytest.raises(RequestCancelledError):
            await handle.result()
        assert engine.num_running == 0 and not engine._requests
        after = await engine.submit(request("after", steps=1)).result()  # the engine keeps serving
        await engine.shutdown(1)
        return after

    assert len(run(scenario()).layers) == 1
    assert recorder.finished == ["cancelled", "success"]


def test_flooding_tenant_does_not_starve_another(pipeline):
    recorder = Recorder()

    async def scenario():
        engine = await started_engine(pipeline, recorder, max_running=1)
        flood = [engine.submit(request(f"f{i}", steps=1, tenant="flood")) for i in range(5)]
        polite = engine.submit(request("p", steps=1, tenant="polite"))
        await polite.result()
        for h in flood:
            await h.result()
        await engine.shutdown(1)

    run(scenario())
    assert recorder.started.index("polite") <= 2


def test_deadline_expiry_in_queue_and_while_running(pipeline):
    async def scenario():
        engine = await started_engine(pipeline, max_running=1)
        # the runner occupies the only slot (preparing or denoising) while the second waits in the queue
        runner = engine.submit(request("runner", steps=200, deadline=time.monotonic() + 3))
        queued = engine.submit(request("queued", steps=1, deadline=time.monotonic() + 0.2))
        with pytest.raises(DeadlineExceededError):
            await queued.result()
        with pytest.raises(DeadlineExceededError):
            await runner.result()
        await engine.shutdown(1)

    run(scenario())


def test_shutdown_stops_admitting_and_cancels_leftovers(pipeline):
    async def scenario():
        engine = await started_engine(pipeline)
        assert engine.is_healthy()
        long = engine.submit(request("long", steps=500))
        await wait_for(long, "step")
        await engine.shutdown(grace_period_s=0.2)
        with pytest.raises(RequestCancelledError):
            await long.result()
        with pytest.raises(EngineOverloadedError, match="shutting down"):
            engine.submit(request("late", steps=1))
        assert not engine.is_healthy()

    run(scenario())


def test_failed_preprocessing_fails_only_that_request(pipeline):
    async def scenario():
        engine = await started_engine(pipeline)
        bad = request("bad", steps=1)
        bad.image = image(8, 600, seed=0)  # 1:75 aspect ratio, refused by the bucket rule
        with pytest.raises(ValueError, match="(?i)aspect"):
            engine.submit(bad)
        good = await engine.submit(request("good", steps=1)).result()
        await engine.shutdown(1)
        return good

    assert len(run(scenario()).layers) == 1


@pytest.mark.parametrize("step_order, order", [("srpt", ["short", "long"]), ("fcfs", ["long", "short"])])
def test_short_request_overtakes_a_long_one_at_a_step_boundary(pipeline, step_order, order):
    """With no room to pack both, the request with less remaining work takes the steps (then the long one
    resumes from where it paused and finishes); under step_order="fcfs" the first submitted keeps them."""
    long, short = request("long", layers=1, steps=40, seed=1), request("short", layers=1, steps=2, seed=2)
    budget = request_tokens(long)  # the two never fit one forward (real image tokens dwarf the text estimate)
    finished, recorder = [], Recorder()

    async def scenario():
        engine = await started_engine(pipeline, recorder, token_budget=budget, step_order=step_order)
        long_handle = engine.submit(long)
        await wait_for(long_handle, "step")
        short_handle = engine.submit(short)

        async def done(handle, name):
            output = await handle.result()
            finished.append(name)
            return output

        outputs = await asyncio.gather(done(long_handle, "long"), done(short_handle, "short"))
        await engine.shutdown(1)
        return outputs

    long_out, short_out = run(scenario())
    assert finished == order
    assert max(recorder.steps) == 1 and sum(recorder.steps) == 42  # never packed: one of them waited
    assert len(long_out.layers) == len(short_out.layers) == 1


@pytest.mark.parametrize("bad, message", [
    (dict(max_waiting=0), "max_waiting and max_running must be positive"),
    (dict(token_budget=0), "token_budget must be positive"),
    (dict(aging_s=0), "aging_s must be positive"),
    (dict(step_order="lifo"), "unknown step_order 'lifo'"),
])
def test_engine_config_refuses_bad_values(bad, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(**bad)


def test_work_tokens_tell_the_work_left(pipeline):
    """The router's load signal: token-forwards left in the admitted requests, and queued behind them."""

    async def scenario():
        engine = await started_engine(pipeline, max_running=1)
        assert engine.work_tokens() == (0, 0)
        first = engine.submit(request("first", steps=8))
        await wait_for(first, "step")
        second = engine.submit(request("second", layers=2, steps=3))
        running, waiting = engine.work_tokens()
        assert waiting == request_tokens(second.request) * 3  # max_running=1: it waits
        await wait_for(first, "step")
        assert 0 < engine.work_tokens()[0] < running  # each step takes its tokens off
        await first.result()
        await second.result()
        assert engine.work_tokens() == (0, 0)
        await engine.shutdown(1)

    run(scenario())
