"""Stream handoffs on a GPU (skipped without CUDA): what a CPU cannot show.

``torch.cuda._sleep`` holds one stream for ~0.1 s, so the race a missing handoff leaves open is lost every
time rather than now and then: each test checks the handoff, and its control checks that the test would catch
the handoff's absence.
"""

import asyncio

import numpy as np
import pytest
import torch

import vllm_layered.model_executor.pipeline as pipeline_module
from tests.serving.engine_helpers import request
from vllm_layered.model_executor.pipeline import LayeredPipeline
from vllm_layered.serving.engine.engine import EngineConfig, ThreadedEngine
from vllm_layered.serving.engine.streams import Handoff

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SLEEP_CYCLES = 200_000_000  # ~0.1 s of GPU clock on an H100/H200
N = 1 << 22


def test_handoff_orders_the_consumer_after_the_producer():
    producer, consumer = torch.cuda.Stream(), torch.cuda.Stream()

    def read(value: float, hand_over: bool) -> torch.Tensor:
        with torch.cuda.stream(producer):
            x = torch.empty(N, device="cuda")
            torch.cuda._sleep(SLEEP_CYCLES)
            x.fill_(value)  # written ~0.1 s from now
            handoff = Handoff.send([x])
        with torch.cuda.stream(consumer):
            if hand_over:
                handoff.receive()
            y = x.clone()
        torch.cuda.synchronize()
        return y

    assert not read(2.0, hand_over=False).eq(2.0).all()  # control: the consumer read x before it was written
    assert read(1.0, hand_over=True).eq(1.0).all()


def test_handoff_keeps_a_freed_block_from_reuse_until_the_consumer_has_read_it():
    """The producer frees its tensor while the consumer's read is still queued, then allocates the same size
    and writes it: without record_stream the allocator hands it the very block the consumer is about to read."""
    producer, consumer = torch.cuda.Stream(), torch.cuda.Stream()

    def read(record: bool) -> torch.Tensor:
        with torch.cuda.stream(producer):
            x = torch.full((N,), 1.0, device="cuda")
            handoff = Handoff.send([x])
        with torch.cuda.stream(consumer):
            if record:
                handoff.receive()
            else:  # ordered all the same, only the allocator is not told
                consumer.wait_event(handoff.event)
            torch.cuda._sleep(SLEEP_CYCLES)
            y = x.clone()  # reads x ~0.1 s from now
        del x, handoff
        with torch.cuda.stream(producer):
            torch.full((N,), 7.0, device="cuda")  # the producer's next tensor of the same size
        torch.cuda.synchronize()
        return y

    assert read(record=False).eq(7.0).any()  # control: x's block was reused and overwritten before the read
    assert read(record=True).eq(1.0).all()


def test_engine_layers_equal_the_offline_pipeline_with_slow_streams(tiny_checkpoint, monkeypatch):
    """The engine on the tiny model with each stream held back where the other reads what it wrote: the step
    stream before every Euler update (the decode must wait for the last one) and the aux stream after
    preprocessing (the first step must wait for it). Alone, the engine runs the offline pipeline's kernels on
    the same shapes, so its layers must be identical."""
    pipe = LayeredPipeline.from_pretrained(tiny_checkpoint, device="cuda", dtype=torch.float32)
    req = request("r", layers=2, steps=2, cfg=True, seed=5)
    expected = pipe(req.image, prompt=req.prompt, negative_prompt=req.negative_prompt, true_cfg_scale=4.0,
                    layers=2, num_inference_steps=2, seed=5).layers

    apply_velocity = pipeline_module.apply_velocity

    def slow_update(states, velocity):
        torch.cuda._sleep(SLEEP_CYCLES)
        apply_velocity(states, velocity)

    prepare = pipe.prepare

    def slow_prepare(*args, **kwargs):
        state = prepare(*args, **kwargs)
        noise = state.latents.clone()
        state.latents.zero_()
        torch.cuda._sleep(SLEEP_CYCLES)
        state.latents.copy_(noise)  # the noise is back only ~0.1 s from now
        return state

    monkeypatch.setattr(pipeline_module, "apply_velocity", slow_update)
    monkeypatch.setattr(pipe, "prepare", slow_prepare)

    async def serve():
        engine = ThreadedEngine(pipe, EngineConfig())
        await engine.start()
        try:
            return (await engine.submit(req).result()).layers
        finally:
            await engine.shutdown(5)

    served = asyncio.run(asyncio.wait_for(serve(), 300))
    for got, want in zip(served, expected, strict=True):
        assert np.array_equal(np.asarray(got), np.asarray(want))
