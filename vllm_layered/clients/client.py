"""Thin clients of a vllm-layered (or vLLM-Omni) server: image in, Layers out.

Requests go through the official openai SDK (``images.edit`` with the layer fields in
``extra_body``); with ``on_progress`` they go through httpx instead, to read the server-sent
progress events. ``refine`` travels as one JSON array field either way. Imports only openai, httpx,
pillow and numpy (and vllm_layered's torch-free layer tree).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TypedDict

import httpx
import openai
from PIL import Image

from vllm_layered.clients.layers import Layers
from vllm_layered.clients.sse import SSEDecoder
from vllm_layered.layer_tree import RefinementSpec, parse_refinements

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack from Python 3.11

ImageInput = str | os.PathLike | bytes | Image.Image | BinaryIO
DEFAULT_BASE_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT_S = 3600.0


class LayeredAPIError(Exception):
    """The server refused or failed a request; fields from its OpenAI-style error body."""

    def __init__(self, status_code: int, message: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(f"{status_code}: {message}")
        self.status_code = status_code
        self.message = message
        self.code = code
        self.param = param

    @classmethod
    def from_body(cls, status_code: int, body: Any) -> LayeredAPIError:
        """From the error body, or from its inner "error" object (what the openai SDK keeps)."""
        error = body.get("error", body) if isinstance(body, dict) else None
        if not isinstance(error, dict):
            return cls(status_code, str(body))
        return cls(status_code, str(error.get("message")), error.get("code"), error.get("param"))


class LayeredConnectionError(ConnectionError):
    """The server could not be reached (refused, unknown host, ...); the message names its URL."""

    def __init__(self, base_url: str, cause: BaseException) -> None:
        reason = cause.__cause__ or cause  # the openai SDK wraps httpx's error, which names the cause
        super().__init__(f"cannot connect to {base_url}: {reason} (is `vllm-layered serve` running there?)")
        self.base_url = base_url


@contextlib.contextmanager
def _connecting_to(base_url: str) -> Iterator[None]:
    """Turn a failed connection (not a timeout of a connected request) into LayeredConnectionError."""
    try:
        yield
    except openai.APITimeoutError:
        raise
    except (httpx.ConnectError, openai.APIConnectionError) as e:
        raise LayeredConnectionError(base_url, e) from e


@contextlib.contextmanager
def _server_errors() -> Iterator[None]:
    """Turn the openai SDK's error for an error answer into LayeredAPIError, as the streamed path raises it."""
    try:
        yield
    except openai.APIStatusError as e:
        raise LayeredAPIError.from_body(e.status_code, e.body if isinstance(e.body, dict) else {}) from None


class DecomposeOptions(TypedDict, total=False):
    """What ``decompose`` asks for besides the image; a keyword left out (or None) takes the server's default.

    ``prompt``: "" (the default) lets the server caption the image. ``refine``: layers to decompose again,
    "PATH:N" or {"layer": PATH, "layers": N[, "prompt": TEXT]} (layer_tree.py); the result's ``tree`` holds
    them. ``request_id``: the X-Request-Id, by which the request can be cancelled."""

    prompt: str
    layers: int | None
    resolution: int | None
    steps: int | None
    seed: int | None
    negative_prompt: str | None
    true_cfg_scale: float | None
    cfg_normalize: bool | None
    use_en_prompt: bool | None
    refine: str | Sequence[RefinementSpec] | None
    request_id: str | None


@dataclass(frozen=True)
class Progress:
    """stage: queued (queue_position), started, step (step of num_steps), decoding. ``node``: the layer whose
    refinement steps or decodes (None: the root decomposition); ``level``: 0 at the root, 1 for a refinement of
    a root layer, ..."""

    stage: str
    decomposition_index: int = 0
    step: int | None = None
    num_steps: int | None = None
    queue_position: int | None = None
    node: str | None = None
    level: int = 0


