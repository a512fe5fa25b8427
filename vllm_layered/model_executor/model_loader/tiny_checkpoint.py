"""A random tiny Qwen-Image-Layered in exactly the official diffusers folder layout.

The folder has the same files and tensor names as the real checkpoint, only with small sizes:
tests load it with diffusers and with our loader, and it is the embedded default model, so the
CLI runs on a fresh machine with no download. The transformer and VAE tensors are enumerated
from our own modules built on the meta device, so they have exactly the names and shapes that
our loader (and diffusers, which uses the same names) expects; the text encoder is a real tiny
Qwen2.5-VL saved by transformers, with a byte-level BPE tokenizer trained here.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from vllm_layered.model_executor.model_loader.folders import cached_folder, write_atomically, write_json
from vllm_layered.model_executor.model_loader.random_weights import random_weights
from vllm_layered.model_executor.models.transformer import LayeredTransformer, TransformerConfig
from vllm_layered.model_executor.models.vae import RGBAVAE, VAEConfig

DIFFUSERS_VERSION = "0.36.0"
TEXT_HIDDEN_SIZE = 64  # the text model's hidden size = the transformer's joint_attention_dim
DEFAULT_MODEL_DIRNAME = "tiny-qwen-image-layered"

MODEL_INDEX = {
    "_class_name": "QwenImageLayeredPipeline",
    "_diffusers_version": DIFFUSERS_VERSION,
    "processor": ["transformers", "Qwen2VLProcessor"],
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
    "tokenizer": ["transformers", "Qwen2Tokenizer"],
    "transformer": ["diffusers", "QwenImageTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKLQwenImage"],
}

TRANSFORMER_CONFIG = {
    "_class_name": "QwenImageTransformer2DModel",
    "_diffusers_version": DIFFUSERS_VERSION,
    "attention_head_dim": 32,
    "axes_dims_rope": [8, 12, 12],
    "guidance_embeds": False,
    "in_channels": 64,
    "joint_attention_dim": TEXT_HIDDEN_SIZE,
    "num_attention_heads": 2,
    "num_layers": 2,
    "out_channels": 16,
    "patch_size": 2,
    "use_additional_t_cond": True,
    "use_layer3d_rope": True,
    "zero_cond_t": False,
}

VAE_CONFIG = {
    "_class_name": "AutoencoderKLQwenImage",
    "_diffusers_version": DIFFUSERS_VERSION,
    "attn_scales": [],
    "base_dim": 8,
    "dim_mult": [1, 2, 4, 4],
    "dropout": 0.0,
    "input_channels": 4,
    "latents_mean": [-0.12, 0.31, -0.47, 0.05, 0.22, -0.36, 0.18, -0.09, 0.41, -0.27, 0.13, 0.0, 0.29, -0.3, 0.08, 0.2],
    "latents_std": [1.21, 0.87, 1.45, 0.93, 1.12, 0.78, 1.33, 1.05, 0.91, 1.27, 0.84, 1.18, 0.96, 1.39, 1.02, 0.89],
    "num_res_blocks": 2,
    "temperal_downsample": [False, True, True],
    "z_dim": 16,
}

SCHEDULER_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "_diffusers_version": DIFFUSERS_VERSION,
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": None,
    "stochastic_sampling": False,
    "time_shift_type": "linear",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}

# The files whose content identifies this recipe: a cached copy that differs was written by another version.
RECIPE_CONFIGS = {
    "model_index.json": MODEL_INDEX,
    "scheduler/scheduler_config.json": SCHEDULER_CONFIG,
    "transformer/config.json": TRANSFORMER_CONFIG,
    "vae/config.json": VAE_CONFIG,
}

# Qwen2's pre-tokenizer split (the same regex transformers' Qwen2Tokenizer rebuilds its pipeline with).
_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
_TOKENIZER_VOCAB_SIZE = 1024

# The text-encoder template, repeated in the corpus so that each of its words becomes one token
# and the system prefix is 34 tokens long, as with the real Qwen tokenizer.
_TEMPLATE_TEXT = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
_CORPUS = """
A red cat sits on a small blue chair near the open window, and a green plant stands behind it.
Two yellow birds fly over the old stone bridge while the sun sets behind the tall mountains.
The poster shows large white text that reads hello world on a dark purple background.
Three round oranges lie in a wooden bowl on the kitchen table, next to a glass of cold water.
A young woman in a long black coat walks her brown dog along the wet street in the evening rain.
The logo is a simple circle with a thin golden border and a bright star in the middle.
On the left there is a tall tree with soft green leaves; on the right, a narrow path leads to a house.
The background is a smooth gradient from light pink at the top to deep orange at the bottom.
A silver car is parked in front of the red brick building, under a sign with bold letters.
Four children play with a colorful ball on the sandy beach, and gentle waves roll onto the shore.
The cup has a rough texture, a matte grey color and a small chipped handle on one side.
Above the table hangs a lamp with a warm yellow light, and below it a cat sleeps on a soft rug.
The photo shows a busy market with many people, fresh fruit, baskets of bread and hanging flags.
A single white cloud floats in the clear blue sky above a quiet green field with a few cows.
The text in the corner is written in thin black letters and says open every day from nine to five.
An illustration of a friendly robot with square eyes, a round head and short metal arms.
The objects are arranged in a row: a pencil, an eraser, a ruler and a notebook with a striped cover.
Behind the glass door we see a dim room with a piano, a shelf of books and a painting of the sea.
The shape of the bottle is tall and slim, its label is blue, and the cap is made of shiny metal.
In the foreground a bicycle leans against a fence; in the distance the city lights begin to glow.
"""


def make_tiny_checkpoint(path: str | Path, *, seed: int = 0, overwrite: bool = False) -> Path:
    """Write a random tiny Qwen-Image-Layered to ``path`` and return it.

    The folder is written to a temporary sibling and renamed into place, so a reader never sees a
    half-written checkpoint. Raises ValueError if ``path`` exists and is not an empty folder,
    unless ``overwrite`` is set.
    """
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ValueError(
            f"{path} exists and is not empty; to replace it pass --overwrite (make-tiny-checkpoint) or overwrite=True"
        )
    write_atomically(path, lambda root: _write_checkpoint(root, seed), replace=overwrite)
    return path


def default_model_dir() -> Path:
    """Where the embedded default model lives (written or not): ``$VLLM_LAYERED_CACHE/tiny-qwen-image-layered``,
    the cache folder defaulting to ``~/.cache/vllm-layered``."""
    root = os.environ.get("VLLM_LAYERED_CACHE") or Path.home() / ".cache" / "vllm-layered"
    return Path(root).expanduser() / DEFAULT_MODEL_DIRNAME


def default_model_path(*, on_write: Callable[[Path], None] | None = None) -> Path:
    """The embedded default model in ``default_model_dir()``, generated (seed 0) on first use.

    ``on_write(path)`` is called before it is generated. A cached copy whose configs differ from this recipe
    (written by an older version) is replaced.
    """
    return cached_folder(default_model_dir(), RECIPE_CONFIGS, lambda root: _write_checkpoint(root, 0), on_write)


def _write_checkpoint(root: Path, seed: int) -> None:
    write_json(root / "model_index.json", MODEL_INDEX)
    write_json(root / "scheduler" / "scheduler_config.json", SCHEDULER_CONFIG)

    tokenizer = _train_tokenizer()
    tokenizer.save_pretrained(root / "tokenizer")
    _write_processor(root / "processor", tokenizer)
    _write_text_encoder(root / "text_encoder", tokenizer, seed)

    transformer_dir = root / "transformer"
    write_json(transformer_dir / "config.json", TRANSFORMER_CONFIG)
    tensors = _random_tensors(_meta_module("transformer", transformer_dir / "config.json"), seed, "transformer")
    _save_sharded(tensors, transformer_dir, "diffusion_pytorch_model", num_shards=2)

    vae_dir = root / "vae"
    write_json(vae_dir / "config.json", VAE_CONFIG)
    tensors = _random_tensors(_meta_module("vae", vae_dir / "config.json"), seed, "vae")
    save_file(tensors, str(vae_dir / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})


def _meta_module(component: str, config_path: Path) -> nn.Module:
    """Our model module for a written config, built on the meta device (names and shapes only)."""
    if component == "transformer":
        with torch.device("meta"):
            return LayeredTransformer(config=TransformerConfig.from_json(config_path))
    with torch.device("meta"):
        return RGBAVAE(config=VAEConfig.from_json(config_path))


def _random_tensors(module: nn.Module, seed: int, component: str, *, buffers: bool = True) -> dict[str, torch.Tensor]:
    """One deterministic fp32 tensor per parameter (and buffer, if ``buffers``) of ``module``."""
    return dict(random_weights(module, seed=seed, component=component, buffers=buffers))


def _save_sharded(tensors: dict[str, torch.Tensor], folder: Path, stem: str, *, num_shards: int) -> None:
    names = sorted(tensors)
    per_shard = math.ceil(len(names) / num_shards)
    weight_map: dict[str, str] = {}
    for i in range(num_shards):
        shard_names = names[i * per_shard : (i + 1) * per_shard]
        filename = f"{stem}-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        save_file({n: tensors[n] for n in shard_names}, str(folder / filename), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard_names, filename))
    total_size = sum(t.numel() * t.element_size() for t in tensors.values())
    write_json(
        folder / f"{stem}.safetensors.index.json",
        {"metadata": {"total_size": total_size}, "weight_map": weight_map},
    )


def _train_tokenizer():
    """A byte-level BPE with Qwen2's pre-tokenizer and special tokens, as a transformers Qwen2Tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_TOKENIZER_VOCAB_SIZE - len(SPECIAL_TOKENS),
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    template = _TEMPLATE_TEXT.format("")
    backend.train_from_iterator([template] * 8 + _CORPUS.strip().splitlines() * 2, trainer)
    backend.add_special_tokens(list(SPECIAL_TOKENS))  # ids after the learned vocabulary, as in Qwen
    tokenizer = Qwen2Tokenizer(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        errors="replace",
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = _CHAT_TEMPLATE
    return tokenizer


# Qwen2-VL style chat template (messages with text, image and video parts).
_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' or 'video' in part %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in part %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_VISION_PREPROCESSING = {
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "merge_size": 2,
    "min_pixels": 3136,
    "max_pixels": 200704,  # 256 merged tokens at most, to keep tiny captioning fast
    "patch_size": 14,
    "processor_class": "Qwen2VLProcessor",
    "resample": 3,
    "rescale_factor": 1 / 255,
    "temporal_patch_size": 2,
}


