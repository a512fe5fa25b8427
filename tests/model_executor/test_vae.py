"""RGBAVAE against diffusers' AutoencoderKLQwenImage (4 channels) on tiny random checkpoints."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.reference import import_reference
from vllm_layered.model_executor.model_loader.weight_loader import WeightLoadError
from vllm_layered.model_executor.models.vae import RGBAVAE, CausalConv3d, VAEConfig

AutoencoderKLQwenImage = import_reference().AutoencoderKLQwenImage
QwenImageCausalConv3d = import_reference("diffusers.models.autoencoders.autoencoder_kl_qwenimage").QwenImageCausalConv3d

WEIGHTS = "diffusion_pytorch_model.safetensors"

TINY_CONFIGS = {
    # The released layout (dim_mult, temporal flags, no attention in the stages) at base_dim 8.
    "released_layout": dict(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=2,
        attn_scales=[],
        temperal_downsample=[False, True, True],
        input_channels=4,
        latents_mean=[0.1, -0.2, 0.3, 0.5],
        latents_std=[1.5, 2.0, 0.7, 1.1],
    ),
    # One res block per stage and Wan's temporal flags: other block indices and time_conv places.
    "one_res_block": dict(
        base_dim=8,
        z_dim=16,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=1,
        attn_scales=[],
        temperal_downsample=[True, True, False],
        input_channels=4,
        latents_mean=[0.05 * i - 0.4 for i in range(16)],
        latents_std=[0.5 + 0.1 * i for i in range(16)],
    ),
}


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Fill every parameter with non-zero random values of a sane scale (gammas near 1, small biases)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("gamma"):
                value = torch.empty(param.shape).uniform_(0.5, 1.5, generator=gen)
            elif name.endswith("bias"):
                value = torch.randn(param.shape, generator=gen) * 0.1
            else:
                fan_in = param[0].numel() // (param.shape[2] if param.ndim == 5 else 1)
                value = torch.randn(param.shape, generator=gen) / fan_in**0.5
            param.copy_(value.masked_fill_(value == 0, 0.5))  # randn can return an exact 0.0


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def pair(request, tmp_path_factory) -> tuple[AutoencoderKLQwenImage, RGBAVAE, Path]:
    ref = AutoencoderKLQwenImage(**TINY_CONFIGS[request.param]).eval()
    _randomise(ref, seed=len(request.param))
    folder = tmp_path_factory.mktemp(f"vae_{request.param}")
    ref.save_pretrained(folder)
    ours = RGBAVAE.from_pretrained(folder, device="cpu", dtype=torch.float32)
    return ref, ours, folder


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("size", [(48, 80), (64, 64)])
def test_encode_matches_diffusers_mode(pair, size):
    ref, ours, _ = pair
    x = torch.rand(2, 4, *size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        want = ref.encode(x[:, :, None]).latent_dist.mode()[:, :, 0]
    got = ours.encode(x)
    assert got.shape == (2, ours.config.z_dim, size[0] // 8, size[1] // 8)
    assert _rel(got, want) < 1e-5


@pytest.mark.parametrize("size", [(48, 80), (64, 64)])
def test_decode_matches_diffusers(pair, size):
    ref, ours, _ = pair
    z = torch.randn(2, ours.config.z_dim, size[0] // 8, size[1] // 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ref.decode(z[:, :, None]).sample[:, :, 0]
    got = ours.decode(z)
    assert got.shape == (2, 4, *size)
    # The reference clamps its output to [-1, 1]; the comparison must not be all saturated values.
    assert got.abs().max() <= 1.0
    assert (want.abs() < 1.0).float().mean() > 0.5
    assert _rel(got, want) < 1e-5


def test_decode_batch_chunks_equal_one_pass(pair):
    _, ours, _ = pair
    z = torch.randn(5, ours.config.z_dim, 4, 6, generator=torch.Generator().manual_seed(3))
    full = ours.decode(z)
    for batch_size in (1, 2, 5, 8):
        # CPU conv kernels may pick a different summation order per batch size: equal up to rounding.
        assert _rel(ours.decode(z, batch_size=batch_size), full) < 1e-5
    with pytest.raises(ValueError, match="batch_size"):
        ours.decode(z, batch_size=0)


def test_parameters_equal_diffusers_state_dict(pair):
    ref, ours, _ = pair
    want = {name: tuple(t.shape) for name, t in ref.state_dict().items()}
    got = {name: tuple(t.shape) for name, t in ours.state_dict().items()}
    assert got == want
    assert any(name.endswith("time_conv.weight") and len(shape) == 5 for name, shape in got.items())


def test_bfloat16_load_runs_close_to_float32(pair):
    _, ours, folder = pair
    ours16 = RGBAVAE.from_pretrained(folder, device="cpu", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in ours16.parameters())
    x = torch.rand(1, 4, 32, 48, generator=torch.Generator().manual_seed(4)) * 2 - 1
    z = ours.encode(x)
    z16 = ours16.encode(x.bfloat16())
    assert z16.dtype == torch.bfloat16 and _rel(z16.float(), z) < 5e-2
    assert _rel(ours16.decode(z.bfloat16()).float(), ours.decode(z)) < 5e-2


@pytest.mark.parametrize(
    ("kernel", "padding"), [((3, 3, 3), (1, 1, 1)), ((1, 1, 1), (0, 0, 0)), ((3, 1, 1), (1, 0, 0))]
)
def test_single_frame_causal_conv_is_last_kernel_slice(kernel, padding):
    gen = torch.Generator().manual_seed(5)
    ref = QwenImageCausalConv3d(6, 5, kernel, padding=padding)
    ours = CausalConv3d(6, 5, kernel, padding=padding[1])
    with torch.no_grad():
        ref.weight.copy_(torch.randn(ref.weight.shape, generator=gen))
        ref.bias.copy_(torch.randn(ref.bias.shape, generator=gen))
        ours.load_state_dict(ref.state_dict())
        x = torch.randn(2, 6, 7, 9, generator=gen)
        want = ref(x[:, :, None])[:, :, 0]
        got = ours(x)
    assert got.shape == want.shape
    assert _rel(got, want) < 1e-6


def _tampered_copy(folder: Path, dest: Path, edit) -> Path:
    dest.mkdir()
    shutil.copy(folder / "config.json", dest / "config.json")
    tensors = load_file(str(folder / WEIGHTS))
    edit(tensors)
    save_file(tensors, str(dest / WEIGHTS))
    return dest


def test_missing_tensor_is_named(pair, tmp_path):
    _, _, folder = pair
    name = "decoder.up_blocks.1.upsamplers.0.time_conv.weight"
    bad = _tampered_copy(folder, tmp_path / "bad", lambda t: t.pop(name))
    with pytest.raises(WeightLoadError, match=name.replace(".", r"\.")):
        RGBAVAE.from_pretrained(bad, device="cpu", dtype=torch.float32)


def test_unexpected_tensor_is_named(pair, tmp_path):
    _, _, folder = pair

    def add(tensors):
        tensors["encoder.extra.weight"] = torch.ones(3)

    bad = _tampered_copy(folder, tmp_path / "bad", add)
    with pytest.raises(WeightLoadError, match=r"encoder\.extra\.weight"):
        RGBAVAE.from_pretrained(bad, device="cpu", dtype=torch.float32)


def test_misshaped_tensor_names_both_shapes(pair, tmp_path):
    _, ours, folder = pair
    name = "encoder.conv_in.weight"
    want_shape = tuple(ours.state_dict()[name].shape)
    bad_shape = (want_shape[0], 3, *want_shape[2:])

    def reshape(tensors):
        tensors[name] = torch.ones(bad_shape)

    bad = _tampered_copy(folder, tmp_path / "bad", reshape)
    with pytest.raises(WeightLoadError) as err:
        RGBAVAE.from_pretrained(bad, device="cpu", dtype=torch.float32)
    message = str(err.value)
    assert name in message and str(bad_shape) in message and str(want_shape) in message


def test_load_weights_reports_every_name(pair):
    _, ours, folder = pair
    with torch.device("meta"):
        fresh = RGBAVAE(config=ours.config)
    tensors = load_file(str(folder / WEIGHTS))
    assert fresh.load_weights(tensors.items()) == set(tensors)
    with pytest.raises(WeightLoadError, match="lacks"):
        RGBAVAE(config=ours.config).load_weights(list(tensors.items())[1:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_latent_normalisation_matches_pipeline_formula(pair, dtype):
    ref, ours, _ = pair
    z_dim = ref.config.z_dim
    z = (torch.randn(2, z_dim, 3, 4, 5, generator=torch.Generator().manual_seed(6)) * 3).to(dtype)
    # QwenImageLayeredPipeline._encode_vae_image: (z - mean) / std with both cast to z's dtype.
    mean = torch.tensor(ref.config.latents_mean).view(1, z_dim, 1, 1, 1).to(z.device, z.dtype)
    std = torch.tensor(ref.config.latents_std).view(1, z_dim, 1, 1, 1).to(z.device, z.dtype)
    want_norm = (z - mean) / std
    # QwenImageLayeredPipeline.__call__: the reciprocal is taken after the cast.
    inv_std = 1.0 / torch.tensor(ref.config.latents_std).view(1, z_dim, 1, 1, 1).to(z.device, z.dtype)
    want_denorm = z / inv_std + mean
    tol = 1e-6 if dtype == torch.float32 else 0.0
    for got, want in ((ours.normalize_latents(z), want_norm), (ours.denormalize_latents(z), want_denorm)):
        assert got.dtype == dtype
        assert (got.float() - want.float()).abs().max().item() <= tol
    # 4-D (one frame per item) broadcasts on the channel dim too.
    torch.testing.assert_close(ours.normalize_latents(z[:, :, 0]), want_norm[:, :, 0], rtol=0, atol=tol)
    round_trip = ours.denormalize_latents(ours.normalize_latents(z.float()))
    torch.testing.assert_close(round_trip, z.float(), rtol=1e-5, atol=1e-5)


def test_config_from_json(tmp_path):
    path = tmp_path / "config.json"
    raw = {"_class_name": "AutoencoderKLQwenImage", "_diffusers_version": "0.36.0"}
    raw.update(TINY_CONFIGS["released_layout"])
    path.write_text(json.dumps(raw))
    config = VAEConfig.from_json(path)
    assert config.dim_mult == (1, 2, 4, 4) and config.temperal_downsample == (False, True, True)
    assert config.input_channels == 4 and config.spatial_factor == 8
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.z_dim = 8  # type: ignore[misc]

    path.write_text(json.dumps({**raw, "use_magic": True}))
    with pytest.raises(ValueError, match="use_magic"):
        VAEConfig.from_json(path)


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"base_dim": 0}, "base_dim"),
        ({"z_dim": 2.5}, "z_dim"),
        ({"dim_mult": []}, "dim_mult"),
        ({"num_res_blocks": 0}, "num_res_blocks"),
        ({"temperal_downsample": [False, True]}, "temperal_downsample"),
        ({"temperal_downsample": [0, 1, 1]}, "temperal_downsample"),
        ({"attn_scales": [1.0]}, "attn_scales"),
        ({"dropout": 1.5}, "dropout"),
        ({"latents_mean": [0.0, 1.0]}, "latents_mean"),
        ({"latents_std": [1.0, 0.0, 1.0, 1.0]}, "latents_std"),
        ({"input_channels": True}, "input_channels"),
    ],
)
def test_config_rejects_what_cannot_run(override, field):
    with pytest.raises(ValueError, match=field):
        VAEConfig(**{**TINY_CONFIGS["released_layout"], **override})


def test_bad_inputs_raise_value_error(pair):
    _, ours, _ = pair
    with pytest.raises(ValueError, match="single frames"):
        ours.encode(torch.zeros(1, 4, 1, 16, 16))
    with pytest.raises(ValueError, match="single frames"):
        ours.encode(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="divisible by 8"):
        ours.encode(torch.zeros(1, 4, 20, 16))
    with pytest.raises(ValueError, match="single frames"):
        ours.decode(torch.zeros(1, ours.config.z_dim + 1, 2, 2))
    with pytest.raises(ValueError, match="channels"):
        ours.normalize_latents(torch.zeros(1, ours.config.z_dim + 1, 2, 2))
