"""Our ``/v1/images/edits`` on vLLM-Omni's server: the response body of our own server.

vLLM-Omni 0.30 builds the ``/v1/images/edits`` body itself (its ImageData holds only ``b64_json``,
``url`` and ``revised_prompt``). :func:`install` runs from ``register()`` in vLLM-Omni's API server
process, before vLLM-Omni adds its module-level ``router`` to the app, and swaps the route there for
one whose form is vLLM-Omni's plus ``cfg_normalize`` and ``use_en_prompt`` (``prompt`` may be empty,
as on our server: the model captions the image):

- when the served model is Qwen-Image-Layered, the answer is our server's body, built by
  ``results.build_images_response``: one data entry per layer, bottom first, with ``layer_index``,
  ``role``, ``seed``..., ``n`` decompositions with seeds ``seed .. seed + n - 1``;
- for any other model it calls vLLM-Omni's own endpoint function with the form it parsed.

``refine`` (a tree of decompositions, layer_tree.py) is refused with a 400: vLLM-Omni runs each request's
decomposition as one engine call, with no way to start the refinements as their parent layers are
decoded; ``vllm-layered serve`` runs trees.

What it relies on is checked at install time: another vLLM-Omni version whose route or helpers
differ stops the server at startup with a RuntimeError saying what is missing (vLLM-Omni does not
catch errors of plugins), rather than serving other fields.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from types import ModuleType
from typing import Any

from fastapi import APIRouter, Form, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from PIL import Image
from pydantic import ValidationError
from vllm.utils import random_uuid
from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError
from vllm_omni.entrypoints.openai.app_state import _get_diffusion_od_config, _get_engine_and_model
from vllm_omni.entrypoints.openai.diffusion import _generate_with_async_omni, apply_stage_default_sampling_params
from vllm_omni.entrypoints.openai.images.helpers import _check_max_generated_image_size, _load_input_images
from vllm_omni.entrypoints.openai.utils import get_stage_type
from vllm_omni.entrypoints.serve.utils.errors import _create_engine_error_json_response
from vllm_omni.errors import OmniClientError
from vllm_omni.inputs.data import OmniDiffusionSamplingParams, OmniTextPrompt

from vllm_layered.model_executor.image_processing import bucket_size
from vllm_layered.model_executor.pipeline import PIPELINE_CLASS
from vllm_layered.serving.engine.request import RequestOutput
from vllm_layered.serving.intake import load_request_image
from vllm_layered.serving.limits import ServerLimits
from vllm_layered.serving.omni.pipeline import DEFAULT_NEGATIVE_PROMPT, METADATA_KEY, generation_params
from vllm_layered.serving.protocol import (
    APIError,
    ImageEditForm,
    decomposition_seeds,
    resolve_request_id,
    validation_error,
)
from vllm_layered.serving.results import build_images_response

logger = logging.getLogger(__name__)

PATH = "/v1/images/edits"
EXTRA_FIELDS = ("cfg_normalize", "use_en_prompt")
# the parameters of vLLM-Omni's endpoint this route reads for Qwen-Image-Layered
USED_FIELDS = (
    "raw_request", "image", "image_array", "url", "url_array", "prompt", "model", "n", "response_format",
    "output_format", "stream", "negative_prompt", "num_inference_steps", "guidance_scale", "true_cfg_scale",
    "seed", "layers", "resolution",
)
# the sampling params a Layered request sets besides EXTRA_FIELDS
SAMPLING_FIELDS = ("layers", "resolution", "num_inference_steps", "true_cfg_scale", "seed")
# our own server's defaults (`vllm-layered serve` without flags): n limit, pixel limit, PNG level
LIMITS = ServerLimits()
_OURS = "_vllm_layered_route"

Endpoint = Callable[..., Awaitable[Any]]


def install(server: ModuleType) -> None:
    """Swap vLLM-Omni's POST /v1/images/edits on ``server.router`` for ours (idempotent).

    ``server`` is ``vllm_omni.entrypoints.openai.api_server``; RuntimeError if it is not shaped as in
    vLLM-Omni 0.30."""
    router = getattr(server, "router", None)
    if not isinstance(router, APIRouter):
        raise _drift(f"{server.__name__}.router is not a FastAPI APIRouter")
    found = [
        (i, route) for i, route in enumerate(router.routes)
        if isinstance(route, APIRoute) and route.path == PATH and "POST" in route.methods
    ]
    if len(found) != 1:
        raise _drift(f"{server.__name__}.router has {len(found)} POST {PATH} routes, expected 1")
    index, route = found[0]
    if getattr(route.endpoint, _OURS, False):
        return
    signature = inspect.signature(route.endpoint, eval_str=True)  # our wrapper has other globals
    missing = [name for name in USED_FIELDS if name not in signature.parameters]
    if missing:
        raise _drift(f"vLLM-Omni's {PATH} endpoint has no parameter(s) {', '.join(missing)}")
    _check_helpers()
    endpoint = _endpoint(route.endpoint, signature)
    del router.routes[index]
    router.add_api_route(
        PATH, endpoint, methods=sorted(route.methods), responses=route.responses, name=route.name,
        description=route.description,
    )
    router.routes.insert(index, router.routes.pop())  # where vLLM-Omni's was


def _check_helpers() -> None:
    """vLLM-Omni's helpers take the arguments this route passes; its sampling params have our fields."""
    calls = {
        _get_engine_and_model: {"raw_request": None},
        _get_diffusion_od_config: {"raw_request": None, "engine_client": None},
        _load_input_images: {"inputs": [], "normalize_rgb": False},
        _check_max_generated_image_size: {"app_state_args": None, "width": 1, "height": 1},
        apply_stage_default_sampling_params: {"default_params_json": None, "sampling_params": None, "stage_key": ""},
        _generate_with_async_omni: {"engine_client": None, "gen_params": None, "stage_configs": [], "prompt": None,
                                    "request_id": ""},
    }
    for helper, arguments in calls.items():
        try:
            inspect.signature(helper).bind(**arguments)
        except TypeError as e:
            raise _drift(f"{helper.__module__}.{helper.__name__} does not take {sorted(arguments)}: {e}") from None
    sampling = OmniDiffusionSamplingParams()
    missing = [name for name in (*SAMPLING_FIELDS, *EXTRA_FIELDS) if not hasattr(sampling, name)]
    if missing:
        raise _drift(f"OmniDiffusionSamplingParams has no field(s) {', '.join(missing)}")


