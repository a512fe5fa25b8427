"""Tree requests (``refine``) over HTTP against a real server process (tiny model, one step): the unchanged openai
SDK with ``extra_body``, its response rebuilt into a tree by the client; a streamed PSD package that reopens with
its groups and progress events that name the node; `vllm-layered client decompose --refine` writing the tree's
folders. What the API decides before any work (refine's forms, its errors, the work cap, one concurrency slot):
tests/serving/test_api_admission.py."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from tests.serving.helpers import start_server
from vllm_layered.clients.layers import tree_from_response
from vllm_layered.clients.sse import SSEDecoder

REFINE = [{"layer": "1", "layers": 2, "prompt": "a sofa"}, {"layer": "1.0", "layers": 2, "prompt": "a cushion"}]
FIELDS = {"layers": 2, "num_inference_steps": 1, "true_cfg_scale": 1, "seed": 5}
PROMPT = "a cat on a sofa"
PATHS = ["0", "1", "1.0", "1.0.0", "1.0.1", "1.1"]


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    with start_server(tiny_checkpoint, tmp_path_factory.mktemp("logs")) as server:
        yield server


@pytest.fixture(scope="module")
def sdk_tree(server, image_path):
    """A three-level tree through the unchanged openai SDK: refine as extra_body, a list of dicts."""
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="none", max_retries=0)
    with open(image_path, "rb") as image:
        response = client.images.edit(image=image, prompt=PROMPT, extra_body={**FIELDS, "refine": REFINE})
    return response.model_dump()


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGBA"))


def test_the_openai_sdk_gets_a_tree_the_client_rebuilds(sdk_tree):
    body = sdk_tree
    assert [e["path"] for e in body["data"]] == PATHS  # depth first: a refined layer, then its children
    assert [e["parent"] for e in body["data"]] == [None, None, "1", "1.0", "1.0", "1"]
    assert [e["role"] for e in body["data"]] == ["background", "group", "group", "background", "layer", "layer"]
    assert [e["layer_index"] for e in body["data"]] == [0, 1, 0, 0, 1, 1]
    groups = {e["path"]: e for e in body["data"] if e["role"] == "group"}
    assert (groups["1"]["prompt"], groups["1.0"]["prompt"]) == ("a sofa", "a cushion")
    assert all("crop_box" not in e and "prompt" not in e for e in body["data"] if e["role"] != "group")
    tree = tree_from_response(body)
    assert [node.path for node in tree.walk()] == PATHS
    assert (tree.seed, tree.prompt, f"{tree.size[0]}x{tree.size[1]}") == (5, PROMPT, body["size"])
    for entry, node in zip(body["data"], tree.walk()):
        assert node.image.size == tree.size and node.image.mode == "RGBA"
        assert entry["bbox"] == (None if node.bbox is None else list(node.bbox))
        if node.children:
            assert list(node.crop_box) == entry["crop_box"] and node.prompt == entry["prompt"]
    assert body["num_layers"] == 2 and body["decompositions"][0]["seed"] == 5


def test_a_streamed_psd_package_names_the_nodes_and_reopens_as_the_tree(server, image_path, sdk_tree):
    """refine as one JSON field; progress events say which decomposition steps; the PSD's groups hold the same
    layers as the JSON response of the same request."""
    from psd_tools import PSDImage

    form = {**{k: str(v) for k, v in FIELDS.items()}, "prompt": PROMPT, "refine": json.dumps(REFINE),
            "package": "psd", "stream": "true"}
    events = []
    with httpx.stream("POST", f"{server.base_url}/v1/images/edits", data=form, timeout=300,
                      files={"image": ("in.png", image_path.read_bytes(), "image/png")}) as response:
        assert response.status_code == 200
        decoder = SSEDecoder()
        events = [item for line in response.iter_lines() if (item := decoder.feed(line)) is not None]
    steps = [(data["node"], data["level"]) for kind, data in events if kind == "progress" and data["stage"] == "step"]
    assert steps == [(None, 0), ("1", 1), ("1.0", 2)]
    assert all("node" in data for kind, data in events if kind == "progress")  # null for the root
    kind, result = events[-1]
    assert kind == "result"
    (entry,) = result["data"]
    assert entry["package"] == "psd" and entry["mime_type"] == "image/vnd.adobe.photoshop"
    document = PSDImage.open(io.BytesIO(base64.b64decode(entry["b64_json"])))
    tree = tree_from_response(sdk_tree)
    seen = []

    def walk(group, nodes):
        assert len(group) == len(nodes)
        for psd_layer, node in zip(group, nodes):
            seen.append(node.path)
            assert psd_layer.name == ("Layer 0 (bottom)" if node.index == 0 else "Layer 1 (top)")
            if node.children:
                assert psd_layer.kind == "group"
                walk(psd_layer, node.children)
            else:
                assert psd_layer.kind == "pixel"
                canvas = Image.new("RGBA", tree.size, (0, 0, 0, 0))  # psd-tools may trim a layer to its pixels
                canvas.paste(psd_layer.topil().convert("RGBA"), (psd_layer.left, psd_layer.top))
                assert np.array_equal(pixels(canvas), pixels(node.image)), node.path

    walk(document, tree.layers)
    assert seen == PATHS


def test_client_cli_refine_writes_the_tree_folders(server, image_path, tmp_path):
    command = [sys.executable, "-m", "vllm_layered.cli", "client", "decompose", str(image_path), "--base-url",
               server.base_url, "--out", str(tmp_path / "out"), "--layers", "2", "--steps", "1", "--seed", "5",
               "--prompt", PROMPT, "--refine", "1:2", "--refine", "1.0:1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    names = ["layer_00.png", "layer_01.png", "layer_01/layer_00.png", "layer_01/layer_00/layer_00.png",
             "layer_01/layer_00/composite.png", "layer_01/layer_01.png", "layer_01/composite.png", "composite.png"]
    assert result.stdout.split() == [str(tmp_path / "out" / name) for name in names]
    lines = result.stderr.splitlines()
    assert "step 1/1" in lines and "refine 1: step 1/1" in lines and "refine 1.0: step 1/1" in lines
    sizes = {Image.open(tmp_path / "out" / name).size for name in names}
    assert len(sizes) == 1
