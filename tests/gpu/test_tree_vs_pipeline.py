"""A tree request (``refine``) served by the engine on the GPU, against LayeredPipeline.decompose_tree offline.

The tree: a 640 CFG decomposition into 3 layers, layer 1 refined into 2, then its bottom child 1.0 into 2 (one
refinement per depth). Its refinements cross the engine's threads as every request does (prepared on the aux
stream, denoised on the step stream, decoded on the aux stream) and are cropped from decoded layers on the host.

- Alone: each depth has one decomposition, so the engine steps exactly what decompose_tree steps (it packs a
  depth's decompositions together; the engine packs a layer's refinements together, the same thing here): every
  node must be bit for bit the offline tree's (max 0). Any difference is a race.
- Beside another request: the tree's steps share forwards with it, so every GEMM has another M and the layers
  move within the packed bound of test_engine_vs_pipeline.py. A parent's layers moved that way can move its
  alpha bounding box, and with it the crop its refinement decomposes; so each refinement is compared with its own
  decomposition run alone offline on the crop the served tree gave it (what decompose_tree runs for that input),
  the root with the offline root.
"""

from __future__ import annotations

import pytest

from tests.gpu.conftest import PROMPT, Case, layer_diff, measured, needs_cuda, serve
from tests.gpu.test_engine_vs_pipeline import PACKED_MEAN_BOUND
from vllm_layered.layer_tree import Refinement, paste_children, refinement_input, refinement_seed
from vllm_layered.model_executor.image_processing import MAX_ASPECT_RATIO
from vllm_layered.serving.engine.observer import EngineObserver

pytestmark = [pytest.mark.gpu, needs_cuda]

ROOT = Case("tree-640x3-cfg-3steps", (600, 400), layers=3, resolution=640, steps=3, cfg=True, seed=11)
REFINE = [{"layer": "1", "layers": 2, "prompt": "the middle layer of a poster"},
          {"layer": "1.0", "layers": 2, "prompt": "a shape on a transparent background"}]
# Long enough to be still denoising while every level of the tree runs, so the refinements share its forwards.
OTHER = Case("other-640x2-cfg-24steps", (500, 500), layers=2, resolution=640, steps=24, cfg=True, seed=12)


class ForwardSizes(EngineObserver):
    def __init__(self) -> None:
        self.requests: list[int] = []

    def on_step(self, step_time_s: float, num_requests: int, num_tokens: int) -> None:
        self.requests.append(num_requests)


def tree_request(request_id: str = "tree"):
    request = ROOT.request(request_id)
    request.refine = [Refinement.parse(r) for r in REFINE]
    return request


@pytest.fixture(scope="module")
def offline_tree(full_pipeline):
    return full_pipeline.decompose_tree(ROOT.image(), refine=REFINE, prompt=PROMPT, negative_prompt=" ",
                                        true_cfg_scale=4.0, layers=ROOT.layers, resolution=ROOT.resolution,
                                        num_inference_steps=ROOT.steps, seed=ROOT.seed)


def node_layers(tree, path: str | None):
    """The layers a node's decomposition returned, in the root canvas: the root's, or a refined layer's children."""
    nodes = tree.layers if path is None else tree.node(path).children
    return [node.image for node in nodes]


def test_a_tree_served_alone_equals_the_offline_tree(full_pipeline, offline_tree):
    [served] = serve(full_pipeline, [tree_request()])
    tree = served.tree
    assert [n.path for n in tree.walk()] == [n.path for n in offline_tree.walk()]
    diffs = {}
    for path in (None, "1", "1.0"):
        if path is not None:
            assert tree.node(path).crop_box == offline_tree.node(path).crop_box, path
        diffs[path] = measured(f"tree alone, node {path or 'root'}",
                               layer_diff(node_layers(tree, path), node_layers(offline_tree, path)))
    assert all(d["max"] == 0 for d in diffs.values()), diffs


def test_a_tree_packed_with_another_request_stays_within_the_packed_bound(full_pipeline, offline_tree):
    observer = ForwardSizes()
    served, _ = serve(full_pipeline, [tree_request(), OTHER.request()], observer)
    tree = served.tree
    # the tree runs one decomposition at a time here: a forward of two requests is a tree step packed with OTHER
    packed = sum(n == 2 for n in observer.requests)
    print(f"\n[gpu acceptance] tree beside {OTHER.name}: {packed} of {len(observer.requests)} forwards packed "
          f"(the tree takes {3 * ROOT.steps} steps, {ROOT.steps} of them its root's)")
    assert packed > ROOT.steps, "no refinement step shared a forward with the other request"
    expected = {None: node_layers(offline_tree, None)}
    for refinement in REFINE:
        path = refinement["layer"]
        crop, box = refinement_input(tree.node(path).image, path, max_aspect_ratio=MAX_ASPECT_RATIO)
        assert tree.node(path).crop_box == box
        alone = full_pipeline(crop, prompt=refinement["prompt"], negative_prompt=" ", true_cfg_scale=4.0,
                              layers=refinement["layers"], resolution=ROOT.resolution,
                              num_inference_steps=ROOT.steps, seed=refinement_seed(ROOT.seed, path))
        expected[path] = paste_children(alone.layers, box, tree.size)
    diffs = {path: measured(f"tree packed, node {path or 'root'}", layer_diff(node_layers(tree, path), layers))
             for path, layers in expected.items()}
    assert all(d["mean"] <= PACKED_MEAN_BOUND["none"] for d in diffs.values()), diffs