def _drift(problem: str) -> RuntimeError:
    return RuntimeError(
        f"vllm-layered cannot serve its {PATH} response on this vLLM-Omni: {problem}. vllm-layered's plugin "
        "is written against vLLM-Omni 0.30; install that version or a vllm-layered release made for yours."
    )


def _endpoint(original: Endpoint, signature: inspect.Signature) -> Endpoint:
    """vLLM-Omni's endpoint signature (FastAPI parses the form from it) plus our fields, with an
    optional ``prompt``; Layered requests go to our handler, the others to ``original``."""
    extra = [name for name in EXTRA_FIELDS if name not in signature.parameters]
    parameters = [p.replace(default=Form("")) if p.name == "prompt" else p for p in signature.parameters.values()]
    parameters += [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=Form(None), annotation=bool | None)
        for name in extra
    ]

    async def images_edits(**form: Any) -> Any:
        raw_request: Request = form["raw_request"]
        if _serves_layered(raw_request):
            return await _layered_edit(form)
        for name in extra:
            form.pop(name)
        if not form["prompt"]:  # what vLLM-Omni's own form says of a missing prompt
            raise RequestValidationError([{"type": "missing", "loc": ("body", "prompt"), "msg": "Field required",
                                           "input": None}])
        return await original(**form)

    images_edits.__signature__ = signature.replace(parameters=parameters)
    images_edits.__doc__ = original.__doc__
    setattr(images_edits, _OURS, True)
    return images_edits


