"""LayeredPipeline: the offline API. Image in, RGBA layers out (bottom first).

Argument names mirror diffusers' QwenImageLayeredPipeline. Defaults follow the official app instead of
the reference's silent ones: CFG on (negative_prompt " ", true_cfg_scale 4), cfg_normalize on, English
auto-captions. Pass ``true_cfg_scale=1`` or ``negative_prompt=None`` to turn CFG off.

Data flow: image -> bucket resize -> VAE encode (condition frame) ; prompt -> text encoder ;
noise -> [transformer -> CFG -> Euler] x steps -> VAE decode each layer -> PIL.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vllm_layered.formats import composite_layers
from vllm_layered.layer_tree import (
    LayerTree,
    RefinementSpec,
    TreeJob,
    build_tree,
    parse_refinements,
    plan_refinements,
)
from vllm_layered.model_executor.denoise import DenoiseState, apply_velocity, build_forward_batch
from vllm_layered.model_executor.image_processing import (
    MAX_ASPECT_RATIO,
    ConditionImage,
    bucket_pixels,
    image_to_tensor,
    load_image,
    tensor_to_images,
    validate_resolution,
)
from vllm_layered.model_executor.latents import pack_latents, unpack_latents
from vllm_layered.model_executor.model_loader.dummy_loader import check_load_format
from vllm_layered.model_executor.models.text_encoder import PromptEncoder
from vllm_layered.model_executor.models.transformer import LayeredTransformer, TransformerConfig
from vllm_layered.model_executor.models.vae import RGBAVAE
from vllm_layered.model_executor.parallel import CheckpointTransformer, ParallelConfig, ParallelTransformer
from vllm_layered.model_executor.sampler import NoiseScheduleConfig, layered_mu, model_timestep, sigma_schedule

MAX_LAYERS = 20
MAX_STEPS = 1000
# Layers VAE-decoded at once. A 1024 layer's decoder activations take GBs (and its float pixels 64 MB on the host
# as they become PIL images), so 20 layers at once would not fit a fixed budget; 2 keeps the decoder's batch
# large enough to use the GPU.
DECODE_CHUNK = 2
PIPELINE_CLASS = "QwenImageLayeredPipeline"

StepCallback = Callable[[int, int], None]
# decompose_tree's stages, called as (stage, jobs) before each: "prepare" (captions, text and VAE encoding),
# "denoise", "decode"; the jobs are one depth's decompositions (the root alone first, its path None).
StageCallback = Callable[[str, list[TreeJob]], None]


@dataclass
class LayeredOutput:
    """One decomposition: ``layers`` are RGBA images, bottom first; ``prompt`` is the caption used."""

    layers: list[Image.Image]
    prompt: str

    @property
    def composite(self) -> Image.Image:
        """The layers alpha-composited bottom first: what the stack looks like."""
        return composite_layers(self.layers)


@dataclass(frozen=True)
class GenerationParams:
    """Validated per-request parameters (shared by the pipeline, the engine and the server)."""

    layers: int = 4
    resolution: int = 640
    num_inference_steps: int = 50
    true_cfg_scale: float = 4.0
    cfg_normalize: bool = True
    use_en_prompt: bool = True
    max_sequence_length: int = 512

    def __post_init__(self) -> None:
        if not 1 <= self.layers <= MAX_LAYERS:
            raise ValueError(f"layers must be between 1 and {MAX_LAYERS}, got {self.layers}")
        validate_resolution(self.resolution)
        if not 1 <= self.num_inference_steps <= MAX_STEPS:
            raise ValueError(f"num_inference_steps must be between 1 and {MAX_STEPS}, got {self.num_inference_steps}")
        if self.true_cfg_scale < 0:
            raise ValueError(f"true_cfg_scale must be >= 0, got {self.true_cfg_scale}")
        if not 1 <= self.max_sequence_length <= 1024:
            raise ValueError(f"max_sequence_length must be between 1 and 1024, got {self.max_sequence_length}")

    @classmethod
    def from_arguments(cls, arguments: Mapping[str, Any]) -> GenerationParams:
        """The params of a call that takes each of them as an argument of the same name (diffusers' names, as
        the pipeline's entry points do): ``from_arguments(locals())`` at the top of such a call."""
        return cls(**{field.name: arguments[field.name] for field in fields(cls)})


def resolve_model_path(path_or_id: str | os.PathLike) -> Path:
    """A local diffusers folder as is; anything else is a Hugging Face repo id to download."""
    path = Path(path_or_id)
    if path.is_dir():
        return path
    if path.exists() or str(path_or_id).startswith((".", "/")):
        raise FileNotFoundError(f"model folder {path} does not exist")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(path_or_id)))
    except Exception as exc:  # offline, unknown repo, auth: say which and why
        raise FileNotFoundError(f"could not fetch model {path_or_id!r} from the Hugging Face hub: {exc}") from exc


