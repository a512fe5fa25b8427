"""vllm-layered: split images into RGBA layers with Qwen-Image-Layered, serve it, talk to a server."""

# Each subcommand lives in the module that implements it; this file only declares arguments, checks what can
# be checked before any work, and dispatches.

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path

from vllm_layered.decompose import DEFAULT_STEPS, EMBEDDED_MODEL_STEPS, CommandError


def _decompose(args: argparse.Namespace) -> int:
    from vllm_layered.clients.output import resolve_output
    from vllm_layered.decompose import decompose
    from vllm_layered.model_args import check_device_flags

    target = resolve_output(args.out, args.format, args.image)  # before loading anything
    check_device_flags(args)
    return decompose(args, target)


def _add_quantization_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quantization", default="none", choices=("none", "fp8"),
                   help="GPU only. fp8: e4m3 weights and per-token activations for the transformer's big linears "
                        "(needs an FP8 GPU: compute capability 8.9+, e.g. H100/H200; use with bf16)")
    p.add_argument("--attention-dtype", default="bf16", choices=("bf16", "fp8"),
                   help="fp8: attention in e4m3 on cuDNN (with --quantization fp8 only; needs Hopper or newer and "
                        "pip install 'vllm-layered[fp8-attention]')")


def _add_load_format_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--load-format", default="safetensors", choices=("safetensors", "dummy"),
                   help="dummy: the model's configs with seeded random weights, no weight file read (benchmarks and "
                        "GPU tests without the 54 GB download; without --model, the released model's full size)")


def _add_parallel_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cfg-parallel", action="store_true",
                   help="GPU only: split the CFG branches (and packed requests) over two groups of GPUs")
    p.add_argument("--sp-degree", type=int, default=1,
                   help="GPU only: GPUs per group sharing each sequence (Ulysses sequence parallel; divides the "
                        "24 heads)")


def _make_tiny_checkpoint(args: argparse.Namespace) -> int:
    from vllm_layered.model_executor.model_loader.tiny_checkpoint import make_tiny_checkpoint

    print(make_tiny_checkpoint(args.dir, seed=args.seed, overwrite=args.overwrite))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from vllm_layered.model_args import check_device_flags
    from vllm_layered.serving.launcher import run_server

    check_device_flags(args)
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


_BENCH_DESCRIPTION = (
    "The defaults (10 requests of 10 steps, 2-8 layers at 640, CFG) take minutes against a CPU server with the "
    "embedded tiny model; for GPU numbers ask for more, e.g. --num-requests 100 --steps 50."
)


def _add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    p.add_argument("--backend", default="vllm-layered", choices=("vllm-layered", "vllm-omni"),
                   help="the server's kind (vllm-omni: no progress events, so no first-step times)")
    p.add_argument("--dataset", default="random", help="'random' (seeded shapes) or a folder of images")
    p.add_argument("--layers", default="2-8", help="layers per request: N, or LOW-HIGH drawn uniformly")
    p.add_argument("--resolution", type=int, default=640, choices=(640, 1024), help="resolution bucket")
    p.add_argument("--steps", type=int, default=10, help="denoising steps per request (the model's own: 50)")
    p.add_argument("--true-cfg-scale", type=float, default=4.0, help="guidance scale (1: CFG off)")
    p.add_argument("--negative-prompt", default=" ", help="negative prompt of CFG (default: ' ')")
    p.add_argument("--prompt", help="caption sent with every image (default: a fixed one; empty: server captions)")
    p.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most (default: no cap)")
    p.add_argument("--num-requests", type=int, default=10, help="counted requests")
    p.add_argument("--num-warmup", type=int, default=1, help="uncounted requests sent one at a time first")
    p.add_argument("--api-key", default=os.environ.get("VLLM_LAYERED_API_KEY"),
                   help="Bearer key (default: $VLLM_LAYERED_API_KEY)")
    p.add_argument("--model", default=None, help="served model name (default: the server's)")
    p.add_argument("--seed", type=int, default=0, help="seeds the dataset, the arrivals and the request seeds")
    p.add_argument("--slo", type=float, default=None, help="latency SLO in seconds, for goodput (default: none)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per request")
    p.add_argument("--disable-tqdm", action="store_true", help="no progress bar")
    p.add_argument("--result-json", type=Path, default=None, help="write the results here as JSON (default: not)")


