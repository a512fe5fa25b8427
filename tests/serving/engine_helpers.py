"""Helpers of the engine tests: requests on the tiny model, an observer that records, and a gate that holds a
real call site of the engine until the test opens it (so that a cancel or a failure lands in a known stage)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image

from vllm_layered.model_executor.pipeline import DECODE_CHUNK, GenerationParams
from vllm_layered.serving.engine.engine import EngineConfig, ThreadedEngine
from vllm_layered.serving.engine.observer import EngineObserver
from vllm_layered.serving.engine.request import LayeredRequest, ProgressEvent, RequestCancelledError, RequestHandle

WAIT_S = 120  # longest any step of these tests waits for the engine (the machines are slow and shared)


def image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8), "RGBA")


def request(rid: str, *, layers=1, steps=2, cfg=False, size=(64, 64), seed=0, **kwargs) -> LayeredRequest:
    return LayeredRequest(
        request_id=rid,
        image=image(*size, seed=seed),
        params=GenerationParams(layers=layers, num_inference_steps=steps, true_cfg_scale=4.0 if cfg else 1.0),
        prompt="a cat",
        negative_prompt=" " if cfg else None,
        seed=seed,
        **kwargs,
    )


class Recorder(EngineObserver):
    def __init__(self) -> None:
        self.started: list[str] = []
        self.steps: list[int] = []
        self.finished: list[str] = []

    def on_request_started(self, tenant, queue_time_s):
        self.started.append(tenant)

    def on_step(self, step_time_s, num_requests, num_tokens):
        self.steps.append(num_requests)

    def on_request_finished(self, tenant, outcome, e2e_time_s, layers, num_steps):
        self.finished.append(outcome)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=300))


async def started_engine(pipeline, observer=None, **config) -> ThreadedEngine:
    engine = ThreadedEngine(pipeline, EngineConfig(**config), observer=observer)
    await engine.start()
    return engine


def cancel_inside(pipeline, gate: Gate, submitted: LayeredRequest, **config) -> int:
    """Submit ``submitted``, cancel it while ``gate`` holds its work, then let the work go on: the request must end
    CANCELLED and leave the engine. Returns how many requests were running when the cancel landed."""

    async def scenario() -> int:
        engine = await started_engine(pipeline, **config)
        handle = engine.submit(submitted)
        await gate.wait_entered()
        running = engine.num_running
        assert handle.cancel()
        gate.open()
        with pytest.raises(RequestCancelledError):
            await handle.result()
        assert engine.num_running == 0
        await engine.shutdown(1)
        return running

    return run(scenario())


async def wait_for(handle: RequestHandle, kind: str) -> ProgressEvent:
    async for event in handle.stream():
        if event.kind == kind:
            return event
    raise AssertionError(f"no {kind!r} event")


class Gate:
    """Wraps a function so that the calls ``when`` picks block until ``open()``; counts every call."""

    def __init__(self, when: Callable[[int], bool] = lambda call: True) -> None:
        self.when = when
        self.calls = 0
        self.entered = threading.Event()
        self._opened = threading.Event()

    def wrap(self, fn: Callable) -> Callable:
        def gated(*args, **kwargs):
            self.calls += 1
            if self.when(self.calls):
                self.entered.set()
                if not self._opened.wait(WAIT_S):
                    raise TimeoutError("the test never opened the gate")
            return fn(*args, **kwargs)

        return gated

    async def wait_entered(self) -> None:
        if not await asyncio.to_thread(self.entered.wait, WAIT_S):
            raise AssertionError("the engine never reached the gated call")

    def open(self) -> None:
        self._opened.set()


def mask_decoded_layers(pipeline, boxes: list[tuple[float, float, float, float]]) -> None:
    """A test double for the model's layers: from now on, layer i of every decode (root or refinement) is
    transparent outside ``boxes[i % len(boxes)]`` ((left, top, right, bottom) as fractions of its size; an empty
    box makes it fully transparent). The tiny random model's layers are opaque noise, so without this every
    refinement's crop would be its whole canvas; with it, crops (and their buckets) differ from layer to layer."""
    decode_chunks = pipeline.decode_chunks

    def masked(state, chunk=DECODE_CHUNK):
        index = 0
        for layers in decode_chunks(state, chunk):
            out = []
            for layer in layers:
                width, height = layer.size
                left, top, right, bottom = boxes[index % len(boxes)]
                alpha = Image.new("L", layer.size, 0)
                box = (round(left * width), round(top * height), round(right * width), round(bottom * height))
                if box[2] > box[0] and box[3] > box[1]:
                    alpha.paste(layer.getchannel("A").crop(box), box[:2])
                layer = layer.copy()
                layer.putalpha(alpha)
                out.append(layer)
                index += 1
            yield out

    pipeline.decode_chunks = masked