def default_device_dtype(
    device: torch.device | str | None, dtype: torch.dtype | None
) -> tuple[torch.device, torch.dtype]:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return device, dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)


class LayeredPipeline:
    def __init__(
        self,
        *,
        transformer: LayeredTransformer | ParallelTransformer,
        vae: RGBAVAE,
        prompt_encoder: PromptEncoder | None,
        noise_schedule_config: NoiseScheduleConfig,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.transformer = transformer
        self.vae = vae
        self.prompt_encoder = prompt_encoder
        self.noise_schedule_config = noise_schedule_config
        self.device = device
        self.dtype = dtype

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | os.PathLike,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        load_text_encoder: bool = True,
        parallel: ParallelConfig | None = None,
        quantization: str | None = None,
        attention_dtype: str | None = None,
        load_format: str = "safetensors",
    ) -> LayeredPipeline:
        """Load a diffusers-layout folder (or hub repo id). Without the text encoder, pass embeddings.

        ``parallel``: spread the transformer over that many processes (one GPU each, from ``device`` on).
        ``quantization``: None / "none", or "fp8" for the transformer (every rank quantizes the same way).
        ``attention_dtype``: None / "bf16", or "fp8" (FP8 attention; needs quantization="fp8"; every rank too).
        ``load_format``: "safetensors", or "dummy" for the folder's configs with seeded random weights
        (model_loader/dummy_loader.py; no weight file is read, so a config-only folder will do).
        """
        check_load_format(load_format)
        root = resolve_model_path(path_or_id)
        device, dtype = default_device_dtype(device, dtype)
        index = json.loads((root / "model_index.json").read_text())
        if index.get("_class_name") != PIPELINE_CLASS:
            raise ValueError(f"{root} holds a {index.get('_class_name')!r}, not a {PIPELINE_CLASS}")
        if parallel is not None:  # refuse an impossible layout before loading anything
            heads = TransformerConfig.from_json(root / "transformer" / "config.json").num_attention_heads
            parallel.check(heads, device)
        transformer = LayeredTransformer.from_pretrained(
            root / "transformer", device=device, dtype=dtype, quantization=quantization,
            attention_dtype=attention_dtype, load_format=load_format,
        )
        if parallel is not None and parallel.world_size > 1:
            factory = CheckpointTransformer(root / "transformer", dtype, quantization, attention_dtype, load_format)
            transformer = ParallelTransformer.launch(transformer, factory, parallel, device)
        return cls(
            transformer=transformer,
            vae=RGBAVAE.from_pretrained(root / "vae", device=device, dtype=dtype, load_format=load_format),
            prompt_encoder=PromptEncoder.from_pretrained(root, device=device, dtype=dtype, load_format=load_format)
            if load_text_encoder
            else None,
            noise_schedule_config=NoiseScheduleConfig.from_json(root / "scheduler" / "scheduler_config.json"),
            device=device,
            dtype=dtype,
        )

    # -- preprocess ---------------------------------------------------------------------------------

    def encode_condition(self, image: ConditionImage, resolution: int) -> tuple[torch.Tensor, int, int]:
        """Bucket-resize (unless it is a BucketImage), VAE-encode and pack the input image: ([h*w, 64], h, w)
        in patches."""
        pixels = bucket_pixels(image, resolution)
        width, height = pixels.size
        x = image_to_tensor(pixels, width, height).to(self.device, self.dtype)
        z = self.vae.normalize_latents(self.vae.encode(x))
        return pack_latents(z), height // 16, width // 16

    def encode_text(self, prompts: list[str], max_sequence_length: int) -> list[torch.Tensor]:
        if self.prompt_encoder is None:
            raise ValueError("this pipeline was loaded without a text encoder: pass prompt_embeds")
        return self.prompt_encoder.encode(prompts, max_sequence_length=max_sequence_length)

    def caption(self, image: Image.Image, use_en_prompt: bool) -> str:
        """The VLM's caption of exactly ``image`` (encode_prompts hands it the bucket-resized input)."""
        if self.prompt_encoder is None:
            raise ValueError("an empty prompt needs the text encoder to caption the image")
        return self.prompt_encoder.caption(image, use_en_prompt=use_en_prompt)

    def encode_prompts(
        self,
        image: ConditionImage,
        prompt: str | None,
        negative_prompt: str | None,
        params: GenerationParams,
        *,
        prompt_embeds: torch.Tensor | None = None,
        negative_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, str]:
        """Prompt embeddings (auto-captioning an empty prompt), negative embeddings when CFG is on, and
        the prompt used. CFG is on when true_cfg_scale > 1 and a negative prompt is given, as in the reference.

        The caption is made, as the reference makes it, from the input resized to its resolution bucket
        (Lanczos, the mode as given: RGBA here), not from the image at its original size."""
        do_cfg = params.true_cfg_scale > 1 and (negative_prompt is not None or negative_embeds is not None)
        if prompt_embeds is None:
            if not prompt or not prompt.strip():
                prompt = self.caption(bucket_pixels(image, params.resolution), params.use_en_prompt)
            prompt_embeds = self.encode_text([prompt], params.max_sequence_length)[0]
        if do_cfg and negative_embeds is None:
            negative_embeds = self.encode_text([negative_prompt], params.max_sequence_length)[0]
        return prompt_embeds, negative_embeds if do_cfg else None, prompt or ""

    def initial_noise(self, layers: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
        """Packed float32 noise for the composite + ``layers`` frames, drawn as the reference draws it."""
        shape = (layers + 1, 16, height * 2, width * 2)
        noise = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)
        return pack_latents(noise).to(self.device)

    def prepare(
        self,
        image: Image.Image,
        params: GenerationParams,
        prompt_embeds: torch.Tensor,
        negative_embeds: torch.Tensor | None,
        *,
        generator: torch.Generator,
        latents: torch.Tensor | None = None,
    ) -> DenoiseState:
        """Everything a request needs before its first step: condition latents, schedule, noise."""
        condition, h, w = self.encode_condition(image, params.resolution)
        if latents is None:
            latents = self.initial_noise(params.layers, h, w, generator)
        sigmas = sigma_schedule(self.noise_schedule_config, params.num_inference_steps, layered_mu(h * w))
        return DenoiseState(
            layers=params.layers,
            height=h,
            width=w,
            latents=latents.to(self.device, torch.float32),
            condition_tokens=condition,
            prompt_embeds=prompt_embeds.to(self.device, self.dtype),
            negative_embeds=None if negative_embeds is None else negative_embeds.to(self.device, self.dtype),
            sigmas=sigmas,
            true_cfg_scale=params.true_cfg_scale,
            cfg_normalize=params.cfg_normalize,
            modulation=self.transformer.modulation_table(model_timestep(sigmas[:-1], self.dtype)),
        )

    def denoise_step(self, states: list[DenoiseState]) -> None:
        """One packed transformer forward over all ``states``, then each takes its own sampler step."""
        apply_velocity(states, self.transformer(build_forward_batch(states, self.dtype)))

    # -- decode -------------------------------------------------------------------------------------

    def decode(self, state: DenoiseState, chunk: int = DECODE_CHUNK) -> list[Image.Image]:
        """VAE-decode the layer frames of a finished request (the composite frame 0 is dropped)."""
        return [layer for layers in self.decode_chunks(state, chunk) for layer in layers]

    def decode_chunks(self, state: DenoiseState, chunk: int = DECODE_CHUNK) -> Iterator[list[Image.Image]]:
        """The layers of ``decode``, ``chunk`` at a time, each chunk's activations and pixels dropped before the
        next is decoded: device and host memory stay bounded by ``chunk`` layers at any layer count. Lazy, so a
        caller that stops iterating (a cancelled request) decodes no further chunk."""
        if not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"decode chunk must be a positive integer, got {chunk!r}")
        z = unpack_latents(state.latents, state.layers + 1, state.height, state.width)[1:]
        for start in range(0, state.layers, chunk):
            part = self.vae.denormalize_latents(z[start : start + chunk].to(self.dtype))
            yield tensor_to_images(self.vae.decode(part))

    # -- the offline call ---------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        image: Image.Image | bytes | str | os.PathLike | Sequence[Image.Image | bytes | str | os.PathLike],
        prompt: str | Sequence[str] | None = None,
        negative_prompt: str | Sequence[str] | None = " ",
        true_cfg_scale: float = 4.0,
        cfg_normalize: bool = True,
        layers: int = 4,
        resolution: int = 640,
        num_inference_steps: int = 50,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        prompt_embeds_mask: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds_mask: torch.Tensor | None = None,
        use_en_prompt: bool = True,
        max_sequence_length: int = 512,
        callback: StepCallback | None = None,
    ) -> LayeredOutput | list[LayeredOutput]:
        """Decompose one image (-> LayeredOutput) or a list of images (-> a list, one per image).

        ``latents`` ([B, noisy_tokens, 64] or [noisy_tokens, 64]) and the embeddings ([B, L, H] with
        an optional [B, L] mask) replace the drawn noise and the text encoder, as in diffusers.
        ``callback(step, num_steps)`` is called after every denoising step.
        """
        params = GenerationParams.from_arguments(locals())
        single = not isinstance(image, (list, tuple))
        images = [load_image(x) for x in ([image] if single else image)]
        batch = len(images)
        prompts = _per_image(prompt, batch, "prompt")
        negatives = _per_image(negative_prompt, batch, "negative_prompt")
        cond_embeds = _split_embeds(prompt_embeds, prompt_embeds_mask, batch, max_sequence_length)
        neg_embeds = _split_embeds(negative_prompt_embeds, negative_prompt_embeds_mask, batch, max_sequence_length)
        if generator is None:
            generator = torch.Generator("cpu").manual_seed(seed if seed is not None else torch.seed())
        states = []
        for i, im in enumerate(images):
            cond, neg, prompts[i] = self.encode_prompts(
                im, prompts[i], negatives[i], params, prompt_embeds=cond_embeds[i], negative_embeds=neg_embeds[i]
            )
            initial = None if latents is None else (latents if latents.dim() == 2 else latents[i])
            states.append(self.prepare(im, params, cond, neg, generator=generator, latents=initial))
        for step in range(params.num_inference_steps):
            self.denoise_step(states)
            if callback is not None:
                callback(step + 1, params.num_inference_steps)
        outputs = [LayeredOutput(layers=self.decode(s), prompt=p) for s, p in zip(states, prompts)]
        return outputs[0] if single else outputs

    # -- recursive decomposition --------------------------------------------------------------------

    @torch.no_grad()
    def decompose_tree(
        self,
        image: Image.Image | bytes | str | os.PathLike,
        refine: str | Sequence[RefinementSpec] = (),
        prompt: str | None = None,
        negative_prompt: str | None = " ",
        true_cfg_scale: float = 4.0,
        cfg_normalize: bool = True,
        layers: int = 4,
        resolution: int = 640,
        num_inference_steps: int = 50,
        seed: int | None = None,
        use_en_prompt: bool = True,
        max_sequence_length: int = 512,
        callback: StepCallback | None = None,
        stage_callback: StageCallback | None = None,
    ) -> LayerTree:
        """Decompose ``image``, then decompose its layers again as ``refine`` says: a tree (layer_tree.py).

        ``refine``: "PATH:N" strings or {"layer": PATH, "layers": N[, "prompt": TEXT]} dicts (or a JSON array
        of them); all are checked before any work. Every decomposition of the tree takes the other arguments;
        a refinement without a prompt captions its own input. The root uses ``seed`` (its layers are
        ``self(image, seed=seed, ...)``'s), the refinement of layer P ``refinement_seed(seed, P)``. A
        refinement's input is prepared once its parent layer is decoded, and the refinements of one depth are
        denoised together, in packed steps.
        ``callback(step, total)`` counts the steps of every level: total = num_inference_steps x levels.
        ``stage_callback(stage, jobs)`` is called before each level's "prepare", "denoise" and "decode".
        """
        params = GenerationParams.from_arguments(locals())
        plan = plan_refinements(parse_refinements(refine), root_layers=layers, max_layers=MAX_LAYERS)
        total = num_inference_steps * (1 + max((r.depth for r in plan), default=0))
        done = 0

        def step_done() -> None:
            nonlocal done
            done += 1
            if callback is not None:
                callback(done, total)

        return build_tree(
            load_image(image),
            layers=layers,
            prompt=prompt,
            seed=secrets.randbelow(2**63) if seed is None else seed,
            plan=plan,
            decompose=lambda jobs: self._decompose_jobs(jobs, params, negative_prompt, step_done, stage_callback),
            max_aspect_ratio=MAX_ASPECT_RATIO,
        )

    def _decompose_jobs(
        self,
        jobs: list[TreeJob],
        params: GenerationParams,
        negative_prompt: str | None,
        step_done: Callable[[], None],
        stage_callback: StageCallback | None = None,
    ) -> list[tuple[list[Image.Image], str]]:
        """Decompose ``jobs`` (each its own image, layer count, prompt and seed) in packed steps; per job
        its layers at its bucket size and the prompt used."""
        stage = stage_callback or (lambda name, jobs: None)
        stage("prepare", jobs)
        states, prompts = [], []
        for job in jobs:
            job_params = replace(params, layers=job.layers)
            cond, neg, prompt = self.encode_prompts(job.image, job.prompt, negative_prompt, job_params)
            generator = torch.Generator("cpu").manual_seed(job.seed)
            states.append(self.prepare(job.image, job_params, cond, neg, generator=generator))
            prompts.append(prompt)
        stage("denoise", jobs)
        for _ in range(params.num_inference_steps):
            self.denoise_step(states)
            step_done()
        stage("decode", jobs)
        return [(self.decode(state), prompt) for state, prompt in zip(states, prompts)]


def _per_image(value: str | Sequence[str] | None, batch: int, name: str) -> list[str | None]:
    if value is None or isinstance(value, str):
        return [value] * batch
    if len(value) != batch:
        raise ValueError(f"{name} has {len(value)} entries for {batch} images")
    return list(value)


def _split_embeds(
    embeds: torch.Tensor | None, mask: torch.Tensor | None, batch: int, max_len: int
) -> list[torch.Tensor | None]:
    """[B, L, H] embeddings (+ [B, L] mask) -> one unpadded [L_i, H] tensor per image (None: not given)."""
    if embeds is None:
        return [None] * batch
    if embeds.dim() == 2:
        embeds = embeds[None]
    if embeds.shape[0] != batch:
        raise ValueError(f"prompt embeddings have batch {embeds.shape[0]} for {batch} images")
    embeds = embeds[:, :max_len]
    if mask is None:
        return list(embeds)
    mask = mask[:, :max_len].bool()
    return [e[m] for e, m in zip(embeds, mask)]
