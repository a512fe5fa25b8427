"""Wire formats of the HTTP API: request fields, response bodies and the OpenAI-style error body.

Requests are validated here as far as their own fields go (types, ranges, choices, finite numbers,
text the tokenizer can take); model-level checks (layers, resolution, steps) stay in GenerationParams,
which the server builds from these. Multipart and JSON bodies share one field set (``LayeredOptions``).
A form field sent empty counts as absent: the openai SDK sends ``None`` as an empty string.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from vllm_layered.formats import IMAGE_FORMATS, PACKAGE_FORMATS, ImageFormat, PackageFormat
from vllm_layered.layer_tree import LayerNode, Refinement, parse_refinements
from vllm_layered.model_executor.text import check_text

LAYER_ORDER = "bottom_to_top"
MAX_SEED = 2**63 - 1
# The official app guides with 4; the bound keeps neg + s * (cond - neg) far from float overflow (NaN layers).
MAX_CFG_SCALE = 100.0
# The text encoder reads at most 1024 tokens of a prompt (512 by default), a few thousand characters:
# longer text cannot change the layers, it only costs tokenizer time and memory.
MAX_PROMPT_CHARS = 16384
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_SIZE = re.compile(r"^\s*(\d{1,5})\s*[xX]\s*(\d{1,5})\s*$")
_INT_FIELDS = ("n", "layers", "resolution", "num_inference_steps", "seed")

# Every error ``code`` the server sends, with its HTTP status. docs/serving.md lists the same table
# (tests/serving/test_error_codes.py compares them, and this table with the codes in the source).
ERROR_CODES: dict[str, int] = {
    "invalid_value": 400,
    "bad_body": 400,
    "bad_multipart": 400,
    "bad_request_id": 400,
    "missing_image": 400,
    "too_many_images": 400,
    "empty_image": 400,
    "not_an_image": 400,
    "corrupt_image": 400,
    "unsupported_mode": 400,
    "bad_aspect_ratio": 400,
    "unsupported_package": 400,
    "work_limit_exceeded": 400,
    "empty_layer": 400,
    "invalid_api_key": 401,
    "model_not_found": 404,
    "request_not_found": 404,
    "http_404": 404,
    "http_405": 405,
    "body_timeout": 408,
    "duplicate_request_id": 409,
    "request_cancelled": 409,
    "upload_too_large": 413,
    "too_many_pixels": 413,
    "rate_limited": 429,
    "concurrency_limited": 429,
    "engine_error": 500,
    "engine_overloaded": 503,
    "server_cancelled": 503,
    "engine_unhealthy": 503,
    "tenant_store_unavailable": 503,
    "deadline_exceeded": 504,
}

# The error ``type`` of each status; ``code`` says what exactly went wrong.
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    408: "timeout_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    499: "client_closed_request",
    500: "server_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class APIError(Exception):
    """An HTTP error with the OpenAI error body; ``headers`` go out with it (Retry-After, WWW-Authenticate)."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        error_type = _ERROR_TYPES.get(self.status_code, "invalid_request_error")
        detail = ErrorDetail(message=self.message, type=error_type, param=self.param, code=self.code)
        return ErrorResponse(error=detail).model_dump()


def validation_error(exc: ValidationError) -> APIError:
    """The first problem of a pydantic ValidationError as a 400 naming the field."""
    first = exc.errors(include_url=False)[0]
    param = ".".join(str(part) for part in first["loc"]) or None
    cause = first.get("ctx", {}).get("error")
    message = str(cause) if isinstance(cause, ValueError) else f"{param}: {first['msg']}"
    return APIError(400, message, code="invalid_value", param=param)


# What ``refine`` looks like on the wire (the field itself holds parsed layer_tree.Refinement objects).
_REFINE_SCHEMA = {
    "type": "array",
    "items": {
        "type": "object",
        "properties": {
            "layer": {"type": "string", "description": "path of the layer: '1', or '1.0' for a child of layer 1"},
            "layers": {"type": "integer", "description": "layers to decompose it into (1-20)"},
            "prompt": {"type": "string", "description": "caption of the layer (default: captioned)"},
        },
        "required": ["layer", "layers"],
    },
}


