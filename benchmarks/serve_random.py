"""`vllm-layered serve` on full-size random bf16 weights, for serving benchmarks on a GPU with no checkpoint.

Builds the same random pipeline as the other benchmarks (benchmarks/pipeline_step.py) and serves it with
the real app and engine on loopback; `vllm-layered bench serve/sweep` then measures it from beside it.
``--model`` serves a diffusers folder instead (e.g. the tiny checkpoint, to try the setup on a CPU).

    python benchmarks/serve_random.py [--port 8000] [--model FOLDER] [--quantization none|fp8]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vllm_layered.model_executor.models.fp8_linear import QUANTIZATIONS, quantize_fp8  # noqa: E402
from vllm_layered.serving.api_server import build_app  # noqa: E402
from vllm_layered.serving.engine.engine import AsyncLayeredEngine, EngineConfig  # noqa: E402
from vllm_layered.serving.limits import ServerLimits  # noqa: E402
from vllm_layered.serving.metrics import ServingMetrics  # noqa: E402
from vllm_layered.serving.tenants import TenantRegistry  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model", default=None, help="a diffusers folder instead of random full-size weights")
    parser.add_argument("--quantization", choices=QUANTIZATIONS, default="none")
    args = parser.parse_args()
    if args.model:
        from vllm_layered.model_executor.pipeline import LayeredPipeline

        pipeline = LayeredPipeline.from_pretrained(args.model, quantization=args.quantization)
    else:
        from benchmarks.pipeline_step import random_pipeline

        pipeline = random_pipeline()
        if args.quantization == "fp8":
            quantize_fp8(pipeline.transformer)
    metrics = ServingMetrics()
    engine = AsyncLayeredEngine(pipeline, EngineConfig(model_name="Qwen/Qwen-Image-Layered"), observer=metrics)
    app = build_app(engine, tenants=TenantRegistry.open(), limits=ServerLimits(), metrics=metrics,
                    served_model_names=["Qwen/Qwen-Image-Layered"])
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
