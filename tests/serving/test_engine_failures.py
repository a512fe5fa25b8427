"""The engine under failures injected at its real call sites (tiny model, CPU). A request whose own work fails
(preprocessing, its forward, its decode) fails alone and the engine goes on; any other exception on the step or
aux thread fails the engine: every request ends with an EngineError at once and the engine reports unhealthy.
A worker rank killed mid-forward: tests/model_executor/test_parallel.py."""

import asyncio
import time

import pytest
import torch

from tests.serving.engine_helpers import Gate, Recorder, request, run, started_engine
from vllm_layered.model_executor.pipeline import LayeredPipeline
from vllm_layered.serving.engine.observer import EngineObserver
from vllm_layered.serving.engine.request import EngineError, EngineOverloadedError, RequestCancelledError


@pytest.fixture(scope="module")
def pipeline(tiny_checkpoint):
    return LayeredPipeline.from_pretrained(tiny_checkpoint, device="cpu", dtype=torch.float32)


def fails_on_first_call(fn, error: Exception):
    calls = []

    def once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise error
        return fn(*args, **kwargs)

    return once


async def served_after_failure(pipeline, failing_request):
    """Submit ``failing_request``, then a good one once it failed: (its error, the good output, healthy?)."""
    engine = await started_engine(pipeline)
    with pytest.raises(EngineError) as failed:
        await engine.submit(failing_request).result()
    output = await engine.submit(request("good", steps=1, seed=1)).result()
    healthy = engine.is_healthy()
    await engine.shutdown(1)
    return failed.value, output, healthy


def test_a_request_failing_in_preprocessing_fails_alone(pipeline, monkeypatch):
    """It passes submit (the checks there) and fails inside the text encoder on the aux thread."""
    encode = pipeline.encode_prompts

    def encode_prompts(image, prompt, *args, **kwargs):
        if prompt == "unencodable":
            raise RuntimeError("the tokenizer broke")
        return encode(image, prompt, *args, **kwargs)

    monkeypatch.setattr(pipeline, "encode_prompts", encode_prompts)
    bad = request("bad", steps=1)
    bad.prompt = "unencodable"
    error, output, healthy = run(served_after_failure(pipeline, bad))
    assert type(error) is EngineError and str(error) == "preprocessing failed: the tokenizer broke"
    assert len(output.layers) == 1 and healthy


def test_a_failing_forward_fails_its_requests_and_the_engine_goes_on(pipeline, monkeypatch):
    step = fails_on_first_call(pipeline.denoise_step, RuntimeError("CUDA error: an illegal memory access"))
    monkeypatch.setattr(pipeline, "denoise_step", step)
    error, output, healthy = run(served_after_failure(pipeline, request("bad", steps=2)))
    assert type(error) is EngineError and str(error) == "denoising failed: CUDA error: an illegal memory access"
    assert len(output.layers) == 1 and healthy


def test_a_failing_decode_fails_its_request_and_the_engine_goes_on(pipeline, monkeypatch):
    monkeypatch.setattr(pipeline.vae, "decode", fails_on_first_call(pipeline.vae.decode, MemoryError("VAE OOM")))
    error, output, healthy = run(served_after_failure(pipeline, request("bad", steps=1)))
    assert type(error) is EngineError and str(error) == "decoding failed: VAE OOM"
    assert len(output.layers) == 1 and healthy


class BrokenOnStep(Recorder):
    def on_step(self, step_time_s, num_requests, num_tokens):
        raise RuntimeError("observer bug")


def test_a_dying_step_thread_ends_every_request_and_the_engine_reports_unhealthy(pipeline):
    """The step thread dies outside the forward (an observer raises after the first step): the request in the
    step, the one preprocessing or denoising beside it and the one waiting all end with an EngineError."""

    async def scenario():
        engine = await started_engine(pipeline, BrokenOnStep(), max_running=2)
        handles = [engine.submit(request(f"r{i}", steps=3, seed=i)) for i in range(3)]
        messages = []
        for handle in handles:
            with pytest.raises(EngineError) as failed:
                await handle.result()
            assert not isinstance(failed.value, RequestCancelledError)
            messages.append(str(failed.value))
        healthy = engine.is_healthy()
        await asyncio.to_thread(engine._thread.join, 10)
        with pytest.raises(EngineOverloadedError, match="the engine failed and takes no requests"):
            engine.submit(request("late", steps=1))
        began = time.monotonic()
        await engine.shutdown(30)
        return messages, healthy, engine._thread.is_alive(), time.monotonic() - began

    messages, healthy, step_thread_alive, shutdown_s = run(scenario())
    assert messages == ["the engine failed: RuntimeError: observer bug"] * 3
    assert not healthy and not step_thread_alive
    assert shutdown_s < 1  # nothing left to wait for


class BrokenOnSuccess(EngineObserver):
    def on_request_finished(self, tenant, outcome, e2e_time_s, layers, num_steps):
        if outcome == "success":
            raise RuntimeError("metrics backend down")


def test_an_aux_thread_failure_outside_the_decode_fails_the_engine(pipeline):
    """After a decode on the aux thread, reporting its success raises: the request decoded is delivered (its
    caller hears first), the engine fails and the request still denoising ends with an EngineError."""

    async def scenario():
        engine = await started_engine(pipeline, BrokenOnSuccess())
        short = engine.submit(request("short", steps=1, seed=1))
        long = engine.submit(request("long", steps=200, seed=2))
        output = await short.result()
        with pytest.raises(EngineError, match="the engine failed: RuntimeError: metrics backend down"):
            await long.result()
        healthy = engine.is_healthy()
        await engine.shutdown(1)
        return output, healthy

    output, healthy = run(scenario())
    assert len(output.layers) == 1 and not healthy


def test_shutdown_ends_every_request_even_when_the_step_thread_is_stuck(pipeline, monkeypatch):
    gate = Gate()  # every forward waits, forever as far as the engine can tell
    monkeypatch.setattr(pipeline, "denoise_step", gate.wrap(pipeline.denoise_step))

    async def scenario():
        engine = await started_engine(pipeline, stuck_after_s=0.5, max_running=1)
        stuck = engine.submit(request("stuck", steps=1))
        queued = engine.submit(request("queued", steps=1))
        await gate.wait_entered()
        await asyncio.sleep(0.6)
        healthy = engine.is_healthy()
        began = time.monotonic()
        await engine.shutdown(grace_period_s=0.1)
        shutdown_s = time.monotonic() - began
        for handle in (stuck, queued):
            with pytest.raises(RequestCancelledError):
                await handle.result()
        gate.open()  # let the step thread go, so that it ends with the test
        return healthy, shutdown_s

    healthy, shutdown_s = run(scenario())
    assert not healthy and shutdown_s < 2
