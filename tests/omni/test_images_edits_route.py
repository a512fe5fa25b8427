"""Our /v1/images/edits route swap (vllm_layered/serving/omni/images_edits.py) on a stand-in for
vLLM-Omni's API server module: what it checks at install time, and that requests for other models
reach vLLM-Omni's endpoint as before. test_omni_plugin.py runs it in vLLM-Omni's real server."""

from __future__ import annotations

from types import ModuleType, SimpleNamespace

import pytest

pytest.importorskip("vllm_omni")

from fastapi import APIRouter, FastAPI, File, Form, Request, UploadFile  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from vllm_layered.serving.omni import images_edits  # noqa: E402

PATH = "/v1/images/edits"


def _omni_server(calls: list[dict]) -> ModuleType:
    """A module with a router whose POST /v1/images/edits has the form parameters of vLLM-Omni 0.30's
    (those our route reads, plus ``lora``, which it does not)."""
    module = ModuleType("stand_in_api_server")
    module.router = APIRouter()

    @module.router.post(PATH)
    async def edit_images(
        raw_request: Request,
        image: list[UploadFile] | None = File(None),
        image_array: list[UploadFile] | None = File(None, alias="image[]"),
        url: list[str] | None = Form(None),
        url_array: list[str] | None = Form(None, alias="url[]"),
        prompt: str = Form(...),
        model: str = Form(None),
        n: int = Form(1),
        response_format: str = Form("b64_json"),
        output_format: str | None = Form("png"),
        stream: bool = Form(False),
        negative_prompt: str | None = Form(None),
        num_inference_steps: int | None = Form(None),
        guidance_scale: float | None = Form(None),
        true_cfg_scale: float | None = Form(None),
        seed: int | None = Form(None),
        layers: int | None = Form(None),
        resolution: int | None = Form(None),
        lora: str | None = Form(None),
    ) -> dict:
        """vLLM-Omni's endpoint."""
        form = dict(locals())
        form.pop("raw_request")
        calls.append(form)
        return {"served_by": "vllm-omni"}

    @module.router.get("/health")
    async def health() -> dict:
        return {}

    return module


def _app(module: ModuleType, model_class_name: str | None) -> TestClient:
    app = FastAPI()
    app.include_router(module.router)
    od_config = SimpleNamespace(model_class_name=model_class_name)
    app.state.engine_client = SimpleNamespace(get_diffusion_od_config=lambda: od_config)
    return TestClient(app)


def test_install_swaps_the_route_once_and_adds_our_form_fields():
    module = _omni_server([])
    paths = [route.path for route in module.router.routes]
    images_edits.install(module)
    images_edits.install(module)  # vLLM-Omni may load plugins more than once
    assert [route.path for route in module.router.routes] == paths  # same routes, same order
    (route,) = [r for r in module.router.routes if r.path == PATH]
    assert route.endpoint.__doc__ == "vLLM-Omni's endpoint."
    schema = _app(module, None).get("/openapi.json").json()
    form_schema = schema["paths"][PATH]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    fields = schema["components"]["schemas"][form_schema["$ref"].rsplit("/", 1)[1]]
    assert {"cfg_normalize", "use_en_prompt", "layers", "lora"} <= set(fields["properties"])
    assert "prompt" not in fields.get("required", [])  # empty: the model captions the image


def test_other_models_get_vllm_omni_endpoint_unchanged():
    calls: list[dict] = []
    module = _omni_server(calls)
    images_edits.install(module)
    client = _app(module, "QwenImageEditPipeline")
    files = {"image": ("in.png", b"not read here", "image/png")}
    response = client.post(PATH, data={"prompt": "p", "seed": "3", "lora": "{}", "cfg_normalize": "true"}, files=files)
    assert response.json() == {"served_by": "vllm-omni"}
    (form,) = calls
    assert "cfg_normalize" not in form and "use_en_prompt" not in form  # exactly the original's parameters
    assert (form["prompt"], form["seed"], form["lora"], len(form["image"])) == ("p", 3, "{}", 1)
    response = client.post(PATH, data={"seed": "3"}, files=files)  # vLLM-Omni's form requires a prompt
    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", "prompt"]
    assert len(calls) == 1


def test_layered_requests_are_checked_as_on_our_server():
    """The Layered path, up to the engine: a bad field is refused with our server's message."""
    module = _omni_server([])
    images_edits.install(module)
    client = _app(module, "QwenImageLayeredPipeline")
    client.app.state.stage_configs = [{"stage_type": "diffusion"}]
    files = {"image": ("in.png", b"x", "image/png")}
    response = client.post(PATH, data={"prompt": "p", "output_format": "jpeg"}, files=files)
    assert response.status_code == 400
    assert "output_format must be png or webp" in response.text


@pytest.mark.parametrize("fields", [{"refine": '[{"layer": "1", "layers": 2}]'},
                                    {"refine[][layer]": "1", "refine[][layers]": "2"}, {"refine[]": "1:2"}])
def test_refine_is_refused_for_layered_requests(fields):
    """A tree of decompositions needs our server's engine; every form the clients send it in is refused."""
    module = _omni_server([])
    images_edits.install(module)
    client = _app(module, "QwenImageLayeredPipeline")
    client.app.state.stage_configs = [{"stage_type": "diffusion"}]
    response = client.post(PATH, data={"prompt": "p", **fields}, files={"image": ("in.png", b"x", "image/png")})
    assert response.status_code == 400
    assert "refine (decomposing layers again) is not supported" in response.text


@pytest.mark.parametrize(
    ("shape", "problem"),
    [
        ("no router", "router is not a FastAPI APIRouter"),
        ("no route", "has 0 POST /v1/images/edits routes, expected 1"),
        ("other form", "endpoint has no parameter(s) image_array, url, url_array"),
    ],
)
def test_install_refuses_a_vllm_omni_shaped_otherwise(shape, problem):
    """Another vLLM-Omni: a RuntimeError at register time naming what differs, not a server with other fields."""
    module = ModuleType("stand_in_api_server")
    if shape != "no router":
        module.router = APIRouter()
    if shape == "other form":
        module.router.post(PATH)(_older_edit_images)
    with pytest.raises(RuntimeError, match="vLLM-Omni 0.30") as info:
        images_edits.install(module)
    assert problem in str(info.value)


async def _older_edit_images(
    raw_request: Request,
    image: list[UploadFile] | None = File(None),
    prompt: str = Form(...),
    model: str = Form(None),
    n: int = Form(1),
    response_format: str = Form("b64_json"),
    output_format: str | None = Form("png"),
    stream: bool = Form(False),
    negative_prompt: str | None = Form(None),
    num_inference_steps: int | None = Form(None),
    guidance_scale: float | None = Form(None),
    true_cfg_scale: float | None = Form(None),
    seed: int | None = Form(None),
    layers: int | None = Form(None),
    resolution: int | None = Form(None),
) -> dict:
    return {}


def test_install_refuses_vllm_omni_helpers_that_changed(monkeypatch):
    async def _generate_with_async_omni(engine_client, sampling_params_list):  # another version's
        return None

    monkeypatch.setattr(images_edits, "_generate_with_async_omni", _generate_with_async_omni)
    with pytest.raises(RuntimeError, match=r"_generate_with_async_omni does not take .*vLLM-Omni 0.30"):
        images_edits.install(_omni_server([]))
