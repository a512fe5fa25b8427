"""An admitted image request's body, read and checked, as what the engine runs: ``ImagesRequest``.

Edits send a multipart form with one image (uploads.py reads it within the size and time limits); the upload is
decoded, turned upright, converted to RGBA and resized to its resolution bucket once, and only that BucketImage
is kept. Generations (EXPERIMENTAL) send JSON; their condition image is a fully transparent canvas of the asked
aspect ratio. Either way the fields are validated by the protocol's models, the model's ranges by
GenerationParams, the refinements against the tree they describe, and the request's work (limits.py:
request_work) against the tenant's or the server's cap: for an upload as soon as its header gives the bucket,
before any pixel is decoded. Every fault is an APIError.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image
from pydantic import ValidationError
from starlette.requests import Request

from vllm_layered.formats import missing_dependency
from vllm_layered.layer_tree import RefinementError, plan_refinements, refinements_from_form
from vllm_layered.model_executor.image_processing import (
    RESOLUTIONS,
    BucketImage,
    InvalidImageError,
    SizeCheck,
    bucket_size,
    load_image,
    resize_to_bucket,
)
from vllm_layered.model_executor.pipeline import MAX_LAYERS, GenerationParams
from vllm_layered.serving.errors import bad_refine
from vllm_layered.serving.limits import ServerLimits, request_work
from vllm_layered.serving.protocol import (
    ERROR_CODES,
    APIError,
    ImageEditForm,
    ImageGenerationRequest,
    LayeredOptions,
    validation_error,
)
from vllm_layered.serving.tenants import Tenant
from vllm_layered.serving.uploads import read_form, read_json

# Uploads decoded at once. A decode briefly holds about 8 bytes per input pixel (the RGBA image and the
# premultiplied copy Pillow resizes: ~325 MB at 40 MP); the bound keeps that the same however many upload.
DECODE_CONCURRENCY = 2


@dataclass(frozen=True)
class ImagesRequest:
    """An image request read and checked: its fields, the GenerationParams they give, the condition image at its
    bucket size and the prompt (None: the engine captions the image)."""

    options: LayeredOptions
    params: GenerationParams
    image: BucketImage
    prompt: str | None


class Intake:
    """Reads the bodies of one server's image requests, within its limits and for its model names."""

    def __init__(self, limits: ServerLimits, model_names: Sequence[str]) -> None:
        self.limits = limits
        self.model_names = list(model_names)
        self._decode_slots = asyncio.Semaphore(DECODE_CONCURRENCY)

    async def read(self, request: Request, endpoint: str, tenant: Tenant) -> ImagesRequest:
        """The body of an ``edits`` or ``generations`` request of ``tenant``, read and checked."""
        if endpoint == "edits":
            return await self._read_edit(request, tenant)
        return await self._read_generation(request, tenant)

    async def _read_edit(self, request: Request, tenant: Tenant) -> ImagesRequest:
        form, data = await read_form(request, self.limits)
        fields = {name: values[-1] for name, values in form.items()}
        try:  # refine may come as several fields (what the openai SDK makes of a list)
            fields["refine"] = refinements_from_form(form)
        except RefinementError as e:
            raise bad_refine(e) from None
        options = _validate(ImageEditForm, fields)
        params = self._params(options)

        def check_size(width: int, height: int) -> None:  # from the image header, before decoding
            self._check_work(tenant, options, params, bucket_size(width, height, params.resolution))

        async with self._decode_slots:
            image = await asyncio.to_thread(
                decode_upload, data, self.limits.max_pixels, params.resolution, check_size=check_size
            )
        return ImagesRequest(options, params, image, options.prompt.strip() or None)

    async def _read_generation(self, request: Request, tenant: Tenant) -> ImagesRequest:
        body = await read_json(request, self.limits)
        if not isinstance(body, dict):
            raise APIError(400, "request body must be a JSON object", code="bad_body")
        options = _validate(ImageGenerationRequest, body)
        params = self._params(options)
        width, height = options.size_pixels() or (params.resolution, params.resolution)
        try:  # the canvas only carries the aspect ratio: make it at its bucket size
            bucket = bucket_size(width, height, params.resolution)
        except InvalidImageError as e:
            raise APIError(400, str(e), code=e.code, param="size") from None
        self._check_work(tenant, options, params, bucket)
        canvas = BucketImage(Image.new("RGBA", bucket, (0, 0, 0, 0)), width, height, params.resolution)
        return ImagesRequest(options, params, canvas, options.prompt)

    def _check_work(
        self, tenant: Tenant, options: LayeredOptions, params: GenerationParams, bucket: tuple[int, int]
    ) -> None:
        """The work cap (serving/limits.py). The server always sends a negative prompt, so CFG is on when
        true_cfg_scale > 1."""
        work = request_work(
            layers=params.layers, bucket=bucket, num_inference_steps=params.num_inference_steps,
            cfg=params.true_cfg_scale > 1, n=options.n, refine_layers=[r.layers for r in options.refine],
        )
        self.limits.check_work(work, tenant.name, tenant.max_request_work)

    def _params(self, options: LayeredOptions) -> GenerationParams:
        """Model and request-level checks, then GenerationParams (which validates the model's ranges)."""
        if options.model and options.model not in self.model_names:
            raise APIError(
                404, f"model {options.model!r} is not served here; try {self.model_names[0]!r}",
                code="model_not_found", param="model",
            )
        self.limits.check_n(options.n)
        missing = missing_dependency(options.package) if options.package is not None else None
        if missing is not None:
            raise APIError(
                400, f"package={options.package} needs {missing} on the server",
                code="unsupported_package", param="package",
            )
        resolution = options.resolution
        if resolution is None and options.size_pixels() is not None:
            width, height = options.size_pixels()
            resolution = min(RESOLUTIONS, key=lambda r: abs(r - math.sqrt(width * height)))
        kwargs = dict(
            layers=options.layers,
            resolution=resolution if resolution is not None else RESOLUTIONS[0],
            num_inference_steps=options.num_inference_steps,
            cfg_normalize=options.cfg_normalize,
            use_en_prompt=options.use_en_prompt,
        )
        if options.cfg_scale is not None:
            kwargs["true_cfg_scale"] = options.cfg_scale
        try:
            params = GenerationParams(**kwargs)
        except ValueError as e:
            name = str(e).split(" ", 1)[0]
            raise APIError(400, str(e), code="invalid_value", param=name if name in kwargs else None) from None
        try:  # the refinements must fit the tree they describe
            plan_refinements(options.refine, root_layers=params.layers, max_layers=MAX_LAYERS)
        except RefinementError as e:
            raise bad_refine(e) from None
        return params


def load_request_image(data: Any, max_pixels: int, *, check_size: SizeCheck | None = None) -> Image.Image:
    """The request's input image (``load_image`` within the pixel limit), or the APIError it deserves."""
    try:
        return load_image(data, max_pixels=max_pixels, check_size=check_size)
    except InvalidImageError as e:
        raise APIError(ERROR_CODES.get(e.code, 400), str(e), code=e.code, param="image") from None


def decode_upload(data: bytes, max_pixels: int, resolution: int, *, check_size: SizeCheck | None = None) -> BucketImage:
    """An upload decoded, turned upright, made RGBA and resized to its bucket: the full-size decode is
    dropped on return, so a request holds bucket-size pixels however large the upload was."""
    return resize_to_bucket(load_request_image(data, max_pixels, check_size=check_size), resolution)


def _validate(model: type[LayeredOptions], data: dict[str, Any]) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise validation_error(e) from None
