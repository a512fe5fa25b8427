"""LayeredPipeline.decompose_tree on the tiny checkpoint (CPU, float32): a three-level tree whose every
decomposition equals the same decomposition run alone, and packed children of different sizes and layer
counts that equal their runs alone. Prompts are given, so nothing is captioned."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vllm_layered.layer_tree import RefinementError, TreeJob, paste_children, refinement_input, refinement_seed
from vllm_layered.model_executor.image_processing import MAX_ASPECT_RATIO, bucket_size
from vllm_layered.model_executor.pipeline import GenerationParams, LayeredPipeline

STEPS = 2
SEED = 5
PROMPT = "a cat on a red sofa"
REFINE = [{"layer": "1", "layers": 2, "prompt": "a red sofa"}, {"layer": "1.0", "layers": 2, "prompt": "a cushion"}]


@pytest.fixture(scope="module")
def pipeline(tiny_checkpoint) -> LayeredPipeline:
    return LayeredPipeline.from_pretrained(tiny_checkpoint, device="cpu", dtype=torch.float32)


def input_image() -> Image.Image:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (64, 96, 4), dtype=np.uint8)
    a[..., 3] = 255
    return Image.fromarray(a)


def assert_same_layers(got: list[Image.Image], expected: list[Image.Image], *, exact: bool) -> None:
    """Bit for bit, or (packed with others: the forward's float sums run in another order) within 1/255 on
    99.9% of pixels, as tests/model_executor/test_pipeline.py compares packed batches."""
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.size == b.size
        diff = np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16))
        if exact:
            assert diff.max() == 0
        else:
            assert (diff <= 1).mean() >= 0.999, f"max diff {diff.max()}"


@pytest.fixture(scope="module")
def tree_and_steps(pipeline):
    steps = []
    tree = pipeline.decompose_tree(
        input_image(),
        refine=REFINE,
        prompt=PROMPT,
        layers=2,
        num_inference_steps=STEPS,
        seed=SEED,
        callback=lambda step, total: steps.append((step, total)),
    )
    return tree, steps


def test_tree_shape_and_progress(tree_and_steps):
    tree, steps = tree_and_steps
    assert [n.path for n in tree.walk()] == ["0", "1", "1.0", "1.0.0", "1.0.1", "1.1"]
    assert tree.size == bucket_size(96, 64, 640)
    assert all(n.image.size == tree.size and n.image.mode == "RGBA" for n in tree.walk())
    assert [n.role for n in tree.walk()] == ["layer", "group", "group", "layer", "layer", "layer"]
    assert tree.seed == SEED and tree.prompt == PROMPT
    assert [tree.node(p).prompt for p in ("0", "1", "1.0")] == [None, "a red sofa", "a cushion"]
    assert steps == [(i, 3 * STEPS) for i in range(1, 3 * STEPS + 1)]  # three levels of STEPS steps


@torch.no_grad()
def test_every_node_equals_its_decomposition_alone(pipeline, tree_and_steps):
    """The root is the plain call with the request seed; each refinement is the plain call on its crop with
    its derived seed, pasted back. (Each depth of this tree has one refinement, so nothing is packed and the
    pixels agree bit for bit; the next test packs.)"""
    tree, _ = tree_and_steps
    root = pipeline(input_image(), prompt=PROMPT, layers=2, num_inference_steps=STEPS, seed=SEED)
    assert_same_layers([n.image for n in tree.layers], root.layers, exact=True)
    for refinement in REFINE:
        path = refinement["layer"]
        node = tree.node(path)
        crop, box = refinement_input(node.image, path, max_aspect_ratio=MAX_ASPECT_RATIO)
        assert node.crop_box == box
        alone = pipeline(
            crop,
            prompt=refinement["prompt"],
            layers=refinement["layers"],
            num_inference_steps=STEPS,
            seed=refinement_seed(SEED, path),
        )
        assert_same_layers([c.image for c in node.children], paste_children(alone.layers, box, tree.size), exact=True)


@torch.no_grad()
def test_packed_children_of_different_sizes_equal_their_runs_alone(pipeline):
    image = input_image()
    crops = [image.crop((0, 0, 96, 64)), image.crop((10, 4, 50, 60))]  # buckets 736x480 and 544x736
    assert bucket_size(*crops[0].size, 640) != bucket_size(*crops[1].size, 640)
    jobs = [TreeJob("0", crops[0], 2, "a wall", 11), TreeJob("1", crops[1], 1, "a sofa", 12)]
    params = GenerationParams(num_inference_steps=STEPS)
    packed = pipeline._decompose_jobs(jobs, params, " ", lambda: None)
    for job, (layers, prompt) in zip(jobs, packed):
        alone = pipeline(job.image, prompt=job.prompt, layers=job.layers, num_inference_steps=STEPS, seed=job.seed)
        assert prompt == job.prompt
        assert_same_layers(layers, alone.layers, exact=False)  # measured: max diff 1


def test_bad_refinements_are_refused_before_any_work(pipeline, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("decomposed before checking the refinements")

    monkeypatch.setattr(pipeline, "_decompose_jobs", no_work)
    with pytest.raises(RefinementError, match="the root decomposition has 3 layer"):
        pipeline.decompose_tree(input_image(), refine=["3:2"], prompt="x", layers=3)
    with pytest.raises(RefinementError, match="layers must be between 1 and 20, got 21"):
        pipeline.decompose_tree(input_image(), refine=["1:21"], prompt="x", layers=3)
    with pytest.raises(RefinementError, match="its parent layer 2 is not refined"):
        pipeline.decompose_tree(input_image(), refine=["1:2", "2.0:2"], prompt="x", layers=3)