def _write_processor(folder: Path, tokenizer) -> None:
    """Qwen2VLProcessor files, written directly: saving a live processor needs torchvision."""
    tokenizer.save_pretrained(folder)
    write_json(
        folder / "preprocessor_config.json",
        {"image_processor_type": "Qwen2VLImageProcessor", **_VISION_PREPROCESSING},
    )
    write_json(
        folder / "video_preprocessor_config.json",
        {"video_processor_type": "Qwen2VLVideoProcessor", **_VISION_PREPROCESSING},
    )


def _write_text_encoder(folder: Path, tokenizer, seed: int) -> None:
    """A real Qwen2_5_VLForConditionalGeneration: 1-layer text model, 1-block vision tower."""
    from transformers import GenerationConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    head_dim = 16
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": TEXT_HIDDEN_SIZE,
            "intermediate_size": 128,
            "num_hidden_layers": 1,
            "num_attention_heads": TEXT_HIDDEN_SIZE // head_dim,
            "num_key_value_heads": 2,
            "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": 1,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": TEXT_HIDDEN_SIZE,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": [0],
            "tokens_per_second": 2,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG alone
        model = Qwen2_5_VLForConditionalGeneration(config)
    tensors = _random_tensors(model, seed, "text_encoder", buffers=False)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(tensors[name])
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
        do_sample=False,
    )
    model.save_pretrained(folder)
