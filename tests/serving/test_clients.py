"""The thin clients (vllm_layered.clients) and `vllm-layered client decompose` against a real server."""

from __future__ import annotations

import asyncio
import io
import subprocess
import sys
import zipfile

import pytest
from PIL import Image

from tests.serving.helpers import png_bytes, start_server
from vllm_layered.clients import AsyncLayeredClient, LayeredAPIError, LayeredClient, Layers

CHEAP = {"steps": 1, "true_cfg_scale": 1.0, "prompt": "a red ball"}


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    with start_server(tiny_checkpoint, tmp_path_factory.mktemp("logs")) as server:
        yield server


def test_decompose_and_save_every_format(server, image_path, tmp_path):
    from pptx import Presentation
    from psd_tools import PSDImage

    with LayeredClient(server.base_url) as client:
        layers = client.decompose(image_path, layers=2, seed=4, **CHEAP)
    assert isinstance(layers, Layers) and len(layers) == 2 and layers.seed == 4
    assert all(image.mode == "RGBA" and image.size == layers[0].size for image in layers)
    expected = Image.alpha_composite(layers[0], layers[1])
    assert layers.composite().tobytes() == expected.tobytes()

    written = layers.save_pngs(tmp_path / "pngs")
    assert [p.name for p in written] == ["layer_00.png", "layer_01.png", "composite.png"]
    assert Image.open(written[1]).mode == "RGBA"
    assert zipfile.ZipFile(layers.save_zip(tmp_path / "l.zip")).namelist() == [p.name for p in written]
    psd = PSDImage.open(layers.save_psd(tmp_path / "l.psd"))
    assert [layer.name for layer in psd] == ["Layer 0 (bottom)", "Layer 1 (top)"]
    slide = Presentation(layers.save_pptx(tmp_path / "l.pptx")).slides[0]
    assert len(slide.shapes) == 2


def test_progress_callback_streams_before_the_layers(server):
    seen = []
    with LayeredClient(f"{server.base_url}/v1") as client:  # with or without /v1
        layers = client.decompose(Image.open(io.BytesIO(png_bytes())), layers=1,
                                  on_progress=seen.append, **{**CHEAP, "steps": 2})
    assert len(layers) == 1
    stages = [p.stage for p in seen]
    assert stages[0] == "queued" and stages[-1] == "decoding"
    assert [(p.step, p.num_steps) for p in seen if p.stage == "step"] == [(1, 2), (2, 2)]


def test_async_client(server):
    async def run():
        seen = []

        async def on_progress(progress):
            seen.append(progress.stage)

        async with AsyncLayeredClient(server.base_url) as client:
            assert await client.models() == [server.model]
            plain = await client.decompose(png_bytes(), layers=1, seed=1, **CHEAP)
            streamed = await client.decompose(png_bytes(), layers=1, seed=1, on_progress=on_progress, **CHEAP)
            assert not await client.cancel("no-such-request")
        return plain, streamed, seen

    plain, streamed, seen = asyncio.run(run())
    assert len(plain) == len(streamed) == 1 and "step" in seen
    assert plain[0].tobytes() == streamed[0].tobytes()  # same seed, same layers


def test_errors_raise_with_the_server_message(server, image_path):
    with LayeredClient(server.base_url) as client:
        for on_progress in (None, print):
            with pytest.raises(LayeredAPIError) as error:
                client.decompose(image_path, layers=0, on_progress=on_progress)
            assert error.value.status_code == 400 and error.value.param == "layers"
        assert not client.cancel("no-such-request")


def test_cli_client_decompose_writes_a_psd(server, image_path, tmp_path):
    from psd_tools import PSDImage

    command = [sys.executable, "-m", "vllm_layered.cli", "client", "decompose", str(image_path),
               "--base-url", server.base_url, "--out", str(tmp_path), "--layers", "2", "--steps", "1",
               "--format", "psd", "--prompt", "a ball"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "step 1/1" in result.stderr
    path = tmp_path / f"{image_path.stem}.psd"
    assert result.stdout.strip() == str(path)
    assert len(list(PSDImage.open(path))) == 2


def test_clients_import_nothing_heavy():
    code = (
        "import sys, vllm_layered.clients\n"
        "bad = [m for m in sys.modules if m.split('.')[0] == 'torch'"
        " or (m.startswith('vllm_layered.') and not m.startswith('vllm_layered.clients'))]\n"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