class LayeredOptions(BaseModel):
    """Fields shared by /v1/images/edits (multipart) and /v1/images/generations (JSON).

    OpenAI's fields (model, n, size, response_format, user), vLLM-Omni's fields for this model
    (layers, resolution, num_inference_steps, true_cfg_scale or its alias guidance_scale,
    negative_prompt, seed, cfg_normalize, use_en_prompt) and ours (output_format, package, stream).
    Unknown fields are ignored, as OpenAI-compatible servers do. ``refine`` arrives parsed (a list, a JSON
    array string or "PATH:N"); the server checks it against the root's layer count.
    """

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str | None = Field(None, description="Served model name (GET /v1/models); default: the one served.")
    n: int = Field(1, ge=1, description="Number of decompositions; decomposition i uses seed + i.")
    size: str | None = Field(
        None,
        description="'auto' or WIDTHxHEIGHT. Picks the resolution bucket nearest to sqrt(W*H) unless "
        "'resolution' is given; for generations it is also the canvas aspect ratio. Edits keep the "
        "input image's aspect ratio.",
    )
    response_format: Literal["b64_json"] = Field("b64_json", description="Only b64_json: images come inline.")
    user: str | None = Field(None, description="End-user id (accepted for compatibility, not used).")
    layers: int = Field(4, description="RGBA layers per decomposition (1-20).")
    resolution: int | None = Field(None, description="Resolution bucket: 640 or 1024 (default 640).")
    num_inference_steps: int = Field(50, description="Denoising steps.")
    true_cfg_scale: float | None = Field(
        None, ge=0, le=MAX_CFG_SCALE, description="Classifier-free guidance scale; <= 1 turns CFG off."
    )
    guidance_scale: float | None = Field(
        None, ge=0, le=MAX_CFG_SCALE, description="Alias of true_cfg_scale (vLLM-Omni's name)."
    )
    negative_prompt: str | None = Field(
        None, max_length=MAX_PROMPT_CHARS, description="Negative prompt (default ' ', which enables CFG)."
    )
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Seed of the first decomposition (default: random).")
    cfg_normalize: bool = True
    use_en_prompt: bool = Field(True, description="Auto-caption in English (false: Chinese) when prompt is empty.")
    output_format: ImageFormat = Field("png", description="Encoding of each layer (lossless).")
    package: PackageFormat | None = Field(
        None,
        description="Return each decomposition as ONE file (zip of PNGs, layered PSD or one-slide PPTX) "
        "in a single data entry instead of one entry per layer.",
    )
    stream: bool = Field(False, description="Server-sent events: progress, then a 'result' event.")
    refine: Annotated[tuple[Refinement, ...], WithJsonSchema(_REFINE_SCHEMA)] = Field(
        (),
        description="Decompose layers again, as a tree: a list of {layer: PATH, layers: N[, prompt]} (multipart: "
        "a JSON array string, or the fields the openai SDK sends for extra_body={'refine': [...]}). Layer paths "
        "are bottom first from 0; '1.0' is the bottom layer of layer 1's refinement.",
    )

    @model_validator(mode="before")
    @classmethod
    def _empty_is_absent(cls, values: Any) -> Any:
        if isinstance(values, dict):
            return {k: v for k, v in values.items() if v != ""}
        return values

    @field_validator(*_INT_FIELDS, mode="before")
    @classmethod
    def _not_a_bool(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, bool):  # JSON true would pass as 1
            raise ValueError(f"{info.field_name} must be an integer, got {str(value).lower()}")
        return value

    @field_validator("prompt", "negative_prompt", mode="before", check_fields=False)
    @classmethod
    def _tokenizable(cls, value: Any, info: ValidationInfo) -> Any:
        return check_text(value, info.field_name) if isinstance(value, str) else value

    @field_validator("refine", mode="before")
    @classmethod
    def _refinements(cls, value: Any) -> tuple[Refinement, ...]:
        return tuple(parse_refinements(value))  # a RefinementError (ValueError) names the refinement at fault

    @field_validator("response_format", mode="before")
    @classmethod
    def _only_b64(cls, value: Any) -> Any:
        if value == "url":
            raise ValueError(
                "response_format 'url' is not supported: this server does not host images; "
                "use response_format=b64_json (the default) to get the layers inline"
            )
        if value != "b64_json":
            raise ValueError(f"response_format must be 'b64_json', got {value!r}")
        return value

    @field_validator("output_format", mode="before")
    @classmethod
    def _known_output_format(cls, value: Any) -> Any:
        if value in PACKAGE_FORMATS:
            raise ValueError(f"output_format {value!r} is a package: send package={value} instead")
        if value not in IMAGE_FORMATS:
            raise ValueError(f"output_format must be png or webp (layers need an alpha channel), got {value!r}")
        return value

    @field_validator("size")
    @classmethod
    def _size_shape(cls, value: str | None) -> str | None:
        if value is None or value == "auto":
            return value
        match = _SIZE.match(value)
        if not match:
            raise ValueError(f"size must be 'auto' or WIDTHxHEIGHT (e.g. 1024x1024), got {value!r}")
        if int(match[1]) < 1 or int(match[2]) < 1:
            raise ValueError(f"size must have a positive width and height, got {value!r}")
        return value

    @field_validator("guidance_scale")
    @classmethod
    def _one_cfg_scale(cls, value: float | None, info: ValidationInfo) -> float | None:
        other = info.data.get("true_cfg_scale")
        if value is not None and other is not None and value != other:
            raise ValueError("true_cfg_scale and guidance_scale are aliases; give one (or the same value)")
        return value

    @property
    def cfg_scale(self) -> float | None:
        return self.true_cfg_scale if self.true_cfg_scale is not None else self.guidance_scale

    def size_pixels(self) -> tuple[int, int] | None:
        """(width, height) of ``size``, or None for 'auto' / not given."""
        match = _SIZE.match(self.size or "")
        return (int(match[1]), int(match[2])) if match else None


