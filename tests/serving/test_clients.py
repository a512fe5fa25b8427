"""The thin clients (vllm_layered.clients) and `vllm-layered client decompose` against a real server."""

from __future__ import annotations

import asyncio
import base64
import io
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image

from tests.serving.helpers import free_port, png_bytes, start_server
from vllm_layered.clients import AsyncLayeredClient, LayeredAPIError, LayeredClient, LayeredConnectionError, Layers
from vllm_layered.clients.cli import queue_position_text
from vllm_layered.layer_tree import RefinementError

DOCS = Path(__file__).resolve().parents[2] / "docs" / "serving.md"

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


def test_the_client_saves_the_files_the_server_packages(server, image_path, tmp_path):
    """Layers.save_zip / save_psd / save_pptx of a response's layers are the server's package=zip|psd|pptx of the
    same request: the same bytes (a PPTX's zip entries carry the time it was written: the same slide)."""
    from pptx import Presentation

    with LayeredClient(server.base_url) as client:
        layers = client.decompose(image_path, layers=2, seed=4, **CHEAP)
    fields = {"prompt": CHEAP["prompt"], "layers": "2", "seed": "4", "num_inference_steps": "1", "true_cfg_scale": "1"}

    def package(fmt: str) -> bytes:
        response = httpx.post(f"{server.base_url}/v1/images/edits", data={**fields, "package": fmt},
                              files={"image": ("in.png", image_path.read_bytes(), "image/png")}, timeout=120)
        assert response.status_code == 200, response.text
        (entry,) = response.json()["data"]
        return base64.b64decode(entry["b64_json"])

    assert layers.save_zip(tmp_path / "l.zip").read_bytes() == package("zip")
    assert layers.save_psd(tmp_path / "l.psd").read_bytes() == package("psd")
    slides = [Presentation(io.BytesIO(data)) for data in (layers.save_pptx(tmp_path / "l.pptx").read_bytes(),
                                                          package("pptx"))]
    ours, servers = [(p.slide_width, p.slide_height, [(s.name, s.image.blob) for s in p.slides[0].shapes])
                     for p in slides]
    assert ours == servers and len(ours[2]) == 2


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


def test_refine_gives_the_tree_and_is_checked_before_sending(server):
    """Through the openai SDK (no progress): refine travels as one JSON field; Layers.tree holds the refinement."""

    async def run():
        async with AsyncLayeredClient(server.base_url) as client:
            return await client.decompose(png_bytes(), layers=1, seed=2, refine=["0:1"], **CHEAP)

    layers = asyncio.run(run())
    assert len(layers) == 1 and [node.path for node in layers.tree.walk()] == ["0", "0.0"]
    assert layers[0] is layers.tree.layers[0].image and layers.tree.node("0").crop_box is not None
    assert layers.tree.node("0.0").image.size == layers[0].size
    with LayeredClient(f"http://127.0.0.1:{free_port()}") as client, pytest.raises(RefinementError, match="PATH:N"):
        client.decompose(png_bytes(), refine=["1"])  # nothing listens there: refused before any request


def test_an_unknown_keyword_is_refused_before_sending():
    """decompose's keywords are DecomposeOptions: a misspelt one is a TypeError naming it, in both clients."""
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with LayeredClient(url) as client, pytest.raises(TypeError, match="unexpected keyword argument.*: step$"):
        client.decompose(png_bytes(), step=2, seed=1)

    async def run():
        async with AsyncLayeredClient(url) as client:
            await client.decompose(png_bytes(), layer=2)

    with pytest.raises(TypeError, match=": layer$"):
        asyncio.run(run())


def test_errors_raise_with_the_server_message(server, image_path):
    with LayeredClient(server.base_url) as client:
        for on_progress in (None, print):
            with pytest.raises(LayeredAPIError) as error:
                client.decompose(image_path, layers=0, on_progress=on_progress)
            assert error.value.status_code == 400 and error.value.param == "layers"
        assert not client.cancel("no-such-request")


