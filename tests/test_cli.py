"""The decompose command end to end on the tiny model, and its error path."""

import subprocess
import sys

import pytest
from PIL import Image
from psd_tools import PSDImage


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "vllm_layered.cli", *args], capture_output=True, text=True,
                          timeout=600, env=env)


def test_decompose_writes_pngs_and_psd(tiny_checkpoint, tmp_path):
    image = tmp_path / "in.png"
    Image.new("RGBA", (96, 64), (20, 120, 200, 255)).save(image)
    common = ["decompose", str(image), "--model", str(tiny_checkpoint), "--layers", "2", "--steps", "1",
              "--prompt", "a blue card", "--quiet"]
    done = cli(*common, "--out", str(tmp_path / "layers"))
    assert done.returncode == 0, done.stderr
    names = sorted(p.name for p in (tmp_path / "layers").iterdir())
    assert names == ["composite.png", "layer_00.png", "layer_01.png"]
    assert Image.open(tmp_path / "layers" / "layer_00.png").mode == "RGBA"
    done = cli(*common, "--format", "psd", "--out", str(tmp_path / "stack.psd"))
    assert done.returncode == 0, done.stderr
    assert len(list(PSDImage.open(tmp_path / "stack.psd"))) == 2


def test_decompose_runs_on_the_embedded_default_model(tmp_path, monkeypatch):
    import os

    image = tmp_path / "in.png"
    Image.new("RGB", (64, 64), (200, 10, 10)).save(image)
    env = {**os.environ, "VLLM_LAYERED_CACHE": str(tmp_path / "cache")}
    done = cli("decompose", str(image), "--layers", "1", "--steps", "1", "--prompt", "red", "--quiet",
               "--out", str(tmp_path / "out"), env=env)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "layer_00.png").is_file()


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


def test_parallel_flags_make_the_parallel_config():
    from vllm_layered.cli import build_parser, parallel_config
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


def test_sp_degree_that_does_not_divide_the_heads_is_refused_before_loading(tiny_checkpoint, tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGBA", (32, 32)).save(good)
    done = cli("decompose", str(good), "--model", str(tiny_checkpoint), "--sp-degree", "3", "--quiet")
    assert done.returncode == 2
    assert done.stderr == "error: sp_degree 3 must divide the 2 attention heads\n"
