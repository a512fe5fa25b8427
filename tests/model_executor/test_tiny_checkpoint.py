"""The tiny random checkpoint: official layout, loadable by diffusers/transformers, deterministic."""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.reference import import_reference
from vllm_layered.model_executor.model_loader import tiny_checkpoint as tiny

diffusers = import_reference()

EXPECTED_FILES = {
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/generation_config.json",
    "text_encoder/model.safetensors",
    "tokenizer/chat_template.jinja",
    "tokenizer/tokenizer.json",
    "tokenizer/tokenizer_config.json",
    "processor/chat_template.jinja",
    "processor/preprocessor_config.json",
    "processor/tokenizer.json",
    "processor/tokenizer_config.json",
    "processor/video_preprocessor_config.json",
    "transformer/config.json",
    "transformer/diffusion_pytorch_model-00001-of-00002.safetensors",
    "transformer/diffusion_pytorch_model-00002-of-00002.safetensors",
    "transformer/diffusion_pytorch_model.safetensors.index.json",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
}


def _read_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})
    return tensors


def _component_tensors(root: Path, component: str) -> dict[str, torch.Tensor]:
    folder = root / component
    if component == "transformer":
        index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())
        return _read_tensors([folder / name for name in sorted(set(index["weight_map"].values()))])
    return _read_tensors([folder / "diffusion_pytorch_model.safetensors"])


def _torchvision_importable() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:
        return False
    return True


def test_exact_layout(tiny_checkpoint: Path) -> None:
    files = {str(p.relative_to(tiny_checkpoint)) for p in tiny_checkpoint.rglob("*") if p.is_file()}
    assert files == EXPECTED_FILES
    size = sum((tiny_checkpoint / f).stat().st_size for f in files)
    assert size < 8 * 2**20, size


