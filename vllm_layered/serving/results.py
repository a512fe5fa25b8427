"""Finished decompositions -> the ImagesResponse body: one entry per layer of each decomposition's tree (depth
first, see ImageData) in the chosen image format, or one packaged file per decomposition. CPU-bound: run it off
the event loop."""

from __future__ import annotations

import base64
import time
from collections.abc import Sequence
from typing import Any

from vllm_layered.formats import MIME_TYPES, encode_png, encode_webp, package_bytes
from vllm_layered.layer_tree import LayerTree
from vllm_layered.serving.engine.request import RequestOutput
from vllm_layered.serving.protocol import DecompositionInfo, ImageData, ImagesResponse

# Fields of a layer entry sent as null rather than left out: a client tells "no parent" from "not a tree field".
_NULL_LAYER_FIELDS = ("parent", "bbox")


def build_images_response(
    *,
    request_id: str,
    model: str,
    outputs: Sequence[RequestOutput],
    seeds: Sequence[int],
    output_format: str,
    package: str | None,
    experimental: bool,
    png_compress_level: int,
) -> dict[str, Any]:
    data: list[ImageData] = []
    for index, (output, seed) in enumerate(zip(outputs, seeds)):
        tree = output.tree or LayerTree.from_layers(output.layers, output.prompt, seed)
        common = dict(revised_prompt=output.prompt, decomposition_index=index, seed=seed, num_layers=len(tree.layers))
        if package is not None:
            blob = package_bytes(tree, package)
            data.append(ImageData(b64_json=_b64(blob), mime_type=MIME_TYPES[package], package=package, **common))
            continue
        for node in tree.walk():
            if output_format == "webp":
                blob = encode_webp(node.image)
            else:
                blob = encode_png(node.image, compress_level=png_compress_level)
            data.append(
                ImageData(b64_json=_b64(blob), mime_type=MIME_TYPES[output_format], **ImageData.node_fields(node),
                          **common)
            )
    width, height = outputs[0].layers[0].size
    response = ImagesResponse(
        id=request_id,
        created=int(time.time()),
        model=model,
        data=data,
        num_layers=len(outputs[0].layers),
        size=f"{width}x{height}",
        output_format=package or output_format,
        package=package,
        decompositions=[
            DecompositionInfo(index=i, seed=s, prompt=o.prompt, timings=o.timings)
            for i, (o, s) in enumerate(zip(outputs, seeds))
        ],
        experimental=experimental,
    )
    body = response.model_dump(exclude_none=True)
    for entry in body["data"]:
        if "path" in entry:
            for name in _NULL_LAYER_FIELDS:
                entry.setdefault(name, None)
    return body


def _b64(blob: bytes) -> str:
    return base64.b64encode(blob).decode("ascii")