def _serves_layered(raw_request: Request) -> bool:
    engine_client = getattr(raw_request.app.state, "engine_client", None)
    if engine_client is None:
        return False
    od_config = _get_diffusion_od_config(raw_request, engine_client)
    return getattr(od_config, "model_class_name", None) == PIPELINE_CLASS


async def _layered_edit(form: dict[str, Any]) -> Response:
    raw_request: Request = form["raw_request"]
    arrival = float(getattr(raw_request.state, "request_timestamp", time.time()))
    engine_client, model_name, stage_configs = _get_engine_and_model(raw_request)
    if form["model"] is not None and form["model"] != model_name:
        raise HTTPException(
            status_code=HTTPStatus.BAD_REQUEST.value,
            detail=f"Model mismatch: request specifies '{form['model']}' but server is running '{model_name}'.",
        )
    if form["stream"]:
        raise HTTPException(status_code=HTTPStatus.BAD_REQUEST.value,
                            detail="stream=true is not supported for Qwen-Image-Layered on this server")
    if any(name == "refine" or name.startswith("refine[") for name in (await raw_request.form()).keys()):
        raise HTTPException(status_code=HTTPStatus.BAD_REQUEST.value,
                            detail="refine (decomposing layers again) is not supported on vLLM-Omni's server; "
                                   "use `vllm-layered serve`")
    try:
        response_id = resolve_request_id(raw_request.headers)
        options = _options(form)
        image = await _input_image(form)
        seeds = decomposition_seeds(options.seed, options.n)  # as on our server: seed + i
        stage_key = str(next(i for i, cfg in enumerate(stage_configs) if get_stage_type(cfg) == "diffusion"))
        server_args = getattr(raw_request.app.state, "args", None)
        defaults = getattr(server_args, "default_sampling_params", None)
        samplings = [_sampling_params(form, options, defaults, stage_key, seed) for seed in seeds]
        params = generation_params(samplings[0])  # our checks and messages (layers, resolution, steps...)
        _check_max_generated_image_size(server_args, *bucket_size(image.width, image.height, params.resolution))
        engine_request_id = f"img_edit-{random_uuid()}"
        results = await _generate_all(
            [
                _generate_with_async_omni(
                    engine_client=engine_client,
                    gen_params=sampling,
                    stage_configs=stage_configs,
                    prompt=_prompt(options, image),
                    request_id=f"{engine_request_id}-{i}",
                )
                for i, sampling in enumerate(samplings)
            ]
        )
        outputs = [_request_output(result, finished_at, arrival) for result, finished_at in results]
        body = await asyncio.to_thread(
            build_images_response,
            request_id=response_id,
            model=model_name,
            outputs=outputs,
            seeds=seeds,
            output_format=options.output_format,
            package=None,
            experimental=False,
            png_compress_level=LIMITS.png_compress_level,
        )
        return JSONResponse(body, headers={"X-Request-Id": response_id})
    except (EngineGenerateError, EngineDeadError) as exc:
        return _create_engine_error_json_response(raw_request, exc)
    except HTTPException:
        raise
    except APIError as e:
        raise HTTPException(status_code=e.status_code, detail=e.message) from e
    except OmniClientError as e:
        raise HTTPException(status_code=e.status_code, detail=e.message) from e
    except ValueError as e:
        raise HTTPException(status_code=HTTPStatus.BAD_REQUEST.value, detail=str(e)) from e
    except Exception as e:
        logger.exception("Qwen-Image-Layered image edit failed")
        raise HTTPException(status_code=HTTPStatus.INTERNAL_SERVER_ERROR.value, detail=f"Image edit failed: {e}") from e