def test_model_index(tiny_checkpoint: Path) -> None:
    index = json.loads((tiny_checkpoint / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImageLayeredPipeline"
    assert index["_diffusers_version"]
    assert {k: v for k, v in index.items() if not k.startswith("_")} == {
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
        "tokenizer": ["transformers", "Qwen2Tokenizer"],
        "processor": ["transformers", "Qwen2VLProcessor"],
        "transformer": ["diffusers", "QwenImageTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKLQwenImage"],
    }


@pytest.mark.parametrize(
    "component, cls_name",
    [
        ("transformer", "QwenImageTransformer2DModel"),
        ("vae", "AutoencoderKLQwenImage"),
        ("scheduler", "FlowMatchEulerDiscreteScheduler"),
    ],
)
def test_configs_have_exactly_the_diffusers_keys(tiny_checkpoint: Path, component: str, cls_name: str) -> None:
    cls = getattr(diffusers, cls_name)
    name = "scheduler_config.json" if component == "scheduler" else "config.json"
    config = json.loads((tiny_checkpoint / component / name).read_text())
    assert config["_class_name"] == cls_name
    init_keys = set(inspect.signature(cls.__init__).parameters) - {"self"}
    assert {k for k in config if not k.startswith("_")} == init_keys


def test_transformer_and_text_encoder_sizes_agree(tiny_checkpoint: Path) -> None:
    transformer = json.loads((tiny_checkpoint / "transformer/config.json").read_text())
    assert transformer["use_layer3d_rope"] and transformer["use_additional_t_cond"]
    assert not transformer["zero_cond_t"] and not transformer["guidance_embeds"]
    assert sum(transformer["axes_dims_rope"]) == transformer["attention_head_dim"]
    text = json.loads((tiny_checkpoint / "text_encoder/config.json").read_text())["text_config"]
    assert text["hidden_size"] == transformer["joint_attention_dim"]
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    assert sum(text["rope_parameters"]["mrope_section"]) == head_dim // 2
    vae = json.loads((tiny_checkpoint / "vae/config.json").read_text())
    assert vae["input_channels"] == 4 and vae["z_dim"] == 16 and vae["base_dim"] == 8
    assert len(vae["latents_mean"]) == len(vae["latents_std"]) == 16
    assert set(vae["latents_mean"]) != {0.0} and set(vae["latents_std"]) != {1.0}


def test_transformer_shard_index_is_consistent(tiny_checkpoint: Path) -> None:
    folder = tiny_checkpoint / "transformer"
    index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == [f"diffusion_pytorch_model-0000{i}-of-00002.safetensors" for i in (1, 2)]
    total = 0
    for shard in shards:
        with safe_open(str(folder / shard), framework="pt") as f:
            names = set(f.keys())
            total += sum(f.get_tensor(n).numel() * 4 for n in names)
        assert names == {n for n, s in index["weight_map"].items() if s == shard}
    assert index["metadata"]["total_size"] == total


@pytest.mark.parametrize(
    "component, cls_name",
    [("transformer", "QwenImageTransformer2DModel"), ("vae", "AutoencoderKLQwenImage")],
)
def test_tensor_names_and_shapes_equal_diffusers(tiny_checkpoint: Path, component: str, cls_name: str) -> None:
    cls = getattr(diffusers, cls_name)
    with torch.device("meta"):
        reference = cls.from_config(cls.load_config(tiny_checkpoint / component))
    expected = {name: tuple(t.shape) for name, t in reference.state_dict().items()}
    tensors = _component_tensors(tiny_checkpoint, component)
    assert {name: tuple(t.shape) for name, t in tensors.items()} == expected
    assert all(t.dtype == torch.float32 for t in tensors.values())


def test_value_recipe(tiny_checkpoint: Path) -> None:
    tensors = _component_tensors(tiny_checkpoint, "transformer")
    assert tensors["img_in.bias"].abs().max() < 0.1
    assert (tensors["txt_norm.weight"] - 1).abs().max() < 0.6
    assert 0.8 < tensors["time_text_embed.addition_t_embedding.weight"].std() < 1.2
    ffn = tensors["transformer_blocks.0.img_mlp.net.2.weight"]  # fan_in 256
    assert 0.8 < ffn.std() * 16 < 1.2
    vae = _component_tensors(tiny_checkpoint, "vae")
    gamma = vae["decoder.norm_out.gamma"]
    assert gamma.shape[1:] == (1, 1, 1) and (gamma - 1).abs().max() < 0.6


def test_diffusers_pipeline_loads_the_folder(tiny_checkpoint: Path) -> None:
    """diffusers loads the folder as it is; without torchvision only the processor cannot load."""
    QwenImageLayeredPipeline = diffusers.QwenImageLayeredPipeline

    if _torchvision_importable():
        pipe = QwenImageLayeredPipeline.from_pretrained(tiny_checkpoint, torch_dtype=torch.float32)
        assert type(pipe.processor).__name__ == "Qwen2VLProcessor"
    else:
        with pytest.raises(ImportError, match="(?i)torchvision"):
            QwenImageLayeredPipeline.from_pretrained(tiny_checkpoint, torch_dtype=torch.float32)
        pipe = QwenImageLayeredPipeline.from_pretrained(tiny_checkpoint, processor=None, torch_dtype=torch.float32)
    assert type(pipe.text_encoder).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert type(pipe.tokenizer).__name__ == "Qwen2Tokenizer"
    assert pipe.scheduler.config.use_dynamic_shifting and pipe.scheduler.config.time_shift_type == "linear"
    assert pipe.scheduler.config.shift_terminal is None
    for component in ("transformer", "vae"):
        loaded = getattr(pipe, component).state_dict()
        for name, tensor in _component_tensors(tiny_checkpoint, component).items():
            assert torch.equal(loaded[name], tensor), name


def test_tokenizer(tiny_checkpoint: Path) -> None:
    from transformers import AutoTokenizer, Qwen2Tokenizer

    for folder in ("tokenizer", "processor"):
        tokenizer = Qwen2Tokenizer.from_pretrained(tiny_checkpoint / folder)
        auto = AutoTokenizer.from_pretrained(tiny_checkpoint / folder)
        assert type(auto) is type(tokenizer)
        for token in tiny.SPECIAL_TOKENS:
            assert tokenizer.convert_ids_to_tokens(tokenizer.convert_tokens_to_ids(token)) == token
        prefix = (
            "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, "
            "text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n"
        )
        assert len(tokenizer(prefix).input_ids) == 34  # as with the real Qwen tokenizer
        text = "A red cat, 3 apples and «unseen» 文字"
        assert tokenizer.decode(tokenizer(text).input_ids) == text
        assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"


def test_text_encoder_uses_the_tokenizer_ids(tiny_checkpoint: Path) -> None:
    from transformers import AutoTokenizer, Qwen2_5_VLConfig

    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint / "tokenizer")
    config = Qwen2_5_VLConfig.from_pretrained(tiny_checkpoint / "text_encoder")
    assert config.text_config.vocab_size == len(tokenizer)
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert config.video_token_id == tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert config.vision_start_token_id == tokenizer.convert_tokens_to_ids("<|vision_start|>")
    assert config.vision_end_token_id == tokenizer.convert_tokens_to_ids("<|vision_end|>")
    assert config.text_config.num_hidden_layers == 1 and config.vision_config.depth == 1


def test_processor(tiny_checkpoint: Path) -> None:
    from transformers import Qwen2VLProcessor

    if not _torchvision_importable():  # Qwen2VLProcessor always builds its video processor: torchvision
        with pytest.raises(ImportError, match="(?i)torchvision"):
            Qwen2VLProcessor.from_pretrained(tiny_checkpoint / "processor")
        return
    processor = Qwen2VLProcessor.from_pretrained(tiny_checkpoint / "processor")
    assert processor.image_token == "<|image_pad|>" and processor.video_token == "<|video_pad|>"
    assert processor.image_processor.patch_size == 14 and processor.image_processor.merge_size == 2
    assert processor.chat_template


def test_same_seed_same_checkpoint_and_overwrite(tiny_checkpoint: Path, tmp_path: Path) -> None:
    path = tiny.make_tiny_checkpoint(tmp_path / "tiny", seed=0)
    for component in ("transformer", "vae"):
        ours, theirs = _component_tensors(path, component), _component_tensors(tiny_checkpoint, component)
        assert all(torch.equal(ours[n], theirs[n]) for n in theirs)
    text = _read_tensors([path / "text_encoder/model.safetensors"])
    reference_text = _read_tensors([tiny_checkpoint / "text_encoder/model.safetensors"])
    assert all(torch.equal(text[n], reference_text[n]) for n in reference_text)

    with pytest.raises(ValueError, match="not empty; to replace it pass --overwrite"):
        tiny.make_tiny_checkpoint(path)
    tiny.make_tiny_checkpoint(path, seed=1, overwrite=True)
    reseeded = _component_tensors(path, "transformer")
    assert not torch.equal(
        reseeded["img_in.weight"], _component_tensors(tiny_checkpoint, "transformer")["img_in.weight"]
    )
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]  # no temporary folder left behind


