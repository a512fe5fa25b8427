"""The sigma schedule, Euler step, CFG and latent packing against diffusers' scheduler and pipeline."""

import numpy as np
import pytest
import torch

from tests.reference import import_reference
from vllm_layered.model_executor.latents import pack_latents, unpack_latents
from vllm_layered.model_executor.sampler import (
    NoiseScheduleConfig,
    combine_cfg,
    euler_step,
    layered_mu,
    sigma_schedule,
)

diffusers = import_reference()
FlowMatchEulerDiscreteScheduler = diffusers.FlowMatchEulerDiscreteScheduler
QwenImageLayeredPipeline = diffusers.QwenImageLayeredPipeline

CONFIGS = [
    dict(use_dynamic_shifting=True, time_shift_type="linear"),
    dict(use_dynamic_shifting=True, time_shift_type="exponential", shift_terminal=0.02),
    dict(use_dynamic_shifting=False, shift=3.0),
]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("steps", [1, 2, 7, 50])
@pytest.mark.parametrize("condition_tokens", [40 * 40, 64 * 64, 30 * 52])
def test_schedule_matches_diffusers(config, steps, condition_tokens):
    ref = FlowMatchEulerDiscreteScheduler(**config)
    mu = layered_mu(condition_tokens)
    ref.set_timesteps(sigmas=np.linspace(1.0, 0, steps + 1)[:-1], mu=mu)
    ours = sigma_schedule(NoiseScheduleConfig(**config), steps, mu)
    if steps == 1 and config.get("shift_terminal"):  # the reference divides by zero here and returns NaN
        assert torch.equal(ours, torch.tensor([1.0, 0.0]))
        return
    torch.testing.assert_close(ours, ref.sigmas, rtol=0, atol=1e-7)


def test_mu_at_the_two_buckets():
    assert layered_mu(40 * 40) == pytest.approx(2.5)
    assert layered_mu(64 * 64) == pytest.approx(4.0)


def test_euler_step_matches_diffusers():
    ref = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="linear")
    ref.set_timesteps(sigmas=np.linspace(1.0, 0, 5)[:-1], mu=2.5)
    gen = torch.Generator().manual_seed(0)
    x, v = torch.randn(2, 30, 64, generator=gen), torch.randn(2, 30, 64, generator=gen)
    for i, t in enumerate(ref.timesteps):
        expected = ref.step(v, t, x, return_dict=False)[0]
        got = euler_step(x, v, ref.sigmas[i].item(), ref.sigmas[i + 1].item())
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
        x = expected


@pytest.mark.parametrize("normalize", [False, True])
def test_cfg_combination(normalize):
    gen = torch.Generator().manual_seed(1)
    cond, uncond = torch.randn(7, 64, generator=gen), torch.randn(7, 64, generator=gen)
    comb = combine_cfg(cond, uncond, 4.0, normalize)
    expected = uncond + 4.0 * (cond - uncond)
    if normalize:
        expected = expected * cond.norm(dim=-1, keepdim=True) / expected.norm(dim=-1, keepdim=True)
        torch.testing.assert_close(comb.norm(dim=-1), cond.norm(dim=-1))
    torch.testing.assert_close(comb, expected)


@pytest.mark.parametrize("frames,h,w", [(1, 4, 6), (5, 10, 8), (3, 2, 2)])
def test_packing_matches_reference_and_roundtrips(frames, h, w):
    z = torch.randn(frames, 16, h, w)
    packed = pack_latents(z)
    ref = QwenImageLayeredPipeline._pack_latents(z[None], 1, 16, h, w, frames)[0]
    assert torch.equal(packed, ref)
    assert torch.equal(unpack_latents(packed, frames, h // 2, w // 2), z)
    ref_unpacked = QwenImageLayeredPipeline._unpack_latents(packed[None], h * 8, w * 8, frames - 1, 8)[0]
    assert torch.equal(ref_unpacked.permute(1, 0, 2, 3), z)


def test_bad_schedule_inputs():
    with pytest.raises(ValueError, match="at least 1"):
        sigma_schedule(NoiseScheduleConfig(), 0, 2.5)
    with pytest.raises(ValueError, match="time_shift_type"):
        NoiseScheduleConfig(time_shift_type="cosine")
