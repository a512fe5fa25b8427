"""build_forward_batch: the packed inputs of the running states' current steps."""

import torch

from vllm_layered.model_executor.denoise import DenoiseState, build_forward_batch
from vllm_layered.model_executor.sampler import model_timestep


def state(layers: int, step: int, cfg: bool, modulation: bool, steps: int = 5) -> DenoiseState:
    h, w = 2, 3
    frames = (layers + 1) * h * w
    return DenoiseState(
        layers=layers, height=h, width=w,
        latents=torch.randn(frames, 64), condition_tokens=torch.randn(h * w, 64),
        prompt_embeds=torch.randn(4, 8), negative_embeds=torch.randn(3, 8) if cfg else None,
        sigmas=torch.linspace(1, 0, steps + 1),
        modulation=torch.randn(2, 2, steps, 12) if modulation else None,
        step=step,
    )


def test_modulation_rows_follow_each_states_step_and_branch():
    states = [state(2, 1, cfg=True, modulation=True), state(1, 4, cfg=False, modulation=True)]
    batch = build_forward_batch(states, torch.float32)
    assert batch.num_sequences == 3
    expected = [states[0].modulation[:, :, 1]] * 2 + [states[1].modulation[:, :, 4]]  # both CFG branches: one row
    torch.testing.assert_close(batch.modulation, torch.stack(expected, dim=2))
    torch.testing.assert_close(batch.timesteps, model_timestep(torch.stack([states[0].sigmas[1]] * 2
                                                                            + [states[1].sigmas[4]]), torch.float32))


def test_a_state_without_a_table_leaves_the_modulation_to_the_forward():
    states = [state(2, 0, cfg=True, modulation=True), state(1, 2, cfg=True, modulation=False)]
    assert build_forward_batch(states, torch.float32).modulation is None
    assert build_forward_batch(states[1:], torch.float32).modulation is None