class ImageEditForm(LayeredOptions):
    """POST /v1/images/edits, multipart/form-data. The file goes in ``image`` (or ``image[]``)."""

    prompt: str = Field(
        "", max_length=MAX_PROMPT_CHARS, description="Caption of the image; empty: the server captions it."
    )


class ImageGenerationRequest(LayeredOptions):
    """POST /v1/images/generations, JSON. EXPERIMENTAL: text -> layers over a transparent canvas."""

    prompt: str = Field(..., max_length=MAX_PROMPT_CHARS, description="What to generate (required).")

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt must not be empty for generations (there is no image to caption)")
        return value


class ImageData(BaseModel):
    """One entry of ``data``: a layer (layer_index, path, role...) or, with ``package``, a whole decomposition.

    The layers of a decomposition come depth first: bottom first, each refined layer followed by its children,
    so ``path`` and ``parent`` rebuild the tree."""

    b64_json: str
    revised_prompt: str | None = Field(None, description="The prompt used (the caption when none was given).")
    decomposition_index: int
    seed: int
    num_layers: int
    mime_type: str
    layer_index: int | None = Field(None, description="0 = bottom (background); layers are bottom to top.")
    role: Literal["background", "layer", "group"] | None = Field(
        None, description="'group': a refined layer (its children follow it); else 'background' for index 0."
    )
    path: str | None = Field(None, description="The layer's path: '1', '1.0' (the bottom child of layer 1) ...")
    parent: str | None = Field(None, description="Path of the refined layer this one is a child of; null at the root.")
    bbox: list[int] | None = Field(
        None, description="[left, top, right, bottom] of its visible pixels in the canvas; null when empty."
    )
    crop_box: list[int] | None = Field(
        None, description="A group's input region in the canvas, where its children were decomposed from."
    )
    prompt: str | None = Field(None, description="The prompt a group's children were decomposed with.")
    package: PackageFormat | None = None

    @classmethod
    def node_fields(cls, node: LayerNode) -> dict[str, Any]:
        """The fields that place a layer in its tree (results.py sends parent and bbox as null, not absent)."""
        role = "group" if node.children else "background" if node.index == 0 else "layer"
        fields = dict(layer_index=node.index, role=role, path=node.path, parent=node.parent,
                      bbox=list(node.bbox) if node.bbox is not None else None)
        if node.children:
            fields.update(crop_box=list(node.crop_box), prompt=node.prompt)
        return fields


class DecompositionInfo(BaseModel):
    index: int
    seed: int
    prompt: str
    timings: dict[str, float]


class ImagesResponse(BaseModel):
    """OpenAI's ImagesResponse (created, data, size, output_format) plus the layer bookkeeping."""

    id: str
    created: int
    model: str
    data: list[ImageData]
    layer_order: Literal["bottom_to_top"] = LAYER_ORDER
    num_layers: int
    size: str = Field(description="WIDTHxHEIGHT of every layer.")
    output_format: str
    package: str | None = None
    decompositions: list[DecompositionInfo]
    experimental: bool = Field(False, description="True for /v1/images/generations.")


class ProgressData(BaseModel):
    """The data of an SSE ``progress`` event (stage: queued, started, step, decoding). ``node``: the layer
    whose refinement steps or decodes (null: the root decomposition, or the request as a whole); ``level``:
    0 for the root, 1 for a refinement of a root layer, ..."""

    type: Literal["progress"] = "progress"
    id: str
    decomposition_index: int
    stage: str
    step: int | None = None
    num_steps: int | None = None
    queue_position: int | None = None
    node: str | None = None
    level: int = 0


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "vllm-layered"
    max_layers: int
    resolutions: list[int]


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class CancelResponse(BaseModel):
    id: str
    object: Literal["request.cancellation"] = "request.cancellation"
    cancelled: bool


def decomposition_seeds(seed: int | None, n: int) -> list[int]:
    """Seeds of a request's ``n`` decompositions: seed, seed + 1, ... (a random first seed when none is given)."""
    base = seed if seed is not None else secrets.randbelow(2**31)
    if base + n - 1 > MAX_SEED:
        raise APIError(400, f"seed + n - 1 must be at most {MAX_SEED}", code="invalid_value", param="seed")
    return [base + i for i in range(n)]


def resolve_request_id(headers: Mapping[str, str]) -> str:
    """The request's id: the ``X-Request-Id`` header the client sent (APIError 400 ``bad_request_id`` unless it is
    1-128 characters of A-Z a-z 0-9 . _ : -), else a new ``layers-<24 hex digits>``. ``headers`` is a request's
    (case-insensitive) headers. Our server and the vLLM-Omni route both name their requests this way."""
    given = headers.get("x-request-id")
    if given is None:
        return f"layers-{secrets.token_hex(12)}"
    if not _REQUEST_ID.match(given):
        raise APIError(400, "X-Request-Id must be 1-128 characters of A-Z a-z 0-9 . _ : -", code="bad_request_id")
    return given
