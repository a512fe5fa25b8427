"""Reading request bodies within the server's limits: multipart forms with one image, JSON bodies.

The body size is checked against Content-Length before anything is read, and counted while it is
read (chunked uploads carry no length). Every way a body can be wrong ends as an APIError.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.types import Message, Receive

from vllm_layered.serving.limits import ServerLimits
from vllm_layered.serving.protocol import APIError

IMAGE_FIELDS = ("image", "image[]")
MAX_FORM_FIELDS = 64
MAX_FIELD_BYTES = 1 << 20


class _TooLarge(Exception):
    pass


class ClientGone(Exception):
    """The client disconnected while its request was being read or processed."""


def _too_large(limit: int) -> APIError:
    return APIError(413, f"request body is larger than the limit of {limit} bytes", code="upload_too_large")


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


async def read_form(request: Request, limits: ServerLimits) -> tuple[dict[str, str], bytes]:
    """The text fields of a multipart upload and the bytes of its single image file."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise APIError(400, f"expected a multipart/form-data body, got {content_type or 'none'!r}", code="bad_body")
    try:
        form = await _limited(request, limits.max_upload_bytes).form(
            max_files=4, max_fields=MAX_FORM_FIELDS, max_part_size=MAX_FIELD_BYTES
        )
    except _TooLarge:
        raise _too_large(limits.max_upload_bytes) from None
    except ClientDisconnect:
        raise ClientGone from None
    except HTTPException as e:  # starlette's multipart errors (bad boundary, too many parts)
        raise APIError(400, f"malformed multipart body: {e.detail}", code="bad_multipart") from None
    try:
        files = [(k, v) for k, v in form.multi_items() if isinstance(v, UploadFile)]
        fields = {k: v for k, v in form.multi_items() if isinstance(v, str)}
        images = [v for k, v in files if k in IMAGE_FIELDS]
        if not images:
            raise APIError(400, "missing the image file (multipart field 'image')", code="missing_image", param="image")
        if len(images) > 1:
            raise APIError(400, "send exactly one image; this model decomposes one image", param="image")
        data = await images[0].read()
    finally:
        await form.close()
    if not data:
        raise APIError(400, "the image file is empty", code="empty_image", param="image")
    return fields, data


async def read_json(request: Request, limits: ServerLimits) -> Any:
    try:
        body = await _limited(request, limits.max_upload_bytes).body()
    except _TooLarge:
        raise _too_large(limits.max_upload_bytes) from None
    except ClientDisconnect:
        raise ClientGone from None
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"request body is not valid JSON: {e}", code="bad_body") from None


async def wait_for_disconnect(receive: Receive) -> None:
    """Returns when the client closes the connection (call only once the body has been read)."""
    while (await receive())["type"] != "http.disconnect":
        pass
