"""The vllm-layered command, run as users run it: `python -m vllm_layered.cli ...` in a subprocess."""

import argparse
import os
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image
from psd_tools import PSDImage

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without a GPU says")


def cli(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "vllm_layered.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "in.png"
    Image.new("RGBA", (96, 64), (20, 120, 200, 255)).save(path)
    return path


def cheap(image, checkpoint, *args):
    return ["decompose", str(image), "--model", str(checkpoint), "--layers", "2", "--steps", "1",
            "--prompt", "a blue card", *args]


def test_decompose_writes_pngs_and_psd(tiny_checkpoint, image, tmp_path):
    done = cli(*cheap(image, tiny_checkpoint, "--quiet", "--out", str(tmp_path / "layers")))
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # --quiet: only the paths, on stdout
    names = sorted(p.name for p in (tmp_path / "layers").iterdir())
    assert names == ["composite.png", "layer_00.png", "layer_01.png"]
    assert Image.open(tmp_path / "layers" / "layer_00.png").mode == "RGBA"
    for out, args, written in ((tmp_path / "stack.psd", [], tmp_path / "stack.psd"),  # psd from the name
                               (f"{tmp_path / 'pkgdir'}/", ["--format", "psd"], tmp_path / "pkgdir" / "in.psd")):
        done = cli(*cheap(image, tiny_checkpoint, "--quiet", "--out", str(out), *args))
        assert done.returncode == 0, done.stderr
        assert done.stdout == f"{written}\n"
        assert len(list(PSDImage.open(written))) == 2


def test_decompose_refine_writes_a_three_level_tree(tiny_checkpoint, image, tmp_path):
    """Layer 1 into 2, then its bottom child into 1: each refined layer keeps its file and gets a folder of its
    children; the stages of every level are labelled (the refinements' inputs are captioned)."""
    out = tmp_path / "tree"
    done = cli(*cheap(image, tiny_checkpoint, "--refine", "1:2", "--refine", "1.0:1", "--true-cfg-scale", "1",
                      "--out", str(out)))
    assert done.returncode == 0, done.stderr
    names = ["layer_00.png", "layer_01.png", "layer_01/layer_00.png", "layer_01/layer_00/layer_00.png",
             "layer_01/layer_00/composite.png", "layer_01/layer_01.png", "layer_01/composite.png", "composite.png"]
    assert done.stdout.split() == [str(out / name) for name in names]
    assert {(Image.open(out / name).mode, Image.open(out / name).size) for name in names} == {("RGBA", (768, 512))}
    lines, position = done.stderr.splitlines(), -1
    for label in ("load ...", "denoise", "decode 2 layers ...", "refine 1:2 ...", "denoise 1", "decode 2 layers ...",
                  "refine 1.0:1 ...", "denoise 1.0", "decode 1 layer ...", f"write {out} ..."):
        position = next(i for i, line in enumerate(lines) if i > position and line.startswith(label))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--refine", "2:2"], "error: refine 2: no such layer; the root decomposition has 2 layer(s), 0-1\n"),
        (["--refine", "1"], "error: bad refinement '1': expected PATH:N"),
        (["--refine", "1.0:2"], "error: refine 1.0: its parent layer 1 is not refined; refine 1 too\n"),
    ],
)
def test_refinements_are_checked_before_anything_loads(image, tmp_path, args, message):
    """The model does not exist: the refinement's error comes first."""
    done = cli("decompose", str(image), "--model", str(tmp_path / "no-model"), "--layers", "2", *args, timeout=120)
    assert done.returncode == 2 and done.stderr.startswith(message), done.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--format", "psd", "--out", "stack.zip"], "error: --out stack.zip must be a .psd file or a folder"),
        (["--out", "a-file"], "error: --out a-file is a file; PNG layers go into a folder"),
        (["--format", "png", "--out", "x.pptx"], "error: --out x.pptx names a .pptx file, but --format png"),
    ],
)
def test_the_output_is_checked_before_anything_loads(image, tmp_path, args, message):
    """The model does not exist: the output's error comes first, so it is checked before any loading."""
    (tmp_path / "a-file").write_bytes(b"x")
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "vllm_layered.cli", "decompose", str(image), "--model",
                           str(tmp_path / "no-model"), *args], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.startswith(message), done.stderr
    assert "Traceback" not in done.stderr and time.monotonic() - start < 60


