"""Tree requests (``refine``) in the engine, on the tiny model (CPU, float32): ONE engine request that runs every
decomposition of its tree, the refinements of a layer starting once it is decoded and packed into forwards with
other requests' steps. The tiny model's layers are opaque noise, so a test double masks each decoded layer to a
box of its own (engine_helpers.mask_decoded_layers): crops, and their buckets, then differ from layer to layer.
Refinements are given prompts, so nothing is captioned."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.serving.engine_helpers import (
    Gate,
    Recorder,
    cancel_inside,
    mask_decoded_layers,
    request,
    run,
    started_engine,
    wait_for,
)
from vllm_layered.layer_tree import (
    EmptyLayerError,
    Refinement,
    RefinementError,
    paste_children,
    refinement_input,
    refinement_seed,
)
from vllm_layered.model_executor.image_processing import MAX_ASPECT_RATIO, bucket_size
from vllm_layered.model_executor.pipeline import LayeredPipeline
from vllm_layered.serving.engine.engine import planned_work, refinement_tokens, request_tokens
from vllm_layered.serving.engine.request import RequestCancelledError

STEPS = 2
SEED = 3
# layer i of every decomposition is visible only in BOXES[i % 3] (fractions of its size); layer 2 is empty
BOXES = [(0.0, 0.0, 0.6, 0.7), (0.5, 0.35, 0.9, 0.95), (0.0, 0.0, 0.0, 0.0)]
CHAIN = [{"layer": "1", "layers": 2, "prompt": "a sofa"}, {"layer": "1.0", "layers": 1, "prompt": "a cushion"}]
SIBLINGS = [{"layer": "0", "layers": 1, "prompt": "a wall"}, {"layer": "1", "layers": 2, "prompt": "a sofa"}]


@pytest.fixture(scope="module")
def pipeline(tiny_checkpoint):
    pipe = LayeredPipeline.from_pretrained(tiny_checkpoint, device="cpu", dtype=torch.float32)
    mask_decoded_layers(pipe, BOXES)
    return pipe


def tree_request(rid: str, refine: list[dict], *, layers: int = 2, **kwargs):
    return request(rid, layers=layers, steps=STEPS, seed=SEED, refine=[Refinement.parse(r) for r in refine],
                   **kwargs)


def offline_tree(pipeline, req, refine):
    """LayeredPipeline.decompose_tree for the same request (the engine requests here have CFG off)."""
    return pipeline.decompose_tree(req.image, refine=refine, prompt=req.prompt, negative_prompt=None,
                                   true_cfg_scale=req.params.true_cfg_scale, layers=req.params.layers,
                                   num_inference_steps=STEPS, seed=SEED)


def close(got: list[Image.Image], expected: list[Image.Image]) -> None:
    """Within 1/255 on >= 99.9% of the values (packed with others, a forward sums in another order), as
    tests/model_executor/test_pipeline.py compares packed batches."""
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        diff = np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16))
        assert (diff <= 1).mean() >= 0.999, f"max diff {diff.max()}"


def test_a_tree_served_alone_equals_the_offline_tree(pipeline):
    """Each depth of this tree has one parent, so the engine steps exactly what decompose_tree steps: every node
    bit for bit. Progress names the node at work."""
    req = tree_request("tree", CHAIN)
    events = []

    async def scenario():
        engine = await started_engine(pipeline)
        handle = engine.submit(req)
        events.extend([event async for event in handle.stream()])
        output = await handle.result()
        await engine.shutdown(1)
        return output

    served = run(scenario())
    expected = offline_tree(pipeline, req, CHAIN)
    assert [n.path for n in served.tree.walk()] == [n.path for n in expected.walk()] == ["0", "1", "1.0", "1.0.0",
                                                                                         "1.1"]
    for got, want in zip(served.tree.walk(), expected.walk()):
        assert (got.frame, got.bbox, got.prompt) == (want.frame, want.bbox, want.prompt), got.path
        assert np.array_equal(np.asarray(got.image), np.asarray(want.image)), got.path
    assert served.layers == [node.image for node in served.tree.layers] and served.prompt == "a cat"
    assert served.tree.node("1").crop_box != served.tree.node("1.0").crop_box
    assert [(e.node, e.step) for e in events if e.kind == "step"] == [
        (None, 1), (None, 2), ("1", 1), ("1", 2), ("1.0", 1), ("1.0", 2)]
    assert [e.node for e in events if e.kind == "decoding"] == [None, "1", "1.0"]
    assert set(served.timings) == {"queue_s", "preprocess_s", "denoise_s", "decode_s", "total_s"}


def test_children_of_different_sizes_packed_with_another_request_equal_their_runs_alone(pipeline):
    """The root's two refinements (crops of different buckets) join the running set together and share forwards
    with a long request of another size; each equals its decomposition run alone, pasted back."""
    recorder = Recorder()

    async def scenario():
        engine = await started_engine(pipeline, recorder)
        other = engine.submit(request("other", layers=1, steps=1000, size=(48, 80), seed=9))
        await wait_for(other, "step")
        tree = await engine.submit(tree_request("tree", SIBLINGS)).result()
        assert other.cancel()
        with pytest.raises(RequestCancelledError):
            await other.result()
        await engine.shutdown(1)
        return tree

    tree = run(scenario()).tree
    assert max(recorder.steps) == 3  # both refinements and the other request in one forward
    buckets = set()
    for refinement in SIBLINGS:
        path = refinement["layer"]
        node = tree.node(path)
        crop, box = refinement_input(node.image, path, max_aspect_ratio=MAX_ASPECT_RATIO)
        assert node.crop_box == box
        buckets.add(bucket_size(*crop.size, 640))
        alone = pipeline(crop, prompt=refinement["prompt"], negative_prompt=None, true_cfg_scale=1.0,
                         layers=refinement["layers"], num_inference_steps=STEPS, seed=refinement_seed(SEED, path))
        close([child.image for child in node.children], paste_children(alone.layers, box, tree.size))
    assert len(buckets) == 2


def test_cancelling_a_tree_while_a_refinement_denoises_stops_it(pipeline, monkeypatch):
    """The root took its steps and was decoded; the cancel lands during the refinement's first step. The tree,
    one request for the engine however many decompositions run, ends cancelled and nothing more is decoded."""
    gate = Gate(when=lambda call: call == STEPS + 1)  # the refinement's first step
    monkeypatch.setattr(pipeline, "denoise_step", gate.wrap(pipeline.denoise_step))
    decodes = Gate(when=lambda call: False)
    monkeypatch.setattr(pipeline.vae, "decode", decodes.wrap(pipeline.vae.decode))

    assert cancel_inside(pipeline, gate, tree_request("tree", SIBLINGS[1:])) == 1
    assert gate.calls == STEPS + 1 and decodes.calls == 1  # the root's 2 layers in one chunk, then nothing


def test_an_empty_layer_to_refine_fails_the_request_and_the_engine_goes_on(pipeline):
    async def scenario():
        engine = await started_engine(pipeline)
        tree = engine.submit(tree_request("tree", [{"layer": "2", "layers": 1, "prompt": "air"}], layers=3))
        with pytest.raises(EmptyLayerError, match="cannot refine layer 2: it is empty"):
            await tree.result()
        after = await engine.submit(request("after", steps=1)).result()
        healthy = engine.is_healthy()
        await engine.shutdown(1)
        return after, healthy

    after, healthy = run(scenario())
    assert len(after.layers) == 1 and healthy


def test_a_tree_is_queued_and_weighed_as_all_its_work(pipeline):
    """Refused at submit when its refinements do not fit it; waiting, it counts the work of every planned
    decomposition (refinements at the root bucket's size, before any crop exists)."""
    tree = tree_request("tree", SIBLINGS + [{"layer": "1.1", "layers": 3, "prompt": "a leg"}])
    tokens = [request_tokens(tree), refinement_tokens(tree, 1), refinement_tokens(tree, 2), refinement_tokens(tree, 3)]
    assert planned_work(tree) == sum(tokens) * STEPS and tokens[1] < tokens[0] == tokens[2] < tokens[3]

    async def scenario():
        engine = await started_engine(pipeline, max_running=1)
        with pytest.raises(RefinementError, match="no such layer"):
            engine.submit(tree_request("bad", [{"layer": "2", "layers": 1}]))
        first = engine.submit(request("first", steps=1000))
        await wait_for(first, "step")
        waiting = engine.submit(tree)
        _, waiting_work = engine.work_tokens()
        for handle in (first, waiting):
            assert handle.cancel()
            with pytest.raises(RequestCancelledError):
                await handle.result()
        await engine.shutdown(1)
        return waiting_work

    assert run(scenario()) == planned_work(tree)
