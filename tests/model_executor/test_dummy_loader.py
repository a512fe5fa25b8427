"""--load-format dummy: the folder's configs with seeded random weights, no weight file read."""

import json
import shutil

import pytest
import torch

from vllm_layered.model_executor.model_loader.dummy_checkpoint import full_size_model_folder
from vllm_layered.model_executor.models.transformer import LayeredTransformer, TransformerConfig
from vllm_layered.model_executor.models.vae import VAEConfig
from vllm_layered.model_executor.pipeline import LayeredPipeline


def _state(pipe: LayeredPipeline) -> dict[str, torch.Tensor]:
    state = {f"transformer.{k}": v for k, v in pipe.transformer.state_dict().items()}
    state.update({f"vae.{k}": v for k, v in pipe.vae.state_dict().items()})
    state.update({f"text.{k}": v for k, v in pipe.prompt_encoder.model.named_parameters()})
    return state


def test_dummy_weights_equal_the_tiny_checkpoint_of_the_same_seed(tiny_checkpoint, tmp_path):
    """The tiny checkpoint was drawn by the same seeded generator: dummy loading of its configs alone
    (weights deleted) rebuilds it tensor for tensor."""
    loaded = _state(LayeredPipeline.from_pretrained(tiny_checkpoint, device="cpu", dtype=torch.float32))
    configs_only = tmp_path / "configs"
    shutil.copytree(tiny_checkpoint, configs_only, ignore=shutil.ignore_patterns("*.safetensors*"))
    dummy = _state(LayeredPipeline.from_pretrained(configs_only, device="cpu", dtype=torch.float32,
                                                   load_format="dummy"))
    assert dummy.keys() == loaded.keys()
    for name, tensor in loaded.items():
        assert torch.equal(dummy[name], tensor), name


def test_a_config_only_folder_needs_dummy_loading(tiny_checkpoint, tmp_path):
    configs_only = tmp_path / "configs"
    shutil.copytree(tiny_checkpoint, configs_only, ignore=shutil.ignore_patterns("*.safetensors*"))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        LayeredPipeline.from_pretrained(configs_only, device="cpu", dtype=torch.float32)


def test_unknown_load_format_is_refused_before_loading(tiny_checkpoint):
    with pytest.raises(ValueError, match="load format 'pt'"):
        LayeredPipeline.from_pretrained(tiny_checkpoint, device="cpu", load_format="pt")


def test_full_size_folder_has_the_released_geometry(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_LAYERED_CACHE", str(tmp_path))
    folder = full_size_model_folder()
    assert TransformerConfig.from_json(folder / "transformer" / "config.json") == TransformerConfig()
    assert VAEConfig.from_json(folder / "vae" / "config.json").base_dim == 96
    text = json.loads((folder / "text_encoder" / "config.json").read_text())["text_config"]
    assert (text["hidden_size"], text["num_hidden_layers"]) == (3584, 28)
    with torch.device("meta"):
        model = LayeredTransformer(config=TransformerConfig.from_json(folder / "transformer" / "config.json"))
    assert 20.3e9 < sum(p.numel() for p in model.parameters()) < 20.5e9
    assert full_size_model_folder() == folder  # written once, then reused
