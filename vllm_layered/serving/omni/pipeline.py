"""OmniLayeredPipeline: our LayeredPipeline behind vLLM-Omni's diffusion pipeline interfaces.

vLLM-Omni drives a pipeline in one of two ways:
- request mode: ``forward(DiffusionRequestBatch)`` runs whole requests;
- step mode (``step_execution``): ``prepare_encode(state)`` once per request, then every engine step
  ONE ``denoise_step(input_batch, states=...)`` over the running requests, ``step_scheduler(state,
  rows)`` per request and ``post_decode(state)`` when a request is done.

Both run our model executor: each request carries our DenoiseState (in ``state.extra``) and every
step is one packed transformer forward over all of them, whatever their layer counts, resolutions,
prompt lengths, timesteps and CFG settings. vLLM-Omni's InputBatch concatenates ``state.latents``
row-wise; ours are [noisy_tokens, 64] for every request, so requests of any shape share a batch, and
the velocity rows we return line up with them. vLLM-Omni's step scheduler batches requests whose
sampling key matches (size, CFG settings; ``layers`` is not part of it), so requests of different
layer counts share a step there.

A finished request's output is vLLM-Omni's output envelope: ``payload["image"]`` holds one list of
RGBA layers (bottom first), ``metadata[METADATA_KEY]`` what our server reports besides the layers
(the prompt used, i.e. the caption of an empty prompt, and the phase timings); our
``/v1/images/edits`` route (images_edits.py) reads both.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import nn
from vllm_omni.diffusion.data import DiffusionOutput, OmniDiffusionConfig
from vllm_omni.diffusion.distributed.utils import get_local_device

from vllm_layered.model_executor.denoise import DenoiseState, advance, build_forward_batch, guided_velocities
from vllm_layered.model_executor.image_processing import bucket_size, load_image
from vllm_layered.model_executor.pipeline import GenerationParams, LayeredPipeline

STATE_KEY = "vllm_layered"
RECORD_KEY = "vllm_layered_record"
METADATA_KEY = "vllm_layered"  # our group in the output envelope's metadata
DEFAULT_NEGATIVE_PROMPT = " "  # the official app's: CFG on unless the request turns it off
DEFAULT_TRUE_CFG_SCALE = 4.0
DEFAULT_STEPS = 50
DEFAULT_MAX_SEQUENCE_LENGTH = 512


def generation_params(sampling: Any) -> GenerationParams:
    """vLLM-Omni's OmniDiffusionSamplingParams -> our validated GenerationParams (ValueError if invalid)."""
    scale = sampling.true_cfg_scale
    return GenerationParams(
        layers=sampling.layers,
        resolution=sampling.resolution,
        num_inference_steps=sampling.num_inference_steps or DEFAULT_STEPS,
        true_cfg_scale=DEFAULT_TRUE_CFG_SCALE if scale is None else float(scale),
        cfg_normalize=bool(sampling.cfg_normalize),
        use_en_prompt=bool(sampling.use_en_prompt),
        max_sequence_length=sampling.max_sequence_length or DEFAULT_MAX_SEQUENCE_LENGTH,
    )


def request_image(prompt: Any) -> Image.Image:
    """The one input image of an OmniPromptType, as RGBA (ValueError when there is none or several)."""
    data = prompt.get("multi_modal_data") if isinstance(prompt, dict) else None
    image = (data or {}).get("image")
    if isinstance(image, (list, tuple)):
        if len(image) != 1:
            raise ValueError(f"Qwen-Image-Layered decomposes exactly one image, got {len(image)}")
        image = image[0]
    if image is None:
        raise ValueError("Qwen-Image-Layered needs an input image (multi_modal_data['image'])")
    return load_image(image)


def request_prompts(prompt: Any) -> tuple[str | None, str | None]:
    """(prompt, negative prompt) of an OmniPromptType; an absent negative prompt means the default ' '."""
    if isinstance(prompt, str):
        return prompt, DEFAULT_NEGATIVE_PROMPT
    negative = prompt.get("negative_prompt")
    return prompt.get("prompt"), DEFAULT_NEGATIVE_PROMPT if negative is None else negative


def request_generator(sampling: Any) -> torch.Generator:
    """A CPU generator seeded like our engine's (same seed -> same noise as our own server), else the
    request's own generator, else a random seed."""
    if sampling.seed is not None:
        return torch.Generator("cpu").manual_seed(int(sampling.seed))
    generator = sampling.generator
    if isinstance(generator, list):
        generator = generator[0] if generator else None
    if generator is not None:
        return generator
    return torch.Generator("cpu").manual_seed(torch.seed())


@dataclass
class RequestRecord:
    """The prompt a request used and when its phases began: ``started_at`` is wall-clock time (the
    API process, on the same host, subtracts its arrival time from it); the rest are perf_counter()."""

    prompt: str
    started_at: float
    preprocess_start: float
    denoise_start: float

    def metadata(self, decode_start: float, decode_end: float) -> dict[str, Any]:
        timings = {
            "preprocess_s": self.denoise_start - self.preprocess_start,
            "denoise_s": decode_start - self.denoise_start,
            "decode_s": decode_end - decode_start,
        }
        return {"prompt": self.prompt, "started_at": self.started_at, "timings": timings}