def _options(form: dict[str, Any]) -> ImageEditForm:
    """The fields our server and vLLM-Omni's form share, checked by our server's own form model."""
    fields = {
        "prompt": form["prompt"],
        "n": form["n"],
        "response_format": form["response_format"],
        "output_format": (form["output_format"] or "png").lower(),
        "seed": form["seed"],
        "true_cfg_scale": form["true_cfg_scale"],
        "guidance_scale": form["guidance_scale"],
        "negative_prompt": form["negative_prompt"],
    }
    try:
        options = ImageEditForm.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as e:
        raise validation_error(e) from None
    LIMITS.check_n(options.n)
    return options


async def _input_image(form: dict[str, Any]) -> Image.Image:
    inputs = [*(form["image"] or form["image_array"] or []), *(form["url"] or form["url_array"] or [])]
    if len(inputs) != 1:
        raise APIError(400, f"Qwen-Image-Layered decomposes exactly one image, got {len(inputs)}", param="image")
    (image,) = await _load_input_images(inputs, normalize_rgb=False)
    return load_request_image(image, LIMITS.max_pixels)


def _sampling_params(
    form: dict[str, Any], options: ImageEditForm, defaults: str | None, stage_key: str, seed: int
) -> OmniDiffusionSamplingParams:
    """vLLM-Omni's sampling params: its defaults, the server's --default-sampling-params, then the
    fields the request gave."""
    sampling = OmniDiffusionSamplingParams()
    apply_stage_default_sampling_params(defaults, sampling, stage_key)
    given = {
        "layers": form["layers"],
        "resolution": form["resolution"],
        "num_inference_steps": form["num_inference_steps"],
        "true_cfg_scale": options.cfg_scale,
        **{name: form[name] for name in EXTRA_FIELDS},
    }  # with seed: SAMPLING_FIELDS + EXTRA_FIELDS
    for name, value in given.items():
        if value is not None:
            setattr(sampling, name, value)
    sampling.seed = seed
    return sampling


def _prompt(options: ImageEditForm, image: Image.Image) -> OmniTextPrompt:
    prompt = OmniTextPrompt(prompt=options.prompt.strip(), modalities=["image"])
    prompt["negative_prompt"] = options.negative_prompt or DEFAULT_NEGATIVE_PROMPT
    prompt["multi_modal_data"] = {"image": [image]}
    return prompt


async def _generate_all(calls: list[Awaitable[Any]]) -> list[tuple[Any, float]]:
    """Run the decompositions together (the engine batches them): each result with the wall-clock time
    it came back; if one fails, cancel the rest."""

    async def timed(call: Awaitable[Any]) -> tuple[Any, float]:
        result = await call
        return result, time.time()

    tasks = [asyncio.ensure_future(timed(call)) for call in calls]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()


def _request_output(result: Any, finished_at: float, arrival: float) -> RequestOutput:
    """One decomposition from vLLM-Omni's output: the layers, and what our pipeline reported in the
    output metadata (prompt used, timings); queue and total time are measured from ``arrival``."""
    images = getattr(result, "images", None)
    if not (isinstance(images, list) and len(images) == 1 and isinstance(images[0], list)):
        raise RuntimeError(f"expected one list of layers from vllm-layered's pipeline, got {images!r}")
    multimodal = getattr(result, "multimodal_output", None) or {}
    report = (multimodal.get("metadata") or {}).get(METADATA_KEY) if isinstance(multimodal, dict) else None
    if report is None:
        raise RuntimeError(f"vllm-layered's pipeline metadata did not reach the server (got {multimodal!r})")
    queue_s = max(0.0, report["started_at"] - arrival)  # started_at: wall-clock time in the engine process
    timings = {"queue_s": queue_s, **report["timings"], "total_s": finished_at - arrival}
    return RequestOutput(request_id=result.request_id, layers=images[0], prompt=report["prompt"], timings=timings)