def _v1(base_url: str) -> str:
    base_url = base_url.rstrip("/")
    return base_url if base_url.endswith("/v1") else base_url + "/v1"


def _image_file(image: ImageInput) -> tuple[str, bytes, str]:
    """(file name, bytes, content type) for the multipart upload; the server sniffs the real format."""
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return "image.png", buffer.getvalue(), "image/png"
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        return path.name, path.read_bytes(), "application/octet-stream"
    if isinstance(image, (bytes, bytearray)):
        return "image", bytes(image), "application/octet-stream"
    return Path(getattr(image, "name", "image")).name, image.read(), "application/octet-stream"


def _prepare(model: str | None, options: DecomposeOptions) -> tuple[str, dict[str, Any], dict[str, str]]:
    """(prompt, request fields that were given, headers) of a decompose call; None means the server's default.
    ``refine`` is checked here and sent as one JSON array."""
    unknown = sorted(set(options) - set(DecomposeOptions.__annotations__))
    if unknown:
        raise TypeError(f"decompose() got unexpected keyword argument(s): {', '.join(unknown)}")
    options = dict(options)
    prompt = options.pop("prompt", "")
    request_id = options.pop("request_id", None)
    refinements = parse_refinements(options.pop("refine", None))
    options["num_inference_steps"] = options.pop("steps", None)
    fields = {k: v for k, v in dict(options, model=model).items() if v is not None}
    if refinements:
        fields["refine"] = json.dumps([
            {"layer": r.path, "layers": r.layers, **({"prompt": r.prompt} if r.prompt is not None else {})}
            for r in refinements
        ])
    return prompt, fields, ({"X-Request-Id": request_id} if request_id else {})


def _edit_kwargs(image: ImageInput, prompt: str, fields: dict[str, Any], headers: dict[str, str]) -> dict[str, Any]:
    """Arguments of the openai SDK's images.edit: the layer fields ride in extra_body."""
    fields = dict(fields)
    model = fields.pop("model", None)
    kwargs = dict(image=_image_file(image), prompt=prompt, response_format="b64_json", extra_body=fields,
                  extra_headers=headers)
    return {**kwargs, "model": model} if model else kwargs


def _form(prompt: str, fields: dict[str, Any]) -> dict[str, str]:
    """Fields as multipart strings, booleans as true/false."""
    as_text = {k: (str(v).lower() if isinstance(v, bool) else str(v)) for k, v in fields.items()}
    return {"prompt": prompt, **as_text, "stream": "true"}


def _handle_event(event: str, data: Any, on_progress: Callable[[Progress], Any]) -> tuple[bool, Any]:
    """(is_final, what on_progress returned or the final body); raises the error event."""
    if event == "progress":
        fields = {k: data.get(k) for k in ("step", "num_steps", "queue_position", "node")}
        progress = Progress(data["stage"], data.get("decomposition_index", 0), level=data.get("level", 0), **fields)
        return False, on_progress(progress)
    if event == "error":
        raise LayeredAPIError.from_body(data.get("status", 500), data)
    return event == "result", data


class _Client:
    """What both clients hold: the server's address, the model asked for, an openai and an httpx client."""

    _openai_client: type[openai.OpenAI] | type[openai.AsyncOpenAI]
    _http_client: type[httpx.Client] | type[httpx.AsyncClient]

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        api_key: str | None = None,
        *,
        model: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self.model = model
        self.base_url = base_url
        self._openai = self._openai_client(
            base_url=_v1(base_url), api_key=api_key or "none", timeout=timeout, max_retries=0
        )
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = self._http_client(base_url=_v1(base_url), headers=headers, timeout=timeout)


