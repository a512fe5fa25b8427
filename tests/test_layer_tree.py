"""The layer tree: paths, refinement parsing and validation, seeds, and the crop/resize/paste geometry.

The geometry is proved exact with a test double for the model: a decomposer that splits its input into bands
at the input's own size, so compositing its layers gives the input back bit for bit. Then a whole tree built
from it composites back to the root image bit for bit: any error in a bounding box, margin, crop offset,
paste offset or canvas size would show. Only the resampling of the real path (the bucket resize in, the
resize back out) is not exact; a second double that works at the bucket size shows where that error stays.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys

import httpx
import numpy as np
import pytest
from PIL import Image

from vllm_layered.formats import composite_layers
from vllm_layered.layer_tree import (
    MAX_REFINE_DEPTH,
    MAX_REFINEMENTS,
    EmptyLayerError,
    LayerNode,
    LayerTree,
    Refinement,
    RefinementError,
    TreeJob,
    build_tree,
    crop_box,
    parse_refinements,
    paste_children,
    plan_refinements,
    refinement_input,
    refinement_seed,
    refinements_from_form,
)
from vllm_layered.model_executor.image_processing import MAX_ASPECT_RATIO, bucket_size


def plan(*specs, root_layers=3):
    return plan_refinements([Refinement.parse(s) for s in specs], root_layers=root_layers, max_layers=20)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGBA"))


# -- paths, parsing, validation -------------------------------------------------------------------------


def test_refinement_forms_parse_to_the_same_thing():
    assert Refinement.parse("1.0:2") == Refinement("1.0", 2)
    assert Refinement.parse({"layer": "1.0", "layers": 2}) == Refinement("1.0", 2)
    assert Refinement.parse({"layer": 1, "layers": "3", "prompt": "a sofa"}) == Refinement("1", 3, "a sofa")
    assert Refinement.parse(" 01.00 : 2") == Refinement("1.0", 2)  # canonical path: leading zeros dropped
    assert Refinement("1.0", 2).depth == 2


@pytest.mark.parametrize(
    "spec,message",
    [
        ("1", "expected PATH:N"),
        ("1:x", "expected PATH:N"),
        ("a:2", "bad layer path 'a'"),
        ("1..0:2", "bad layer path"),
        ("-1:2", "bad layer path"),
        ("1:0", "layers must be at least 1"),
        ({"layer": 1.0, "layers": 2}, "a layer path is a string"),
        ({"layer": "1"}, "needs 'layer'"),
        ({"layer": "1", "layers": 2, "depth": 1}, "unknown refinement field"),
        ({"layer": "1", "layers": 2.5}, "layers must be an integer"),
        ({"layer": "1", "layers": True}, "layers must be an integer"),
        ({"layer": "1", "layers": 2, "prompt": 3}, "prompt must be a string"),
        (7, "a refinement is"),
    ],
)
def test_bad_refinements_are_clear_errors(spec, message):
    with pytest.raises(RefinementError, match=message):
        Refinement.parse(spec)


def test_parse_refinements_takes_lists_json_and_one_string():
    expected = [Refinement("1", 2), Refinement("1.0", 3, "x")]
    assert parse_refinements(["1:2", {"layer": "1.0", "layers": 3, "prompt": "x"}]) == expected
    assert parse_refinements(' [{"layer": "1", "layers": 2}, {"layer": "1.0", "layers": 3, "prompt": "x"}]') == expected
    assert parse_refinements("1:2") == [Refinement("1", 2)]
    assert parse_refinements(None) == [] == parse_refinements([])


@pytest.mark.parametrize(
    "value,message",
    [
        ("[1:2]", "refine is not a valid JSON array"),
        ({"layer": "1", "layers": 2}, "refine must be a list of refinements, got dict"),
        (3, "refine must be a list of refinements, got int"),
        ("1:²", "expected PATH:N"),
        (["١:2"], "bad layer path"),  # digits are ASCII digits
    ],
)
def test_bad_refine_values_are_clear_errors(value, message):
    with pytest.raises(RefinementError, match=message):
        parse_refinements(value)


@pytest.mark.parametrize(
    "specs,message",
    [
        (["3:2"], r"refine 3: no such layer; the root decomposition has 3 layer\(s\), 0-2"),
        (["1:2", "1.2:2"], r"refine 1.2: no such layer; layer 1 is refined into 2 layer\(s\), 1.0-1.1"),
        (["2.0:2"], "refine 2.0: its parent layer 2 is not refined; refine 2 too"),
        (["1:2", "01:3"], "layer 1 is refined twice"),
        (["1:21"], "refine 1: layers must be between 1 and 20, got 21"),
        (["0:1", "0.0:1", "0.0.0:1", "0.0.0.0:1"], "refine 0.0.0.0: too deep"),
        ([f"{i % 3}:1" if i < 3 else f"0.{i - 3}:1" for i in range(MAX_REFINEMENTS + 1)], "at most 20 refinements"),
    ],
)
def test_impossible_plans_are_clear_errors(specs, message):
    with pytest.raises(RefinementError, match=message):
        plan(*specs)


def test_plan_orders_parents_first_and_allows_the_depth_limit():
    deepest = ".".join(["0"] * MAX_REFINE_DEPTH)
    specs = [f"{deepest}:2", "1:2", "0.0:1", "0:1", "1.1:3"]
    assert [r.path for r in plan(*specs)] == ["0", "1", "0.0", "1.1", deepest]


def test_refinement_seed_is_a_documented_hash_of_seed_and_path():
    expected = int.from_bytes(hashlib.sha256(b"7/1.0").digest()[:8], "big") >> 1
    assert refinement_seed(7, "1.0") == expected == refinement_seed(7, "01.0")
    seeds = {refinement_seed(s, p) for s in (7, 8) for p in ("0", "1", "1.0", "0.1")}
    assert len(seeds) == 8 and all(0 <= s < 2**63 for s in seeds)


def test_the_module_does_not_import_torch():
    code = "import sys, vllm_layered.layer_tree; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# -- what the openai SDK sends --------------------------------------------------------------------------


def sdk_form(refine) -> list[tuple[str, str]]:
    """The refine fields, in order, of the multipart body the unchanged openai SDK sends for
    extra_body={"refine": refine}, as the server's form parser (Starlette's) reads them."""
    openai = pytest.importorskip("openai")
    sent = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200, json={"created": 0, "data": []})

    http_client = httpx.Client(transport=httpx.MockTransport(handler))
    client = openai.OpenAI(base_url="http://test/v1", api_key="x", http_client=http_client)
    client.images.edit(model="m", image=("in.png", b"\x89PNG", "image/png"), prompt="", extra_body={"refine": refine})
    (request,) = sent
    return asyncio.run(_starlette_form(request.headers["content-type"], request.read()))


async def _starlette_form(content_type: str, body: bytes) -> list[tuple[str, str]]:
    from starlette.requests import Request

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {"type": "http", "method": "POST", "headers": [(b"content-type", content_type.encode())]}
    form = await Request(scope, receive).form()
    return [(key, value) for key, value in form.multi_items() if key.startswith("refine")]


def as_form(fields: list[tuple[str, str]]) -> dict[str, list[str]]:
    form: dict[str, list[str]] = {}
    for key, value in fields:
        form.setdefault(key, []).append(value)
    return form


def test_the_openai_sdk_flattens_a_list_of_dicts_field_by_field():
    fields = sdk_form([{"layer": "1", "layers": 2}, {"layer": "1.0", "layers": 3}])
    # all values of one key, then the next key's: the dicts are not kept together on the wire
    assert fields == [("refine[][layer]", "1"), ("refine[][layer]", "1.0"), ("refine[][layers]", "2"),
                      ("refine[][layers]", "3")]
    assert refinements_from_form(as_form(fields)) == [Refinement("1", 2), Refinement("1.0", 3)]


def test_every_sdk_encoding_is_understood():
    expected = [Refinement("1", 2, "a sofa"), Refinement("1.0", 3, "a cushion")]
    as_dicts = [{"layer": r.path, "layers": r.layers, "prompt": r.prompt} for r in expected]
    assert refinements_from_form(as_form(sdk_form(as_dicts))) == expected
    as_json = sdk_form(json.dumps(as_dicts))
    assert [key for key, _ in as_json] == ["refine"]
    assert refinements_from_form(as_form(as_json)) == expected
    as_strings = sdk_form(["1:2", "1.0:3"])
    assert as_strings == [("refine[]", "1:2"), ("refine[]", "1.0:3")]
    assert refinements_from_form(as_form(as_strings)) == [Refinement("1", 2), Refinement("1.0", 3)]


def test_prompts_on_some_refinements_only_cannot_be_paired_in_a_form():
    form = as_form(sdk_form([{"layer": "1", "layers": 2, "prompt": "a sofa"}, {"layer": "1.0", "layers": 3}]))
    assert form["refine[][prompt]"] == ["a sofa"]  # which refinement it belonged to is lost on the wire
    with pytest.raises(RefinementError, match="1 prompts for 2 refinements"):
        refinements_from_form(form)


# -- geometry -------------------------------------------------------------------------------------------


def test_crop_box_adds_a_margin_clamped_to_the_canvas():
    assert crop_box((40, 40, 72, 56), (100, 100), max_aspect_ratio=16) == (38, 38, 74, 58)  # 32 px -> 2 px
    assert crop_box((0, 3, 64, 99), (100, 100), max_aspect_ratio=16) == (0, 0, 70, 100)
    assert crop_box((50, 50, 51, 51), (100, 100), max_aspect_ratio=16) == (49, 49, 52, 52)  # at least 1 px


def test_a_thin_box_is_widened_to_a_decomposable_aspect_ratio():
    # a 1 px line: the margin (ceil(1000 / 16) = 63 px) alone keeps the crop within 1:16
    assert crop_box((0, 50, 1000, 51), (1000, 200), max_aspect_ratio=16) == (0, 0, 1000, 114)
    # at the canvas's bottom edge the margin only grows one side: 1126 x 64 would be beyond 1:16, so the
    # height grows to ceil(1126 / 16) = 71, upwards as the edge stops it
    box = crop_box((500, 199, 1500, 200), (2000, 200), max_aspect_ratio=16)
    assert box == (437, 129, 1563, 200)
    bucket_size(box[2] - box[0], box[3] - box[1], 640)  # has a bucket


def test_an_empty_layer_is_refused():
    with pytest.raises(EmptyLayerError, match="cannot refine layer 1.0: it is empty") as caught:
        refinement_input(Image.new("RGBA", (32, 32), (255, 0, 0, 0)), "1.0", max_aspect_ratio=MAX_ASPECT_RATIO)
    assert caught.value.path == "1.0"


def test_paste_children_resizes_into_the_crop_box():
    box = (10, 20, 46, 40)
    children = [Image.new("RGBA", (720, 400), (200, 100, 50, 255))]
    (pasted,) = paste_children(children, box, (64, 48))
    assert pasted.size == (64, 48) and pasted.getchannel("A").getbbox() == box
    inside = pixels(pasted)[20:40, 10:46]
    assert (inside == (200, 100, 50, 255)).all()


def root_image() -> Image.Image:
    """96x64 RGBA: opaque and translucent pixels, transparent holes and a transparent corner, every
    transparent pixel (0, 0, 0, 0) so that compositing can reproduce it bit for bit."""
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (64, 96, 4), dtype=np.uint8)
    a[..., 3] = np.where(rng.random((64, 96)) < 0.6, 255, a[..., 3])
    a[rng.random((64, 96)) < 0.1] = 0
    a[:20, 70:] = 0
    a[a[..., 3] == 0] = 0
    return Image.fromarray(a)


class BandDecomposer:
    """Splits each input into ``layers`` bands across its longer side, at the input's own size (or, with
    ``bucket=True``, at its 640 bucket size as the pipeline does). Records the jobs of every call."""

    def __init__(self, bucket: bool = False):
        self.bucket = bucket
        self.calls: list[list[TreeJob]] = []

    def __call__(self, jobs):
        self.calls.append(jobs)
        return [(self.split(job), f"prompt of {job.path}") for job in jobs]

    def split(self, job: TreeJob) -> list[Image.Image]:
        image = job.image
        if self.bucket:
            image = image.resize(bucket_size(*image.size, 640), Image.Resampling.LANCZOS)
        a = pixels(image)
        axis = 1 if image.width >= image.height else 0
        edges = np.linspace(0, a.shape[axis], job.layers + 1).round().astype(int)
        layers = []
        for lo, hi in zip(edges[:-1], edges[1:]):
            band = np.zeros_like(a)
            index = (slice(None), slice(lo, hi)) if axis == 1 else (slice(lo, hi), slice(None))
            band[index] = a[index]
            layers.append(Image.fromarray(band))
        return layers


def band_tree(decomposer, specs=("1:2", "0:3", "1.0:2", "0.2:2")) -> LayerTree:
    plan_ = plan(*specs)
    return build_tree(
        root_image(), layers=3, prompt="root", seed=11, plan=plan_, decompose=decomposer, max_aspect_ratio=16
    )


def test_a_tree_composites_back_to_its_input_bit_for_bit():
    decomposer = BandDecomposer()
    tree = band_tree(decomposer)
    assert np.array_equal(pixels(composite_layers([n.image for n in tree.leaves()])), pixels(root_image()))
    for node in tree.walk():
        assert node.image.size == tree.size == (96, 64)
        if node.children:  # each refined layer is its children stacked
            assert np.array_equal(pixels(composite_layers([c.image for c in node.children])), pixels(node.image))
    # the jobs: the root, then the two depth-1 refinements in one call, then the two of depth 2
    assert [[job.path for job in call] for call in decomposer.calls] == [[None], ["0", "1"], ["0.2", "1.0"]]
    assert [job.seed for job in decomposer.calls[1]] == [refinement_seed(11, "0"), refinement_seed(11, "1")]
    assert decomposer.calls[0][0].seed == 11
    # layer 1 is the band x 32..64 (all rows): its crop adds ceil(64 / 16) = 4 px, clamped to the canvas
    layer1 = tree.node("1")
    assert layer1.bbox == (32, 0, 64, 64) and layer1.crop_box == (28, 0, 68, 64)
    assert decomposer.calls[1][1].image.size == (40, 64)
    # its crop is split across rows: child 1.0 is the crop's top half, rows 0..32
    child = tree.node("1.0")
    assert child.frame == (28, 0, 68, 64) and child.bbox == (32, 0, 64, 32) and child.bbox_in_frame == (4, 0, 36, 32)
    assert child.parent == "1" and child.role == "group" and tree.node("1.1").role == "layer"
    assert tree.node("1.0").prompt == "prompt of 1.0" and tree.prompt == "prompt of None"


def test_a_tree_at_bucket_size_is_exact_outside_each_crop_and_close_inside():
    """With the pipeline's resampling (bucket resize in, resize back out) a refined layer's children lie
    inside its crop box, transparent outside it exactly; inside, they are the layer up to Lanczos error."""
    tree = band_tree(BandDecomposer(bucket=True), specs=("1:2",))
    layer = tree.node("1")
    left, top, right, bottom = layer.crop_box
    stacked = pixels(composite_layers([c.image for c in layer.children])).astype(int)
    outside = np.ones(stacked.shape[:2], bool)
    outside[top:bottom, left:right] = False
    assert (stacked[outside] == 0).all()
    original = pixels(layer.image).astype(int)
    alpha_error = np.abs(stacked[..., 3] - original[..., 3])[top:bottom, left:right]
    assert alpha_error.mean() < 1 and (alpha_error <= 8).mean() > 0.98  # measured: 0.40 and 0.989


def test_refining_an_empty_layer_stops_the_tree_with_a_clear_error():
    def decompose(jobs):
        return [([Image.new("RGBA", job.image.size)] * job.layers, "") for job in jobs]

    with pytest.raises(EmptyLayerError, match="cannot refine layer 1"):
        build_tree(root_image(), layers=2, prompt="", seed=0, plan=plan("1:2"), decompose=decompose,
                   max_aspect_ratio=16)


def test_tree_lookup():
    full = (0, 0, 8, 8)
    tree = LayerTree([LayerNode(str(i), Image.new("RGBA", (8, 8)), full) for i in range(2)], "p", 1)
    tree.refine("1", [Image.new("RGBA", (8, 8))] * 2, full, "q")
    assert [n.path for n in tree.walk()] == ["0", "1", "1.0", "1.1"]
    assert [n.path for n in tree.leaves()] == ["0", "1.0", "1.1"]
    assert tree.node("1.1").index == 1 and tree.node("0").parent is None and tree.node("0").bbox is None
    with pytest.raises(RefinementError, match="no layer 1.2: layer 1 has 2 layer"):
        tree.node("1.2")
    with pytest.raises(RefinementError, match="layer 1 is refined twice"):
        tree.refine("1", [Image.new("RGBA", (8, 8))], full, "q")