def test_stages_are_labelled_and_keep_size_gives_the_input_size(tiny_checkpoint, tmp_path):
    image = tmp_path / "wide.png"
    Image.new("RGB", (300, 200), (200, 10, 10)).save(image)
    done = cli("decompose", str(image), "--model", str(tiny_checkpoint), "--layers", "2", "--steps", "2",
               "--keep-size", "--out", str(tmp_path / "out"))  # no prompt: the model captions the image
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    order = ["load ...", "caption ...", "denoise", "decode 2 layers ...", f"write {tmp_path / 'out'} ..."]
    positions = [next(i for i, line in enumerate(lines) if line.startswith(label)) for label in order]
    assert positions == sorted(positions), done.stderr
    assert f"model: {tiny_checkpoint} on cpu, float32" in lines
    assert "size: the input is 300x200; decomposed at the 640 bucket, 768x512; layers resized back to 300x200" in lines
    sizes = {Image.open(tmp_path / "out" / name).size for name in ("layer_00.png", "layer_01.png", "composite.png")}
    assert sizes == {(300, 200)}


@pytest.mark.slow
def test_the_readme_main_command_on_a_fresh_cache(tmp_path):
    """`vllm-layered decompose photo.png --out layers/`, nothing else: the embedded model is written, the
    image captioned, 10 steps (said in the output), RGBA layers and a composite."""
    image = tmp_path / "photo.png"
    Image.new("RGB", (300, 200), (200, 10, 10)).save(image)
    env = {**os.environ, "VLLM_LAYERED_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-m", "vllm_layered.cli", "decompose", "photo.png", "--out", "layers/"],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "no --model: the embedded tiny random model, 10 steps" in done.stderr
    assert f"first use: writing it to {tmp_path / 'cache' / 'tiny-qwen-image-layered'}" in done.stderr
    assert "caption: " in done.stderr and "10/10" in done.stderr
    assert ("size: the input is 300x200; layers come at the 640 bucket, 768x512 (as in the official app); "
            "--keep-size resizes them to 300x200") in done.stderr.splitlines()
    names = ["layer_00.png", "layer_01.png", "layer_02.png", "layer_03.png", "composite.png"]
    assert done.stdout.split() == [os.path.join("layers", name) for name in names]
    assert {(Image.open(tmp_path / "layers" / name).mode, Image.open(tmp_path / "layers" / name).size)
            for name in names} == {("RGBA", (768, 512))}


def test_bad_input_is_a_clear_error_not_a_traceback(tiny_checkpoint, tmp_path):
    bogus = tmp_path / "not-an-image.png"
    bogus.write_bytes(b"hello")
    done = cli("decompose", str(bogus), "--model", str(tiny_checkpoint), "--steps", "1", "--quiet")
    assert done.returncode == 2
    assert done.stderr.startswith("error: data is not an image") and "Traceback" not in done.stderr
    good = tmp_path / "good.png"
    Image.new("RGBA", (32, 32)).save(good)
    done = cli("decompose", str(good), "--model", str(tiny_checkpoint), "--layers", "21", "--quiet")
    assert done.returncode == 2 and done.stderr == "error: layers must be between 1 and 20, got 21\n"
    done = cli("decompose", str(good), "--steps", "0", "--quiet")  # 0 is not "the default"
    assert done.returncode == 2 and done.stderr == "error: num_inference_steps must be between 1 and 1000, got 0\n"


