"""Per-request denoising state and the two halves of a denoising step around the transformer.

``build_forward_batch`` packs every active request (its conditional and, with CFG, unconditional
sequence) into one ForwardBatch; ``apply_velocity`` splits the transformer output back, combines
CFG and takes each request's own Euler step. The offline pipeline runs all requests in lock-step;
the serving engine picks a different subset each step. Both share this code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_layered.model_executor.forward_batch import ForwardBatch
from vllm_layered.model_executor.sampler import combine_cfg, euler_step, model_timestep
from vllm_layered.model_executor.sequence_layout import SequenceLayout


@dataclass
class DenoiseState:
    """What one request carries through the denoising loop.

    latents:          [noisy_tokens, 64] float32, kept in float32 between steps
    condition_tokens: [frame_tokens, 64] packed, normalised VAE latents of the input image
    prompt_embeds:    [T, joint_dim]; negative_embeds [T', joint_dim] or None (no CFG)
    sigmas:           [num_steps + 1] float32 schedule ending in 0
    modulation:       [num_layers, 2, num_steps, 6C] the transformer's modulation at each step
                      (LayeredTransformer.modulation_table), or None: each forward computes it
    """

    layers: int
    height: int
    width: int
    latents: torch.Tensor
    condition_tokens: torch.Tensor
    prompt_embeds: torch.Tensor
    negative_embeds: torch.Tensor | None
    sigmas: torch.Tensor
    true_cfg_scale: float = 1.0
    cfg_normalize: bool = False
    modulation: torch.Tensor | None = None
    step: int = 0

    @property
    def num_steps(self) -> int:
        return self.sigmas.numel() - 1

    @property
    def done(self) -> bool:
        return self.step >= self.num_steps

    @property
    def do_cfg(self) -> bool:
        return self.negative_embeds is not None

    @property
    def step_tokens(self) -> int:
        """Tokens this request adds to every forward (all its CFG branches)."""
        return sum(layout.total_tokens for layout in self.layouts())

    def layouts(self) -> list[SequenceLayout]:
        """The sequences this request adds to a forward: conditional, then unconditional with CFG."""
        texts = [self.prompt_embeds] + ([self.negative_embeds] if self.do_cfg else [])
        return [SequenceLayout(t.shape[0], self.layers, self.height, self.width) for t in texts]


def build_forward_batch(states: list[DenoiseState], dtype: torch.dtype) -> ForwardBatch:
    """The packed forward of every state's current step. Its modulation rows are gathered from the states' tables
    when every state has one (else the forward computes them)."""
    images, texts, sigmas, layouts, modulations = [], [], [], [], []
    for state in states:
        image = torch.cat([state.latents.to(dtype), state.condition_tokens.to(dtype)])
        sigma = state.sigmas[state.step]
        for layout, text in zip(state.layouts(), (state.prompt_embeds, state.negative_embeds)):
            images.append(image)
            texts.append(text.to(dtype))
            sigmas.append(sigma)
            layouts.append(layout)
            if state.modulation is not None:
                modulations.append(state.modulation[:, :, state.step])
    device = images[0].device
    # non_blocking: the host copy is staged at once; a blocking copy would wait here for the previous step's GPU
    # work, and the GPU would then idle while this step's first kernels are launched
    timesteps = model_timestep(torch.stack(sigmas), dtype).to(device, non_blocking=True)
    modulation = torch.stack(modulations, dim=2) if len(modulations) == len(layouts) else None
    return ForwardBatch(torch.cat(images), torch.cat(texts), timesteps, layouts, modulation=modulation)


def guided_velocities(states: list[DenoiseState], velocity: torch.Tensor) -> list[torch.Tensor]:
    """Split the packed transformer output per state and combine its CFG branches: [noisy_tokens, 64] each."""
    sizes = [layout.noisy_tokens for state in states for layout in state.layouts()]
    outputs = iter(velocity.split(sizes))
    guided = []
    for state in states:
        v = next(outputs)
        if state.do_cfg:
            v = combine_cfg(v, next(outputs), state.true_cfg_scale, state.cfg_normalize)
        guided.append(v)
    return guided


def advance(state: DenoiseState, velocity: torch.Tensor) -> None:
    """One Euler step of one state."""
    sigma, sigma_next = state.sigmas[state.step].item(), state.sigmas[state.step + 1].item()
    state.latents = euler_step(state.latents, velocity, sigma, sigma_next)
    state.step += 1


def apply_velocity(states: list[DenoiseState], velocity: torch.Tensor) -> None:
    """Advance every state by one Euler step given the packed transformer output."""
    for state, v in zip(states, guided_velocities(states, velocity)):
        advance(state, v)