def get_layered_pre_process_func(od_config: OmniDiffusionConfig):
    """vLLM-Omni's pre-process hook: runs in the engine process before scheduling, so a bad request
    (no image, bad layers / resolution / steps) is refused before it takes a batch slot."""

    def pre_process(request):
        sampling = request.sampling_params
        params = generation_params(sampling)
        prompt = request.prompt
        if isinstance(prompt, str):
            raise ValueError("Qwen-Image-Layered needs an input image (multi_modal_data['image'])")
        image = request_image(prompt)
        prompt.setdefault("multi_modal_data", {})["image"] = image
        # the output size: the scheduler batches requests of one size together
        sampling.width, sampling.height = bucket_size(image.width, image.height, params.resolution)
        return request

    return pre_process


class OmniLayeredPipeline(nn.Module):
    """vLLM-Omni pipeline (request mode and step mode) over our LayeredPipeline."""

    _dit_modules: ClassVar[list[str]] = ["transformer"]
    _encoder_modules: ClassVar[list[str]] = ["text_encoder"]
    _vae_modules: ClassVar[list[str]] = ["vae"]
    _resident_modules: ClassVar[list[str]] = []
    support_image_input: ClassVar[bool] = True
    color_format: ClassVar[str] = "RGBA"
    supports_step_execution: ClassVar[bool] = True

    def __init__(self, *, od_config: OmniDiffusionConfig, prefix: str = ""):
        super().__init__()
        self.od_config = od_config
        layered = LayeredPipeline.from_pretrained(od_config.model, device=get_local_device(), dtype=od_config.dtype)
        self.layered = layered  # not a Module: its modules are registered below
        self.transformer = layered.transformer
        self.vae = layered.vae
        if layered.prompt_encoder is not None:
            self.text_encoder = layered.prompt_encoder.model

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Our loader filled every parameter from the checkpoint in __init__ (it refuses missing ones)."""
        return {name for name, _ in self.named_parameters()}

    # -- shared by both modes -------------------------------------------------------------------

    def _prepare(self, prompt: Any, sampling: Any) -> tuple[DenoiseState, RequestRecord]:
        started_at, preprocess_start = time.time(), time.perf_counter()
        params = generation_params(sampling)
        image = request_image(prompt)
        text, negative = request_prompts(prompt)
        cond, neg, used_prompt = self.layered.encode_prompts(image, text, negative, params)
        state = self.layered.prepare(image, params, cond, neg, generator=request_generator(sampling))
        record = RequestRecord(used_prompt, started_at, preprocess_start, denoise_start=time.perf_counter())
        return state, record

    def _guided_velocity(self, states: Sequence[DenoiseState]) -> list[torch.Tensor]:
        """One packed forward over ``states``; per state its CFG-combined velocity [noisy_tokens, 64]."""
        states = list(states)
        return guided_velocities(states, self.transformer(build_forward_batch(states, self.layered.dtype)))

    def _output(self, state: DenoiseState, record: RequestRecord, output_type: str | None) -> DiffusionOutput:
        if output_type == "latent":
            return DiffusionOutput(output=state.latents)
        decode_start = time.perf_counter()
        layers = self.layered.decode(state)
        # one list per request, bottom layer first: vLLM-Omni's other image endpoints flatten it into
        # one data entry per layer
        metadata = {METADATA_KEY: record.metadata(decode_start, time.perf_counter())}
        return DiffusionOutput(output={"payload": {"image": [layers]}, "metadata": metadata})

    # -- request mode ---------------------------------------------------------------------------

    @torch.no_grad()
    def forward(self, req) -> list[DiffusionOutput]:
        """Whole requests; their steps are packed together (requests may differ in every setting)."""
        prepared = [self._prepare(r.prompt, r.sampling_params) for r in req.requests]
        states = [state for state, _ in prepared]
        while active := [s for s in states if not s.done]:
            self.layered.denoise_step(active)
        return [
            self._output(state, record, r.sampling_params.output_type)
            for (state, record), r in zip(prepared, req.requests)
        ]

    # -- step mode ------------------------------------------------------------------------------

    def prepare_encode(self, state, **kwargs: Any):
        layered, record = self._prepare(state.prompt, state.sampling)
        state.extra[STATE_KEY] = layered
        state.extra[RECORD_KEY] = record
        state.latents = layered.latents
        state.timesteps = layered.sigmas[:-1] * 1000  # one entry per step: vLLM-Omni counts steps from it
        state.step_index = 0
        state.do_true_cfg = False  # CFG is applied per request from our state, inside denoise_step
        return state

    def denoise_step(self, input_batch, *, states=None, **kwargs: Any) -> torch.Tensor:
        """ONE packed forward over every running request; returns their guided velocities, row-aligned
        with ``input_batch.latents`` (the concatenation of each state's latents)."""
        if states is None:
            raise ValueError("OmniLayeredPipeline.denoise_step needs the request states")
        layered = []
        for state in states:
            ours = state.extra[STATE_KEY]
            ours.latents = state.latents  # vLLM-Omni's state is the source of truth between steps
            layered.append(ours)
        return torch.cat(self._guided_velocity(layered))

    def step_scheduler(self, state, noise_pred: torch.Tensor, **kwargs: Any) -> None:
        ours = state.extra[STATE_KEY]
        advance(ours, noise_pred)
        state.latents = ours.latents
        state.step_index = ours.step

    def post_decode(self, state, **kwargs: Any) -> DiffusionOutput:
        output_type = kwargs.get("output_type") or state.sampling.output_type
        return self._output(state.extra[STATE_KEY], state.extra[RECORD_KEY], output_type)
