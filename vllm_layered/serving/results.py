"""Finished decompositions -> the ImagesResponse body: one entry per layer (bottom first) in the
chosen image format, or one packaged file per decomposition. CPU-bound: run it off the event loop."""

from __future__ import annotations

import base64
import time
from collections.abc import Sequence

from vllm_layered.model_executor.export import (
    encode_png,
    encode_webp,
    layers_to_pptx_bytes,
    layers_to_psd_bytes,
    layers_to_zip_bytes,
)
from vllm_layered.serving.engine.request import RequestOutput
from vllm_layered.serving.protocol import DecompositionInfo, ImageData, ImagesResponse

MIME_TYPES = {
    "png": "image/png",
    "webp": "image/webp",
    "zip": "application/zip",
    "psd": "image/vnd.adobe.photoshop",
    "pptx": "application/vnd.openxmlformats-officedocument.presentationml.presentation",
}
PACKAGERS = {"zip": layers_to_zip_bytes, "psd": layers_to_psd_bytes, "pptx": layers_to_pptx_bytes}


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
) -> dict:
    data: list[ImageData] = []
    for index, (output, seed) in enumerate(zip(outputs, seeds)):
        common = dict(revised_prompt=output.prompt, decomposition_index=index, seed=seed, num_layers=len(output.layers))
        if package is not None:
            blob = PACKAGERS[package](output.layers)
            data.append(ImageData(b64_json=_b64(blob), mime_type=MIME_TYPES[package], package=package, **common))
            continue
        for layer_index, layer in enumerate(output.layers):
            if output_format == "webp":
                blob = encode_webp(layer)
            else:
                blob = encode_png(layer, compress_level=png_compress_level)
            data.append(
                ImageData(
                    b64_json=_b64(blob),
                    mime_type=MIME_TYPES[output_format],
                    layer_index=layer_index,
                    role="background" if layer_index == 0 else "layer",
                    **common,
                )
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
    return response.model_dump(exclude_none=True)


def _b64(blob: bytes) -> str:
    return base64.b64encode(blob).decode("ascii")