@NO_CUDA
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--quantization", "fp8"], "error: --quantization fp8: GPU only, and this run is on the CPU "
                                    "(no CUDA GPU is visible)\n"),
        (["--cfg-parallel", "--sp-degree", "2"], "error: --cfg-parallel, --sp-degree 2: GPU only, and this run is "
                                                 "on the CPU (no CUDA GPU is visible)\n"),
        (["--device", "cpu", "--sp-degree", "2"], "error: --sp-degree 2: GPU only, and this run is on the CPU "
                                                  "(--device cpu)\n"),
        (["--device", "gpu"], "error: --device gpu: Expected one of"),
    ],
)
def test_gpu_only_flags_are_refused_on_the_cpu(image, tmp_path, args, message):
    done = cli("decompose", str(image), "--model", str(tmp_path / "no-model"), *args, timeout=120)
    assert done.returncode == 2 and done.stderr.startswith(message), done.stderr


@NO_CUDA
def test_device_cuda_without_a_gpu(image, tmp_path):
    for command in (["decompose", str(image)], ["serve"]):
        done = cli(*command, "--model", str(tmp_path / "no-model"), "--device", "cuda", timeout=120)
        assert done.returncode == 2
        assert done.stderr.startswith("error: --device cuda: no CUDA GPU is visible (torch "), done.stderr
        assert done.stderr.endswith("leave --device out to run on the CPU\n")


def test_parallel_flags_make_the_parallel_config():
    from vllm_layered.cli import build_parser
    from vllm_layered.model_args import parallel_config
    from vllm_layered.model_executor.parallel import ParallelConfig

    for command in (["serve"], ["decompose", "in.png"]):
        args = build_parser().parse_args([*command, "--cfg-parallel", "--sp-degree", "2"])
        assert parallel_config(args) == ParallelConfig(cfg_degree=2, sp_degree=2)
        assert parallel_config(build_parser().parse_args(command)).world_size == 1


def test_step_order_flag():
    from vllm_layered.cli import build_parser

    assert build_parser().parse_args(["serve"]).step_order == "srpt"
    assert build_parser().parse_args(["serve", "--step-order", "fcfs"]).step_order == "fcfs"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--step-order", "lifo"])


def _subparsers(parser: argparse.ArgumentParser, path=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*path, name), sub
                yield from _subparsers(sub, (*path, name))


def test_every_option_says_what_it_does_and_its_default():
    """Each option has a help text, and its --help shows the default (or the text says what happens)."""
    from vllm_layered.cli import build_parser

    checked = 0
    for path, parser in _subparsers(build_parser()):
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            assert action.help, f"{' '.join(path)} {action.dest}: no help"
            text = formatter._get_help_string(action)
            if action.option_strings and not action.required and not isinstance(action, argparse._StoreTrueAction):
                assert "default" in text, f"{' '.join(path)} {action.dest}: {text}"
            checked += 1
    assert checked > 50
    help_text = cli("decompose", "--help", timeout=120).stdout
    assert "RGBA layers to split the image into, 1-20 (default: 4)" in " ".join(help_text.split())


def test_bench_defaults_are_small_enough_for_a_cpu():
    from vllm_layered.cli import build_parser

    args = build_parser().parse_args(["bench", "serve", "--base-url", "http://x"])
    assert (args.num_requests, args.steps, args.layers) == (10, 10, "2-8")


def test_make_tiny_checkpoint_names_the_flag(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "file").write_text("x")
    done = cli("make-tiny-checkpoint", str(tmp_path / "full"), timeout=120)
    assert done.returncode == 2 and "pass --overwrite" in done.stderr and "Traceback" not in done.stderr


def test_the_package_exports_the_pipeline_lazily():
    code = (
        "import sys, vllm_layered, vllm_layered.cli\n"
        "vllm_layered.cli.build_parser().parse_args(['decompose', 'x.png'])\n"
        "assert 'torch' not in sys.modules, 'parsing imported torch'\n"
        "from vllm_layered import LayeredPipeline, LayeredOutput, GenerationParams\n"
        "from vllm_layered.model_executor.pipeline import LayeredPipeline as deep\n"
        "assert LayeredPipeline is deep and 'LayeredPipeline' in dir(vllm_layered)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
