"""Reading request bodies within the server's limits: multipart forms with one image, JSON bodies.

The body size is checked against Content-Length before anything is read, and counted while it is
read (chunked uploads carry no length); the whole body must arrive within ``body_timeout_s``. Every
way a body can be wrong ends as an APIError. Errors sent before the body was read to its end close the
connection (``Connection: close``): what is left of the body would otherwise be read as the next request.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable
from typing import Any, TypeVar

from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.types import Message, Receive

from vllm_layered.serving.errors import CLOSE
from vllm_layered.serving.limits import ServerLimits
from vllm_layered.serving.protocol import APIError

IMAGE_FIELDS = ("image", "image[]")
MAX_FORM_FIELDS = 64
MAX_FIELD_BYTES = 1 << 20

T = TypeVar("T")


class _TooLarge(Exception):
    pass


class ClientGone(Exception):
    """The client disconnected while its request was being read or processed."""


def _too_large(limit: int) -> APIError:
    return APIError(
        413, f"request body is larger than the limit of {limit} bytes", code="upload_too_large", headers=CLOSE
    )


async def _before_deadline(read: Awaitable[T], limits: ServerLimits) -> T:
    """``read`` (a body read), or a 408 once ``limits.body_timeout_s`` has passed without its end."""
    try:
        async with asyncio.timeout(limits.body_timeout_s):
            return await read
    except TimeoutError:
        raise APIError(
            408,
            f"the request body did not arrive within {limits.body_timeout_s:g} s (serve --body-timeout)",
            code="body_timeout",
            headers=CLOSE,
        ) from None


def _limited(request: Request, limit: int) -> Request:
    """The same request, reading its body through a receive that refuses more than ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    seen = 0

    async def receive() -> Message:
        nonlocal seen
        message = await request.receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise _TooLarge
        return message

    return Request(request.scope, receive)


async def read_form(request: Request, limits: ServerLimits) -> tuple[dict[str, list[str]], bytes]:
    """The text fields of a multipart upload (each name with its values, in the order sent) and the bytes of its
    single image file."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise APIError(400, f"expected a multipart/form-data body, got {content_type or 'none'!r}", code="bad_body")
    try:
        form = await _before_deadline(
            _limited(request, limits.max_upload_bytes).form(
                max_files=4, max_fields=MAX_FORM_FIELDS, max_part_size=MAX_FIELD_BYTES
            ),
            limits,
        )
    except _TooLarge:
        raise _too_large(limits.max_upload_bytes) from None
    except ClientDisconnect:
        raise ClientGone from None
    except HTTPException as e:  # starlette's multipart errors (bad boundary, too many parts)
        raise APIError(400, f"malformed multipart body: {e.detail}", code="bad_multipart", headers=CLOSE) from None
    try:
        files = [(k, v) for k, v in form.multi_items() if isinstance(v, UploadFile)]
        fields: dict[str, list[str]] = {}
        for name, value in form.multi_items():
            if isinstance(value, str):
                fields.setdefault(name, []).append(value)
        images = [v for k, v in files if k in IMAGE_FIELDS]
        if not images:
            raise APIError(400, "missing the image file (multipart field 'image')", code="missing_image", param="image")
        if len(images) > 1:
            raise APIError(
                400, "send exactly one image; this model decomposes one image", code="too_many_images", param="image"
            )
        data = await images[0].read()
    finally:
        await form.close()
    if not data:
        raise APIError(400, "the image file is empty", code="empty_image", param="image")
    return fields, data


async def read_json(request: Request, limits: ServerLimits) -> Any:
    """The parsed JSON body: standard JSON only (no NaN or Infinity), any fault in it a 400."""
    try:
        body = await _before_deadline(_limited(request, limits.max_upload_bytes).body(), limits)
    except _TooLarge:
        raise _too_large(limits.max_upload_bytes) from None
    except ClientDisconnect:
        raise ClientGone from None
    try:
        return json.loads(body, parse_constant=_refuse_constant)
    except RecursionError:
        problem = "it is nested too deeply"
    except (json.JSONDecodeError, UnicodeDecodeError, _NotJSON) as e:
        problem = str(e)
    except ValueError:  # the only other one: int() refuses numbers of more than sys.get_int_max_str_digits()
        problem = f"it holds an integer of more than {sys.get_int_max_str_digits()} digits"
    raise APIError(400, f"request body is not valid JSON: {problem}", code="bad_body")


class _NotJSON(ValueError):
    pass


def _refuse_constant(name: str) -> Any:
    raise _NotJSON(f"{name} is not a JSON value")


async def wait_for_disconnect(receive: Receive) -> None:
    """Returns when the client closes the connection (call only once the body has been read)."""
    while (await receive())["type"] != "http.disconnect":
        pass