def _optional_limit(kind: type[int] | type[float]) -> Callable[[str], int | float | None]:
    """An argparse type for a limit that 0 or "none" turns off (None)."""

    def parse(text: str) -> int | float | None:
        if text.strip().lower() == "none":
            return None
        value = kind(text)
        if not value >= 0:
            raise argparse.ArgumentTypeError(f"expected a number >= 0 or 'none', got {text!r}")
        return None if value == 0 or math.isinf(value) else value

    return parse


def _add_server_parsers(sub: argparse._SubParsersAction) -> None:
    from vllm_layered.serving.engine.scheduler import STEP_ORDERS
    from vllm_layered.serving.limits import (
        DEFAULT_BODY_TIMEOUT_S,
        DEFAULT_MAX_REQUEST_WORK,
        DEFAULT_REQUEST_TIMEOUT_S,
    )

    p = sub.add_parser("serve", help="serve the OpenAI-compatible images API")
    p.add_argument("--model", help="diffusers folder or Hugging Face repo id (default: the embedded tiny model)")
    p.add_argument("--served-model-name", nargs="+", help="name(s) clients use for the model (default: --model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
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
    p.add_argument("--request-timeout", type=_optional_limit(float), default=DEFAULT_REQUEST_TIMEOUT_S,
                   help="seconds from submission until a request is dropped with a 504 (0 or none: never). "
                        "The default (%(default)s) is about twice what the largest request that "
                        "--max-request-work admits by default takes alone on an H200, so only requests that "
                        "are stuck or queued for long reach it")
    p.add_argument("--body-timeout", type=_optional_limit(float), default=DEFAULT_BODY_TIMEOUT_S,
                   help="seconds a client has to send its whole request body, else 408 and its tenant slot "
                        "is freed (0 or none: no limit). The default (%(default)s) lets a 32 MB upload arrive "
                        "at about 1 MB/s")
    p.add_argument("--max-request-work", type=_optional_limit(int), default=DEFAULT_MAX_REQUEST_WORK,
                   help="most work one request may ask for, in image token-forwards: (layers + 2) x (H/16) x "
                        "(W/16) image tokens of its resolution bucket, x 2 with CFG, x steps x n; more is a "
                        "400 before any work (0 or none: no cap; a tenant's max_request_work in --api-keys "
                        "replaces it). The default (%(default)s) admits 20 layers at 1024 with 50 CFG steps, "
                        "n=1 (at most 9,504,000), and refuses twice that")
    p.add_argument("--shutdown-grace", type=float, default=30.0, help="seconds to finish work on shutdown")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp32"),
                   help="weights and activations (auto: bf16 on a GPU, fp32 on the CPU)")
    _add_parallel_arguments(p)
    _add_quantization_argument(p)
    _add_load_format_argument(p)
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                   help="server log verbosity")
    p.add_argument("--no-access-log", action="store_true", help="do not log one line per HTTP request")
    p.set_defaults(func=_serve)

    p = sub.add_parser("hash-key", help="print the SHA-256 hash of an API key, for the --api-keys file")
    p.add_argument("key", help="the API key a client will send")
    p.set_defaults(func=_hash_key)

    client = sub.add_parser("client", help="talk to a running server").add_subparsers(dest="client_command",
                                                                                       required=True)
    p = client.add_parser("decompose", help="split one image into RGBA layers on a server",
                          description="Split one image into RGBA layers on a running server (vllm-layered serve).")
    p.add_argument("image", type=Path, help="input image file")
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server")
    p.add_argument("--api-key", default=os.environ.get("VLLM_LAYERED_API_KEY"),
                   help="Bearer key (default: $VLLM_LAYERED_API_KEY)")
    p.add_argument("--model", default=None, help="served model name (default: the server's)")
    _add_output_arguments(p)
    p.add_argument("--layers", type=int, default=None, help="RGBA layers, 1-20 (default: the server's, 4)")
    p.add_argument("--resolution", type=int, default=None, choices=(640, 1024),
                   help="resolution bucket (default: the server's, 640)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the server's, 50)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: the server draws one)")
    p.add_argument("--prompt", default="", help="caption of the image (default: the server captions it)")
    _add_refine_argument(p)
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(func=_client_decompose)

    bench = sub.add_parser("bench", help="benchmark a running server").add_subparsers(dest="bench_command",
                                                                                      required=True)
    p = bench.add_parser("serve", help="send a request load, report throughput, latency and goodput",
                         description="Send a request load to a running server; report throughput, latency and "
                                     "goodput. " + _BENCH_DESCRIPTION)
    _add_bench_arguments(p)
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="Poisson rate in req/s (inf: all at once)")
    p.set_defaults(func=_bench_serve)
    p = bench.add_parser("sweep", help="bench serve at several rates, plot throughput against p95 latency",
                         description="bench serve at several request rates, one after another; plot throughput "
                                     "against p95 latency. " + _BENCH_DESCRIPTION)
    _add_bench_arguments(p)
    p.add_argument("--rates", default="0.05,0.1,inf", help="comma-separated request rates (inf: all at once)")
    p.add_argument("--plot", type=Path, default=None,
                   help="write a PNG of throughput against p95 latency here (default: no plot)")
    p.set_defaults(func=_bench_sweep)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to an option's help unless the help already says its default or there is
    none to say (a flag, or None: the help then says what happens)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        nothing_to_say = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if nothing_to_say or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """Every (sub)command parser shows its options' defaults."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


def _add_refine_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--refine", action="append", metavar="PATH:N",
                   help="decompose layer PATH again into N layers; repeatable. Layers are numbered bottom first from "
                        "0, and a child by its parent's path: '--refine 1:2 --refine 1.0:2' splits layer 1 in two, "
                        "then its bottom child in two. A refined layer keeps its file and gets a folder of its "
                        "children beside it (a group in PSD and PPTX; default: none)")


def _add_output_arguments(p: argparse.ArgumentParser) -> None:
    from vllm_layered.formats import SAVE_FORMATS

    p.add_argument("--out", default="layers", metavar="PATH",
                   help="png: a folder (layer_00.png = bottom ... composite.png); zip/psd/pptx: a file with that "
                        "extension, or a folder that gets IMAGE_NAME.FORMAT")
    p.add_argument("--format", default=None, choices=SAVE_FORMATS,
                   help="default: from --out's extension (.zip, .psd, .pptx), else png")
    p.add_argument("--keep-size", action="store_true",
                   help="resize the layers to the input image's size (default: the resolution bucket's size, "
                        "e.g. 768x512 for a 3:2 image at 640, as the official app returns them)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vllm-layered", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("decompose", help="split one image into RGBA layers",
                       description="Split one image into RGBA layers on this machine.")
    p.add_argument("image", help="input image file (any format Pillow reads)")
    p.add_argument("--model",
                   help="diffusers folder or Hugging Face repo id, e.g. Qwen/Qwen-Image-Layered (default: the "
                        "embedded tiny random model, made on first use: it shows the tool works; its layers are "
                        "noise)")
    p.add_argument("--layers", type=int, default=4, help="RGBA layers to split the image into, 1-20")
    p.add_argument("--resolution", type=int, default=640, choices=(640, 1024),
                   help="resolution bucket: the image is decomposed at about RES x RES pixels, aspect ratio kept")
    p.add_argument("--steps", type=int, default=None,
                   help=f"denoising steps (default: {DEFAULT_STEPS}; {EMBEDDED_MODEL_STEPS} on the embedded tiny "
                        "model)")
    p.add_argument("--seed", type=int, default=0, help="random seed: the same seed, image and options give the "
                                                       "same layers")
    p.add_argument("--prompt", default=None, help="caption of the image (default: the model writes one)")
    p.add_argument("--negative-prompt", default=" ",
                   help="negative prompt of classifier-free guidance (default: ' ', as the official app)")
    p.add_argument("--true-cfg-scale", type=float, default=4.0,
                   help="classifier-free guidance scale; 1 turns it off (half the work)")
    p.add_argument("--no-cfg-normalize", action="store_true",
                   help="do not rescale the guided prediction to the norm of the conditional one")
    p.add_argument("--chinese-caption", action="store_true", help="auto-caption with the Chinese instruction")
    _add_refine_argument(p)
    _add_output_arguments(p)
    p.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda if a GPU is visible)")
    p.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp32"),
                   help="auto: bf16 on a GPU, fp32 on the CPU")
    p.add_argument("--quiet", action="store_true", help="print only the written paths (no stages, no progress)")
    _add_parallel_arguments(p)
    _add_quantization_argument(p)
    _add_load_format_argument(p)
    p.set_defaults(func=_decompose)

    p = sub.add_parser("make-tiny-checkpoint", help="write a random tiny model in the official folder layout",
                       description="Write a random tiny Qwen-Image-Layered in the official diffusers folder layout.")
    p.add_argument("dir", type=Path, help="the folder to write (new, or empty unless --overwrite)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--overwrite", action="store_true", help="replace DIR if it holds files")
    p.set_defaults(func=_make_tiny_checkpoint)

    _add_server_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, CommandError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
