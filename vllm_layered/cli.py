"""vllm-layered: split images into RGBA layers with Qwen-Image-Layered, serve it, talk to a server."""

# Each subcommand lives in the module that implements it; this file only declares arguments and dispatches.

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

Command = Callable[[argparse.Namespace], int]


def _decompose(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from vllm_layered.model_executor.export import save_layers
    from vllm_layered.model_executor.image_processing import load_image
    from vllm_layered.model_executor.pipeline import GenerationParams, LayeredPipeline

    # check the input before loading a 54 GB model
    image = load_image(args.image)
    GenerationParams(layers=args.layers, resolution=args.resolution, num_inference_steps=args.steps)
    if args.quiet:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    dtype = {"auto": None, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    pipe = LayeredPipeline.from_pretrained(
        model_path(args), device=args.device, dtype=dtype, parallel=parallel_config(args),
        quantization=quantization(args), load_format=args.load_format,
    )
    with tqdm(total=args.steps, desc="denoising", unit="step", disable=args.quiet) as bar:
        result = pipe(
            image,
            prompt=args.prompt,
            negative_prompt=args.negative_prompt if args.true_cfg_scale > 1 else None,
            true_cfg_scale=args.true_cfg_scale,
            cfg_normalize=not args.no_cfg_normalize,
            layers=args.layers,
            resolution=args.resolution,
            num_inference_steps=args.steps,
            seed=args.seed,
            use_en_prompt=not args.chinese_caption,
            callback=lambda step, total: bar.update(1),
        )
    written = save_layers(result.layers, args.out, args.format, composite=result.composite)
    for path in written:
        print(path)
    return 0


def model_path(args: argparse.Namespace):
    """--model; without it the embedded tiny model, or under --load-format dummy the released model's configs."""
    if args.model:
        return args.model
    if args.load_format == "dummy":
        from vllm_layered.model_executor.dummy_model import full_size_model_folder

        return full_size_model_folder()
    from vllm_layered.model_executor.tiny_checkpoint import default_model_path

    return default_model_path()


def parallel_config(args: argparse.Namespace):
    from vllm_layered.model_executor.parallel import ParallelConfig

    return ParallelConfig(cfg_degree=2 if args.cfg_parallel else 1, sp_degree=args.sp_degree)


def quantization(args: argparse.Namespace) -> str | None:
    """The transformer's quantization from --quantization (None for "none")."""
    return None if args.quantization == "none" else args.quantization


def _add_quantization_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quantization", default="none", choices=("none", "fp8"),
                   help="fp8: e4m3 weights and per-token activations for the transformer's big linears "
                        "(needs an FP8 GPU: compute capability 8.9+, e.g. H100/H200; use with bf16)")


def _add_load_format_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--load-format", default="safetensors", choices=("safetensors", "dummy"),
                   help="dummy: the model's configs with seeded random weights, no weight file read (benchmarks and "
                        "GPU tests without the 54 GB download; without --model, the released model's full size)")


def _add_parallel_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cfg-parallel", action="store_true",
                   help="split the CFG branches (and packed requests) over two groups of GPUs")
    p.add_argument("--sp-degree", type=int, default=1,
                   help="GPUs per group sharing each sequence (Ulysses sequence parallel; divides the 24 heads)")


def _make_tiny_checkpoint(args: argparse.Namespace) -> int:
    from vllm_layered.model_executor.tiny_checkpoint import make_tiny_checkpoint

    print(make_tiny_checkpoint(args.dir, seed=args.seed, overwrite=args.overwrite))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from vllm_layered.serving.api_server import run_server

    return run_server(args)


def _hash_key(args: argparse.Namespace) -> int:
    from vllm_layered.serving.tenants import hash_key

    print(hash_key(args.key))
    return 0


def _client_decompose(args: argparse.Namespace) -> int:
    from vllm_layered.clients.cli import decompose

    return decompose(args)


def _bench_serve(args: argparse.Namespace) -> int:
    from vllm_layered.bench.serve import main as bench_serve

    return bench_serve(args)


def _bench_sweep(args: argparse.Namespace) -> int:
    from vllm_layered.bench.sweep import main as bench_sweep

    return bench_sweep(args)


def _add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    p.add_argument("--backend", default="vllm-layered", choices=("vllm-layered", "vllm-omni"))
    p.add_argument("--dataset", default="random", help="'random' (seeded shapes) or a folder of images")
    p.add_argument("--layers", default="2-8", help="layers per request: N, or LOW-HIGH drawn uniformly")
    p.add_argument("--resolution", type=int, default=640)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--true-cfg-scale", type=float, default=4.0)
    p.add_argument("--negative-prompt", default=" ")
    p.add_argument("--prompt", help="caption sent with every image (default: a fixed one; empty: server captions)")
    p.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most")
    p.add_argument("--num-requests", type=int, default=100)
    p.add_argument("--num-warmup", type=int, default=1, help="uncounted requests sent one at a time first")
    p.add_argument("--api-key", default=os.environ.get("VLLM_LAYERED_API_KEY"),
                   help="Bearer key (default: $VLLM_LAYERED_API_KEY)")
    p.add_argument("--model", default=None, help="served model name (default: the server's)")
    p.add_argument("--seed", type=int, default=0, help="seeds the dataset, the arrivals and the request seeds")
    p.add_argument("--slo", type=float, default=None, help="latency SLO in seconds, for goodput")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per request")
    p.add_argument("--disable-tqdm", action="store_true")
    p.add_argument("--result-json", type=Path, default=None)