class LayeredClient(_Client):
    """Blocking client. ``decompose`` returns the layers of one image, bottom first (and with ``refine``, the
    tree of its refinements as ``Layers.tree``)."""

    _openai_client = openai.OpenAI
    _http_client = httpx.Client

    def decompose(
        self,
        image: ImageInput,
        *,
        on_progress: Callable[[Progress], None] | None = None,
        **options: Unpack[DecomposeOptions],
    ) -> Layers:
        """The layers of ``image``, asked for with DecomposeOptions; ``on_progress`` gets each Progress."""
        prompt, fields, headers = _prepare(self.model, options)
        with _connecting_to(self.base_url):
            if on_progress is not None:
                return Layers.from_response(self._stream(image, prompt, fields, headers, on_progress))
            with _server_errors():
                response = self._openai.images.edit(**_edit_kwargs(image, prompt, fields, headers))
        return Layers.from_response(response.model_dump())

    def _stream(self, image, prompt, fields, headers, on_progress) -> dict[str, Any]:
        files = {"image": _image_file(image)}
        with self._http.stream("POST", "/images/edits", data=_form(prompt, fields), files=files,
                               headers=headers) as response:
            if response.status_code != 200:
                raise LayeredAPIError.from_body(response.status_code, json.loads(response.read() or b"{}"))
            return _read_events(response.iter_lines(), on_progress)

    def cancel(self, request_id: str) -> bool:
        """Cancel one of your requests in flight; False if there is none by that id."""
        with _connecting_to(self.base_url):
            response = self._http.delete(f"/requests/{request_id}")
        return response.status_code == 200

    def models(self) -> list[str]:
        with _connecting_to(self.base_url):
            return [m.id for m in self._openai.models.list().data]

    def close(self) -> None:
        self._http.close()
        self._openai.close()

    def __enter__(self) -> LayeredClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _read_events(lines: Iterable[str], on_progress: Callable[[Progress], Any]) -> dict[str, Any]:
    decoder = SSEDecoder()
    for line in lines:
        if (item := decoder.feed(line)) is not None:
            final, value = _handle_event(*item, on_progress)
            if final:
                return value
    raise LayeredAPIError(502, "the event stream ended without a result")


class AsyncLayeredClient(_Client):
    """The asyncio twin of LayeredClient; ``on_progress`` may be a coroutine function."""

    _openai_client = openai.AsyncOpenAI
    _http_client = httpx.AsyncClient

    async def decompose(
        self,
        image: ImageInput,
        *,
        on_progress: Callable[[Progress], Awaitable[None] | None] | None = None,
        **options: Unpack[DecomposeOptions],
    ) -> Layers:
        """The layers of ``image``, asked for with DecomposeOptions; ``on_progress`` gets each Progress."""
        prompt, fields, headers = _prepare(self.model, options)
        with _connecting_to(self.base_url):
            if on_progress is not None:
                return Layers.from_response(await self._stream(image, prompt, fields, headers, on_progress))
            with _server_errors():
                response = await self._openai.images.edit(**_edit_kwargs(image, prompt, fields, headers))
        return Layers.from_response(response.model_dump())

    async def _stream(self, image, prompt, fields, headers, on_progress) -> dict[str, Any]:
        files = {"image": _image_file(image)}
        decoder = SSEDecoder()
        async with self._http.stream("POST", "/images/edits", data=_form(prompt, fields), files=files,
                                     headers=headers) as response:
            if response.status_code != 200:
                raise LayeredAPIError.from_body(response.status_code, json.loads(await response.aread() or b"{}"))
            async for line in response.aiter_lines():
                if (item := decoder.feed(line)) is not None:
                    final, value = _handle_event(*item, on_progress)
                    if final:
                        return value
                    if isinstance(value, Awaitable):
                        await value
        raise LayeredAPIError(502, "the event stream ended without a result")

    async def cancel(self, request_id: str) -> bool:
        with _connecting_to(self.base_url):
            response = await self._http.delete(f"/requests/{request_id}")
        return response.status_code == 200

    async def models(self) -> list[str]:
        with _connecting_to(self.base_url):
            return [m.id for m in (await self._openai.models.list()).data]

    async def close(self) -> None:
        await self._http.aclose()
        await self._openai.close()

    async def __aenter__(self) -> AsyncLayeredClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
