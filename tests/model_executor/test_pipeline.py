"""Whole-pipeline parity with diffusers' QwenImageLayeredPipeline on the tiny checkpoint (float32, CPU).

Both pipelines get the same image, the same initial latents and the same prompt embeddings; their
layers must agree to 1/255 on at least 99.9% of pixels.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from tests.reference import import_reference
from vllm_layered.model_executor.models.text_encoder import pad_embeddings
from vllm_layered.model_executor.pipeline import LayeredPipeline

STEPS = 2


@pytest.fixture(scope="module")
def pipelines(tiny_checkpoint):
    diffusers = import_reference()
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    root = tiny_checkpoint
    ref = diffusers.QwenImageLayeredPipeline(  # the processor is only needed for auto-captions, not used here
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(root / "scheduler"),
        vae=diffusers.AutoencoderKLQwenImage.from_pretrained(root / "vae"),
        text_encoder=Qwen2_5_VLForConditionalGeneration.from_pretrained(root / "text_encoder"),
        tokenizer=AutoTokenizer.from_pretrained(root / "tokenizer"),
        processor=None,
        transformer=diffusers.QwenImageTransformer2DModel.from_pretrained(root / "transformer"),
    )
    ref.set_progress_bar_config(disable=True)
    ours = LayeredPipeline.from_pretrained(root, device="cpu", dtype=torch.float32)
    return ref, ours


def test_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(height, width, 4), dtype=np.uint8)
    pixels[..., 3] = np.where(rng.random((height, width)) < 0.7, 255, rng.integers(0, 256, (height, width)))
    return Image.fromarray(pixels, "RGBA")


test_image.__test__ = False


def assert_layers_close(ours: list[Image.Image], ref: list[Image.Image]) -> None:
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref):
        assert a.mode == "RGBA" and a.size == b.size
        diff = np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16))
        assert (diff <= 1).mean() >= 0.999, f"max diff {diff.max()}"


def embeddings(ours: LayeredPipeline, prompts: list[str]):
    embeds = ours.prompt_encoder.encode(prompts)
    return pad_embeddings(embeds)


@pytest.mark.parametrize(
    "layers,cfg,normalize,size",
    [(1, True, False, (320, 256)), (3, True, True, (200, 300)), (8, False, False, (256, 192))],
)
@torch.no_grad()
def test_layers_match_diffusers(pipelines, layers, cfg, normalize, size):
    ref, ours = pipelines
    image = test_image(*size, seed=layers)
    embeds, mask = embeddings(ours, ["a cat on a red sofa"])
    neg_embeds, neg_mask = embeddings(ours, [" "])
    h, w = ours.encode_condition(image, 640)[1:]
    latents = torch.randn(1, (layers + 1) * h * w, 64, generator=torch.Generator().manual_seed(7))
    common = dict(
        prompt="a cat on a red sofa",  # the reference captions whenever prompt is empty, embeddings or not
        layers=layers,
        resolution=640,
        num_inference_steps=STEPS,
        latents=latents,
        prompt_embeds=embeds,
        prompt_embeds_mask=mask,
        true_cfg_scale=4.0 if cfg else 1.0,
        cfg_normalize=normalize,
    )
    if cfg:
        common.update(negative_prompt_embeds=neg_embeds, negative_prompt_embeds_mask=neg_mask)
    expected = ref(image, **common).images[0]
    got = ours(image, negative_prompt=None, **common)
    assert_layers_close(got.layers, expected)
    assert got.composite.size == image.size or got.composite.size == expected[0].size


@torch.no_grad()
def test_batch_of_two_equals_single_runs(pipelines):
    """Two images of different shapes in one call give each image's own layers, in input order."""
    _, ours = pipelines
    images = [test_image(256, 256, seed=1), test_image(320, 192, seed=2)]
    kwargs = dict(prompt="a cat", layers=2, num_inference_steps=STEPS)
    batch = ours(images, seed=3, **kwargs)
    assert isinstance(batch, list) and len(batch) == 2
    gen = torch.Generator().manual_seed(3)  # the batch draws its noise image after image from one generator
    singles = [ours(image, generator=gen, **kwargs) for image in images]
    for got, single in zip(batch, singles):
        assert [im.size for im in got.layers] == [im.size for im in single.layers]
        assert_layers_close(got.layers, single.layers)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(layers=0), "layers must be between 1 and 20"),
        (dict(layers=21), "layers must be between 1 and 20"),
        (dict(resolution=800), "resolution must be 640 or 1024"),
        (dict(num_inference_steps=0), "num_inference_steps must be between"),
    ],
)
def test_bad_parameters_are_clear_errors(pipelines, kwargs, message):
    _, ours = pipelines
    with pytest.raises(ValueError, match=message):
        ours(test_image(64, 64, 0), prompt="x", **kwargs)


def test_bad_image_is_a_clear_error(pipelines):
    _, ours = pipelines
    with pytest.raises(ValueError, match="(?i)not an image|cannot identify|unrecognised|unsupported"):
        ours(b"definitely not a picture", prompt="x", num_inference_steps=1)