def client_cli(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "vllm_layered.cli", "client", "decompose", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_cli_client_decompose_writes_a_psd(server, image_path, tmp_path):
    from psd_tools import PSDImage

    result = client_cli(str(image_path), "--base-url", server.base_url, "--out", str(tmp_path), "--layers", "2",
                        "--steps", "1", "--format", "psd", "--prompt", "a ball")
    assert result.returncode == 0, result.stderr
    assert "queued: 1st in line" in result.stderr.splitlines() and "step 1/1" in result.stderr
    assert "size: the input is 64x48; layers come at the server's resolution bucket, 736x544" in result.stderr
    path = tmp_path / f"{image_path.stem}.psd"  # a folder: the package takes the image's name
    assert result.stdout.strip() == str(path)
    assert len(list(PSDImage.open(path))) == 2


def test_cli_client_keep_size_and_package_from_the_name(server, image_path, tmp_path):
    result = client_cli(str(image_path), "--base-url", server.base_url, "--out", str(tmp_path / "l.zip"),
                        "--layers", "1", "--steps", "1", "--prompt", "a ball", "--keep-size", "--quiet")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(tmp_path / "l.zip") and result.stderr == ""
    with zipfile.ZipFile(tmp_path / "l.zip") as archive:
        assert archive.namelist() == ["layer_00.png", "composite.png"]
        assert Image.open(io.BytesIO(archive.read("layer_00.png"))).size == (64, 48)


def test_cli_client_checks_the_output_before_sending(image_path, tmp_path):
    """No server listens there: the output's error comes first, so it is checked before any request."""
    result = client_cli(str(image_path), "--base-url", f"http://127.0.0.1:{free_port()}", "--format", "psd",
                        "--out", str(tmp_path / "stack.zip"))
    assert result.returncode == 2, result.stderr
    assert result.stderr == f"error: --out {tmp_path / 'stack.zip'} must be a .psd file or a folder for --format " \
                            "psd (it names a .zip file)\n"


@pytest.mark.parametrize("quiet", [True, False])  # quiet: through the openai SDK; else httpx with progress
def test_cli_client_names_the_url_it_cannot_reach(image_path, tmp_path, quiet):
    url = f"http://127.0.0.1:{free_port()}"
    result = client_cli(str(image_path), "--base-url", url, "--out", str(tmp_path), *(["--quiet"] if quiet else []))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert re.fullmatch(rf"error: cannot connect to {re.escape(url)}: .*[Cc]onnection refused.* \(is "
                        r"`vllm-layered serve` running there\?\)\n", result.stderr), result.stderr


def test_connection_errors_name_the_url_in_the_library():
    url = f"http://127.0.0.1:{free_port()}"
    with LayeredClient(url) as client:
        for on_progress in (None, print):
            with pytest.raises(LayeredConnectionError, match=f"cannot connect to {re.escape(url)}"):
                client.decompose(png_bytes(), on_progress=on_progress)
        with pytest.raises(LayeredConnectionError):
            client.models()

    async def run():
        async with AsyncLayeredClient(url) as client:
            with pytest.raises(LayeredConnectionError, match=re.escape(url)):
                await client.decompose(png_bytes())

    asyncio.run(run())


def test_queue_position_text():
    assert [queue_position_text(p) for p in (0, 1, 2, 3, 9, 10, 11, 12, 20, 21, 100, 110)] == [
        "1st in line", "2nd in line", "3rd in line", "4th in line", "10th in line", "11th in line", "12th in line",
        "13th in line", "21st in line", "22nd in line", "101st in line", "111th in line",
    ]


def _docs_example(heading: str) -> str:
    """The first python block after ``heading`` in docs/serving.md."""
    text = DOCS.read_text()
    return text[text.index(heading):].split("```python\n", 1)[1].split("```", 1)[0]


def test_the_docs_openai_sdk_streaming_example_runs(server, image_path, tmp_path, capsys):
    code = _docs_example("#### Streaming through the openai SDK")
    for old, new in {'"http://127.0.0.1:8000/v1"': repr(f"{server.base_url}/v1"), '"photo.png"': repr(str(image_path)),
                     '"layers/"': repr(str(tmp_path / "out")), '"num_inference_steps": 50': '"num_inference_steps": 2',
                     '"layers": 4': '"layers": 2'}.items():
        assert old in code, old
        code = code.replace(old, new)
    namespace: dict = {}
    exec(compile(code, str(DOCS), "exec"), namespace)  # the docs' example as written, on the tiny model
    layers = namespace["layers"]
    assert isinstance(layers, Layers) and len(layers) == 2 and layers.prompt  # the server captioned it
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["composite.png", "layer_00.png", "layer_01.png"]
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "queued None None 0" and "step 2 2 None" in printed and printed[-1] == "decoding None 2 None"


def test_an_error_event_raises_through_the_openai_sdk(server):
    """As the docs say: a request cancelled mid-stream ends in an error event, which the SDK raises."""
    sdk = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="none", max_retries=0)
    stream = sdk.images.edit(image=("in.png", png_bytes(), "image/png"), prompt="a ball", stream=True,
                             extra_body={"layers": 1, "num_inference_steps": 200, "true_cfg_scale": 1.0},
                             extra_headers={"X-Request-Id": "sdk-cancel"})
    cancelled = False
    with pytest.raises(openai.APIError, match="cancel"), LayeredClient(server.base_url) as client:
        for event in stream:  # step events already on their way may still arrive after the cancel
            if event.to_dict().get("stage") == "step" and not cancelled:
                cancelled = client.cancel("sdk-cancel")
                assert cancelled
    assert cancelled


def test_the_clients_and_the_formats_write_every_file_without_torch(tmp_path):
    """The clients, their CLI and vllm_layered.formats load, and write a stack and a tree in every format, with
    torch impossible to import."""
    code = (
        "import sys\n"
        "sys.modules['torch'] = None  # importing torch now fails\n"
        "from PIL import Image\n"
        "import vllm_layered.clients.cli\n"
        "from vllm_layered.clients import Layers\n"
        "from vllm_layered.formats import SAVE_FORMATS, save_tree\n"
        "from vllm_layered.layer_tree import LayerTree\n"
        "images = [Image.new('RGBA', (8, 8), (1, 2, 3, 255)), Image.new('RGBA', (8, 8))]\n"
        "tree = LayerTree.from_layers(images, 'p', 0)\n"
        "tree.attach('0', [Image.new('RGBA', (4, 4), (9, 9, 9, 255))], (2, 2, 6, 6), 'q')\n"
        f"out = {str(tmp_path)!r}\n"
        "for fmt in SAVE_FORMATS:\n"
        "    assert save_tree(tree, f'{out}/tree.{fmt}', fmt)\n"
        "layers = Layers(images)\n"
        "assert layers.save_pngs(out + '/stack') and layers.save_zip(out + '/stack.zip')\n"
        "assert layers.save_psd(out + '/stack.psd') and layers.save_pptx(out + '/stack.pptx')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_clients_import_nothing_heavy():
    code = (
        "import sys, vllm_layered.clients\n"
        "bad = [m for m in sys.modules if m.split('.')[0] == 'torch'"
        " or (m.startswith('vllm_layered.') and not m.startswith('vllm_layered.clients'))]\n"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