def _add_server_parsers(sub: argparse._SubParsersAction) -> None:
    from vllm_layered.serving.engine.scheduler import STEP_ORDERS

    p = sub.add_parser("serve", help="serve the OpenAI-compatible images API")
    p.add_argument("--model", help="diffusers folder or Hugging Face repo id (default: the embedded tiny model)")
    p.add_argument("--served-model-name", nargs="+", help="name(s) clients use for the model (default: --model)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-keys", type=Path, help="JSON file of tenants and key hashes (default: open, no keys); "
                                                 "re-read within a second or two of a change")
    from vllm_layered.serving.tenant_store import DEFAULT_LEASE_TTL_S, FALLBACK_POLICIES

    p.add_argument("--tenant-store", metavar="redis://HOST:PORT/DB",
                   default=os.environ.get("VLLM_LAYERED_TENANT_STORE"),
                   help="share the tenants' rate limits, concurrency and settings between replicas through Redis "
                        "(needs --api-keys and the redis extra; default: $VLLM_LAYERED_TENANT_STORE, which keeps a "
                        "password out of the command line; unset: each replica enforces the limits on its own)")
    p.add_argument("--tenant-store-fallback", default="local", choices=FALLBACK_POLICIES,
                   help="while the tenant store is unreachable: 'local' admits by this replica's own limits, "
                        "'refuse' answers 503")
    p.add_argument("--tenant-lease-ttl", type=float, default=DEFAULT_LEASE_TTL_S, metavar="SECONDS",
                   help="how long the requests of a replica that died keep counting against their tenant's "
                        "max_concurrency (running requests renew their lease every TTL/3, at most every second)")
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests before 503")
    p.add_argument("--max-running", type=int, default=32, help="requests denoised together at most")
    p.add_argument("--step-order", default="srpt", choices=STEP_ORDERS,
                   help="who steps first: least remaining work (srpt: lowest mean latency) or first submitted "
                        "(fcfs: lowest worst-case latency)")
    p.add_argument("--max-upload-mb", type=float, default=32.0, help="largest request body")
    p.add_argument("--max-pixels", type=int, default=40_000_000, help="largest input image (width * height)")
    p.add_argument("--max-n", type=int, default=4, help="most decompositions per request")
    p.add_argument("--request-timeout", type=float, default=None, help="seconds before a request is dropped")
    p.add_argument("--shutdown-grace", type=float, default=30.0, help="seconds to finish work on shutdown")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp32"))
    _add_parallel_arguments(p)
    _add_quantization_argument(p)
    _add_load_format_argument(p)
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    p.add_argument("--no-access-log", action="store_true")
    p.set_defaults(func=_serve)

    p = sub.add_parser("hash-key", help="print the SHA-256 hash of an API key, for the --api-keys file")
    p.add_argument("key")
    p.set_defaults(func=_hash_key)

    client = sub.add_parser("client", help="talk to a running server").add_subparsers(dest="client_command",
                                                                                       required=True)
    p = client.add_parser("decompose", help="split one image into RGBA layers on a server")
    p.add_argument("image", type=Path)
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--api-key", default=os.environ.get("VLLM_LAYERED_API_KEY"),
                   help="Bearer key (default: $VLLM_LAYERED_API_KEY)")
    p.add_argument("--model", default=None, help="served model name (default: the server's)")
    p.add_argument("--out", type=Path, default=Path("layers"), help="output folder")
    p.add_argument("--format", default="png", choices=("png", "zip", "psd", "pptx"))
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--resolution", type=int, default=None, choices=(640, 1024))
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--prompt", default="", help="caption of the image (default: the server captions it)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(func=_client_decompose)

    bench = sub.add_parser("bench", help="benchmark a running server").add_subparsers(dest="bench_command",
                                                                                      required=True)
    p = bench.add_parser("serve", help="send a request load, report throughput, latency and goodput")
    _add_bench_arguments(p)
    p.add_argument("--request-rate", type=float, default=float("inf"), help="Poisson rate in req/s, or inf")
    p.set_defaults(func=_bench_serve)
    p = bench.add_parser("sweep", help="bench serve at several rates, plot throughput against p95 latency")
    _add_bench_arguments(p)
    p.add_argument("--rates", default="0.05,0.1,inf", help="comma-separated request rates (inf: all at once)")
    p.add_argument("--plot", type=Path, default=None, help="PNG of throughput against p95 latency")
    p.set_defaults(func=_bench_sweep)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm-layered", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("decompose", help="split one image into RGBA layers")
    p.add_argument("image", help="input image file (any format Pillow reads)")
    p.add_argument("--model", help="diffusers folder or Hugging Face repo id (default: the embedded tiny model)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--resolution", type=int, default=640, choices=(640, 1024))
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt", default=None, help="caption of the image (default: auto-caption)")
    p.add_argument("--negative-prompt", default=" ")
    p.add_argument("--true-cfg-scale", type=float, default=4.0, help="1 turns classifier-free guidance off")
    p.add_argument("--no-cfg-normalize", action="store_true")
    p.add_argument("--chinese-caption", action="store_true", help="auto-caption with the Chinese instruction")
    p.add_argument("--out", type=Path, default=Path("layers"), help="output folder (png) or file (zip/psd/pptx)")
    p.add_argument("--format", default="png", choices=("png", "zip", "psd", "pptx"))
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp32"))
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_parallel_arguments(p)
    _add_quantization_argument(p)
    _add_load_format_argument(p)
    p.set_defaults(func=_decompose)

    p = sub.add_parser("make-tiny-checkpoint", help="write a random tiny model in the official folder layout")
    p.add_argument("dir", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_make_tiny_checkpoint)

    _add_server_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