def test_refuses_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        tiny.make_tiny_checkpoint(tmp_path / "file")


def test_default_model_path_generates_once(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def copy_checkpoint(root: Path, seed: int) -> None:
        calls.append(seed)
        shutil.copytree(tiny_checkpoint, root, dirs_exist_ok=True)

    monkeypatch.setenv("VLLM_LAYERED_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tiny, "_write_checkpoint", copy_checkpoint)
    assert tiny.default_model_dir() == tmp_path / "cache" / "tiny-qwen-image-layered"
    announced = []
    path = tiny.default_model_path(on_write=announced.append)
    assert path == tiny.default_model_dir() and announced == [path]  # told before it is written
    assert (path / "model_index.json").is_file() and calls == [0]
    assert tiny.default_model_path(on_write=announced.append) == path and calls == [0] and announced == [path]
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["tiny-qwen-image-layered"]

    # a copy left by an older recipe is replaced
    stale = json.loads((path / "transformer/config.json").read_text()) | {"num_layers": 3}
    (path / "transformer/config.json").write_text(json.dumps(stale))
    assert tiny.default_model_path() == path and calls == [0, 0]
    assert json.loads((path / "transformer/config.json").read_text())["num_layers"] == 2
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["tiny-qwen-image-layered"]


def test_default_model_path_loses_the_race_gracefully(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process renames its copy into place first: ours is discarded, theirs is used."""
    final = tmp_path / "tiny-qwen-image-layered"

    def other_process_wins(root: Path, seed: int) -> None:
        shutil.copytree(tiny_checkpoint, final)
        (root / "model_index.json").write_text("{}")

    monkeypatch.setenv("VLLM_LAYERED_CACHE", str(tmp_path))
    monkeypatch.setattr(tiny, "_write_checkpoint", other_process_wins)
    assert tiny.default_model_path() == final
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-qwen-image-layered"]
