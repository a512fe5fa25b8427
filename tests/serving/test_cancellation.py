"""Cancellation at every stage of a request (tiny model, CPU). A gate holds the stage's real call site so that
the cancel lands in it; the request then ends CANCELLED with the rest of its work not done, or the cancel
answers False because the request had already ended. Never True followed by a result."""

import threading

import pytest
import torch
from fastapi.testclient import TestClient

from tests.serving.engine_helpers import (
    WAIT_S,
    Gate,
    Recorder,
    cancel_inside,
    request,
    run,
    started_engine,
    wait_for,
)
from tests.serving.helpers import assert_error, png_bytes
from vllm_layered.model_executor.pipeline import LayeredPipeline
from vllm_layered.serving import reply
from vllm_layered.serving.api_server import build_app
from vllm_layered.serving.engine.engine import EngineConfig, ThreadedEngine
from vllm_layered.serving.engine.request import RequestCancelledError
from vllm_layered.serving.limits import ServerLimits
from vllm_layered.serving.tenants import TenantRegistry


@pytest.fixture(scope="module")
def pipeline(tiny_checkpoint):
    return LayeredPipeline.from_pretrained(tiny_checkpoint, device="cpu", dtype=torch.float32)


def counter(obj, name: str, monkeypatch) -> Gate:
    """Count the calls of ``obj.name`` (a gate that never closes)."""
    gate = Gate(when=lambda call: False)
    monkeypatch.setattr(obj, name, gate.wrap(getattr(obj, name)))
    return gate


def test_cancel_while_queued_or_preprocessing(pipeline, monkeypatch):
    """a preprocesses (held inside the text encoder), b is admitted behind it on the aux thread, c waits in the
    queue. c and b end at once; a stops when the text encoder returns, before the VAE encode."""
    gate = Gate()
    monkeypatch.setattr(pipeline, "encode_prompts", gate.wrap(pipeline.encode_prompts))
    prepare = counter(pipeline, "prepare", monkeypatch)
    recorder = Recorder()

    async def scenario():
        engine = await started_engine(pipeline, recorder, max_running=2)
        a = engine.submit(request("a", tenant="a"))
        await gate.wait_entered()
        b = engine.submit(request("b", tenant="b"))
        c = engine.submit(request("c", tenant="c"))
        await wait_for(b, "started")
        counts = [(engine.num_running, engine.num_waiting)]
        assert c.cancel() and b.cancel()
        for handle in (c, b):
            with pytest.raises(RequestCancelledError):
                await handle.result()
        assert a.cancel()
        counts.append((engine.num_running, engine.num_waiting))  # a still preprocessing: it stops at a boundary
        gate.open()
        with pytest.raises(RequestCancelledError):
            await a.result()
        counts.append((engine.num_running, engine.num_waiting))
        ended = a.cancel()
        await engine.shutdown(1)
        return counts, ended

    counts, ended = run(scenario())
    assert counts == [(2, 1), (1, 0), (0, 0)]
    assert not ended  # an ended request cannot be cancelled
    assert prepare.calls == 0 and gate.calls == 1  # b never started, a stopped before the VAE encode
    assert recorder.started == ["a", "b"] and recorder.finished == ["cancelled"] * 3


def test_cancel_between_steps_stops_the_denoising(pipeline, monkeypatch):
    gate = Gate(when=lambda call: call == 2)  # the cancel lands while the second step runs
    monkeypatch.setattr(pipeline, "denoise_step", gate.wrap(pipeline.denoise_step))
    decode = counter(pipeline.vae, "decode", monkeypatch)

    assert cancel_inside(pipeline, gate, request("r", steps=5)) == 1
    assert gate.calls == 2 and decode.calls == 0  # no third step, no decode


def test_cancel_while_decoding_stops_after_the_chunk_in_flight(pipeline, monkeypatch):
    gate = Gate(when=lambda call: call == 1)  # the first chunk's VAE decode
    monkeypatch.setattr(pipeline.vae, "decode", gate.wrap(pipeline.vae.decode))

    assert cancel_inside(pipeline, gate, request("r", layers=3, steps=1), decode_chunk=1) == 1  # decoding runs
    assert gate.calls == 1  # layers 2 and 3 were never decoded


def test_a_cancel_after_the_last_chunk_drops_the_result(pipeline, monkeypatch):
    """The cancel lands on the aux thread between the last decoded chunk and the hand-over of the result."""
    engines: list[ThreadedEngine] = []
    decode_chunks = pipeline.decode_chunks

    def cancelled_after_the_last(state, chunk):
        yield from decode_chunks(state, chunk)
        assert engines[0].abort("r")

    monkeypatch.setattr(pipeline, "decode_chunks", cancelled_after_the_last)

    async def scenario():
        engines.append(await started_engine(pipeline))
        handle = engines[0].submit(request("r", steps=1))
        with pytest.raises(RequestCancelledError):
            await handle.result()
        await engines[0].shutdown(1)

    run(scenario())


def post_in_background(http: TestClient, request_id: str, results: list) -> threading.Thread:
    fields = {"prompt": "a red ball", "layers": "1", "num_inference_steps": "1", "true_cfg_scale": "1"}
    files = {"image": ("input.png", png_bytes(), "image/png")}

    def post() -> None:
        results.append(http.post("/v1/images/edits", data=fields, files=files, headers={"X-Request-Id": request_id}))

    thread = threading.Thread(target=post)
    thread.start()
    return thread


def test_delete_answers_whether_it_cancelled(pipeline, monkeypatch):
    """DELETE while the request decodes: cancelled, and the request answers 409. DELETE while its response is
    being built (every decomposition ended): not cancelled, and the result comes."""
    decode = Gate(when=lambda call: call == 1)
    monkeypatch.setattr(pipeline.vae, "decode", decode.wrap(pipeline.vae.decode))
    respond = Gate()
    monkeypatch.setattr(reply, "build_images_response", respond.wrap(reply.build_images_response))
    engine = ThreadedEngine(pipeline, EngineConfig())
    app = build_app(engine, tenants=TenantRegistry.open(), limits=ServerLimits(), shutdown_grace_s=0.1)
    results: list = []
    with TestClient(app) as http:
        first = post_in_background(http, "first", results)
        assert decode.entered.wait(WAIT_S)
        cancel = http.delete("/v1/requests/first")
        decode.open()
        first.join(WAIT_S)
        second = post_in_background(http, "second", results)
        assert respond.entered.wait(WAIT_S)
        too_late = http.delete("/v1/requests/second")
        respond.open()
        second.join(WAIT_S)
    assert cancel.status_code == 200 and cancel.json()["cancelled"] is True
    assert_error(results[0], 409, code="request_cancelled")
    assert too_late.status_code == 200 and too_late.json()["cancelled"] is False
    assert results[1].status_code == 200 and len(results[1].json()["data"]) == 1
