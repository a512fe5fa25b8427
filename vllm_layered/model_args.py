"""The model flags that ``decompose`` and ``serve`` share, read from parsed arguments into a LayeredPipeline.

cli.py declares the flags (--model, --device, --dtype, --quantization, --attention-dtype, --load-format,
--cfg-parallel, --sp-degree); both commands read them here, so neither reaches back into the CLI. The CLI
imports this module only when a command runs: parsing arguments stays free of torch.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch

from vllm_layered.model_executor.model_loader.dummy_checkpoint import full_size_model_folder
from vllm_layered.model_executor.model_loader.tiny_checkpoint import default_model_path
from vllm_layered.model_executor.parallel import ParallelConfig
from vllm_layered.model_executor.pipeline import LayeredPipeline

DTYPES: dict[str, torch.dtype | None] = {"auto": None, "bf16": torch.bfloat16, "fp32": torch.float32}


def check_device_flags(args: argparse.Namespace) -> None:
    """Refuse, before loading anything, a --device this machine lacks and GPU-only flags on the CPU."""
    cuda = torch.cuda.is_available()
    try:
        device = torch.device(args.device) if args.device else torch.device("cuda" if cuda else "cpu")
    except RuntimeError as exc:
        raise ValueError(f"--device {args.device}: {exc}") from exc
    if device.type == "cuda" and not cuda:
        build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
        raise ValueError(
            f"--device {args.device}: no CUDA GPU is visible (torch {torch.__version__}, {build}); "
            "leave --device out to run on the CPU"
        )
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {args.device}: only {torch.cuda.device_count()} GPU(s) visible, from cuda:0")
    if device.type == "cpu":
        gpu_only = [
            flag
            for flag, given in (
                ("--quantization fp8", args.quantization == "fp8"),
                ("--cfg-parallel", args.cfg_parallel),
                (f"--sp-degree {args.sp_degree}", args.sp_degree > 1),
            )
            if given
        ]
        if gpu_only:
            why = "--device cpu" if args.device else "no CUDA GPU is visible"
            raise ValueError(f"{', '.join(gpu_only)}: GPU only, and this run is on the CPU ({why})")


def model_path(args: argparse.Namespace, on_write: Callable[[Path], None] | None = None) -> str | Path:
    """--model; without it the embedded tiny model (``on_write(path)`` before it is first generated), or under
    --load-format dummy the released model's configs."""
    if args.model:
        return args.model
    if args.load_format == "dummy":
        return full_size_model_folder()
    return default_model_path(on_write=on_write)


def parallel_config(args: argparse.Namespace) -> ParallelConfig:
    return ParallelConfig(cfg_degree=2 if args.cfg_parallel else 1, sp_degree=args.sp_degree)


def quantization(args: argparse.Namespace) -> str | None:
    """The transformer's quantization from --quantization (None for "none")."""
    return None if args.quantization == "none" else args.quantization


def load_pipeline(
    args: argparse.Namespace, on_write: Callable[[Path], None] | None = None
) -> tuple[LayeredPipeline, str | Path]:
    """The pipeline the flags ask for, and the model it was loaded from (``model_path``)."""
    model = model_path(args, on_write=on_write)
    pipeline = LayeredPipeline.from_pretrained(
        model, device=args.device, dtype=DTYPES[args.dtype], parallel=parallel_config(args),
        quantization=quantization(args), attention_dtype=args.attention_dtype, load_format=args.load_format,
    )
    return pipeline, model
