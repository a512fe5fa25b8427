"""PromptEncoder against diffusers' QwenImageLayeredPipeline.encode_prompt / get_image_caption, and what
LayeredPipeline captions when the prompt is empty."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.reference import import_reference
from vllm_layered.model_executor.image_processing import resize_to_bucket
from vllm_layered.model_executor.models import text_encoder as te
from vllm_layered.model_executor.models.text_encoder import CaptionUnavailableError, PromptEncoder, pad_embeddings
from vllm_layered.model_executor.pipeline import GenerationParams, LayeredPipeline

SHORT = "a red cat"
LONG = (
    "Two yellow birds fly over the old stone bridge while the sun sets behind the tall mountains, "
    "and a young woman in a long black coat walks her brown dog along the wet street."
)


def require_reference_captions() -> None:
    """The reference captions with transformers' full Qwen2VLProcessor, which needs torchvision: skip the comparison,
    saying why, without it. (Our captioning does not need torchvision: test_caption_processor.py runs it without.)"""
    problem = te._torchvision_problem()
    if problem is not None:
        pytest.skip(f"the reference's captioning needs torchvision, which cannot be imported here ({problem})")


@pytest.fixture(scope="module")
def encoder(tiny_checkpoint: Path) -> PromptEncoder:
    return PromptEncoder.from_pretrained(tiny_checkpoint, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def reference(tiny_checkpoint: Path):
    processor = {} if te._torchvision_problem() is None else {"processor": None}
    pipeline_class = import_reference().QwenImageLayeredPipeline
    return pipeline_class.from_pretrained(tiny_checkpoint, torch_dtype=torch.float32, **processor)


def _reference_rows(reference, prompts: list[str], max_sequence_length: int) -> list[torch.Tensor]:
    embeds, mask = reference.encode_prompt(prompts, device=torch.device("cpu"), max_sequence_length=max_sequence_length)
    if mask is None:
        mask = torch.ones(embeds.shape[:2], dtype=torch.long)
    return [embeds[i, mask[i].bool()] for i in range(len(prompts))]


def _assert_close(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> None:
    assert [tuple(t.shape) for t in ours] == [tuple(t.shape) for t in theirs]
    for a, b in zip(ours, theirs):
        assert ((a - b).norm() / b.norm()).item() < 1e-5


def test_prompt_data_equals_the_reference() -> None:
    pipeline_qwenimage_layered = import_reference("diffusers.pipelines.qwenimage.pipeline_qwenimage_layered")

    strings = {}
    for node in ast.walk(ast.parse(inspect.getsource(pipeline_qwenimage_layered))):
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Attribute):
            if isinstance(node.value, ast.Constant):
                strings[node.targets[0].attr] = node.value.value
    assert strings["prompt_template_encode"] == te.PROMPT_TEMPLATE
    assert strings["prompt_template_encode_start_idx"] == te.TEMPLATE_PREFIX_TOKENS
    assert strings["image_caption_prompt_en"] == te.CAPTION_PROMPT_EN
    assert strings["image_caption_prompt_cn"] == te.CAPTION_PROMPT_CN


def test_encode_single_prompt(encoder: PromptEncoder, reference) -> None:
    ours = encoder.encode([SHORT])
    _assert_close(ours, _reference_rows(reference, [SHORT], 512))
    assert ours[0].shape[1] == encoder.hidden_size == 64 and ours[0].dtype == torch.float32


def test_encode_padded_batch(encoder: PromptEncoder, reference) -> None:
    prompts = [SHORT, LONG, ""]
    ours = encoder.encode(prompts)
    assert len({t.shape[0] for t in ours}) == 3
    _assert_close(ours, _reference_rows(reference, prompts, 512))
    # each prompt alone gives the same rows as in the padded batch
    _assert_close([encoder.encode([p])[0] for p in prompts], ours)


@pytest.mark.parametrize("max_sequence_length", [1, 7, 20])
def test_encode_truncates(encoder: PromptEncoder, reference, max_sequence_length: int) -> None:
    prompts = [LONG, SHORT]
    ours = encoder.encode(prompts, max_sequence_length=max_sequence_length)
    assert ours[0].shape[0] == max_sequence_length
    _assert_close(ours, _reference_rows(reference, prompts, max_sequence_length))


def test_pad_embeddings_matches_the_reference_layout(encoder: PromptEncoder, reference) -> None:
    prompts = [SHORT, LONG]
    embeds, mask = pad_embeddings(encoder.encode(prompts))
    ref_embeds, ref_mask = reference._get_qwen_prompt_embeds(prompts, device=torch.device("cpu"))
    assert embeds.shape == ref_embeds.shape and mask.dtype == torch.long
    assert torch.equal(mask, ref_mask)
    assert ((embeds - ref_embeds).norm() / ref_embeds.norm()).item() < 1e-5
    assert torch.all(embeds[0, mask[0] == 0] == 0)


def test_encode_rejects_bad_input(encoder: PromptEncoder) -> None:
    for bad in (0, 1025, -3, 2.5, True):
        with pytest.raises(ValueError, match="max_sequence_length"):
            encoder.encode([SHORT], max_sequence_length=bad)
    with pytest.raises(ValueError, match="list of strings"):
        encoder.encode(SHORT)
    with pytest.raises(ValueError, match="list of strings"):
        encoder.encode([SHORT, None])
    assert encoder.encode([]) == []
    assert encoder.encode([SHORT], max_sequence_length=1024)[0].shape[0] < 1024
    with pytest.raises(ValueError):
        pad_embeddings([])
    with pytest.raises(ValueError, match="hidden size"):
        pad_embeddings([torch.zeros(2, 4), torch.zeros(2, 5)])


def test_bfloat16(tiny_checkpoint: Path, encoder: PromptEncoder) -> None:
    bf16 = PromptEncoder.from_pretrained(tiny_checkpoint, device="cpu", dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16
    out = bf16.encode([SHORT])[0]
    assert out.dtype == torch.bfloat16
    full = encoder.encode([SHORT])[0]
    assert ((out.float() - full).norm() / full.norm()).item() < 0.05


def test_encode_refuses_text_the_tokenizer_cannot_take(encoder: PromptEncoder) -> None:
    with pytest.raises(ValueError, match=r"prompt 1 is not valid Unicode text: .* U\+D800 at character 2"):
        encoder.encode([SHORT, "ab\ud800"])
    assert encoder.encode(["nul \x00 and \uffff"])[0].shape[0] > 0  # odd but valid text is fine


def test_caption_without_the_processor_explains_and_remembers(
    tiny_checkpoint: Path, encoder: PromptEncoder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the processor cannot load, captioning says why and what to do, once; encoding still works."""
    loads = []
    real_load = te._load_processor
    monkeypatch.setattr(te, "_load_processor", lambda path: loads.append(path) or real_load(path))
    broken = PromptEncoder(encoder.model, encoder.tokenizer, tmp_path / "no-processor")
    image = Image.new("RGBA", (96, 64), (200, 30, 30, 255))
    with pytest.raises(CaptionUnavailableError, match="non-empty prompt") as info:
        broken.caption(image, use_en_prompt=True)
    assert "processor" in str(info.value) and str(broken.processor_path) in str(info.value)
    with pytest.raises(CaptionUnavailableError):  # the failure is remembered, not retried
        broken.caption(image, use_en_prompt=False)
    assert loads == [tmp_path / "no-processor"]
    assert broken.encode([SHORT])[0].shape == encoder.encode([SHORT])[0].shape


def test_caption(encoder: PromptEncoder, reference) -> None:
    require_reference_captions()
    image = Image.new("RGBA", (96, 64), (200, 30, 30, 255))
    for use_en_prompt in (True, False):
        caption = encoder.caption(image, use_en_prompt=use_en_prompt)
        assert isinstance(caption, str)
        assert caption == reference.get_image_caption(image, use_en_prompt=use_en_prompt, device="cpu")
    assert len(encoder.caption(image, use_en_prompt=True, max_new_tokens=3)) <= 3 * 32


def test_caption_rejects_bad_input(encoder: PromptEncoder) -> None:
    with pytest.raises(ValueError, match="PIL image"):
        encoder.caption(b"not an image", use_en_prompt=True)
    with pytest.raises(ValueError, match="max_new_tokens"):
        encoder.caption(Image.new("RGB", (32, 32)), use_en_prompt=True, max_new_tokens=0)


def test_empty_prompt_is_captioned_from_what_the_reference_captions(
    tiny_checkpoint: Path, reference, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reference captions the input resized to its bucket (Lanczos, RGBA as given), not the upload."""
    require_reference_captions()
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 256, (64, 96, 4), dtype=np.uint8))  # its 640 bucket: 768x512
    seen: dict[str, object] = {}

    class Stop(Exception):
        pass

    def reference_caption(prompt_image, use_en_prompt=True, device=None):
        seen["reference_image"] = prompt_image
        return type(reference).get_image_caption(reference, prompt_image, use_en_prompt=use_en_prompt, device=device)

    def reference_encode_prompt(prompt=None, **kwargs):
        seen["reference_prompt"] = prompt
        raise Stop  # the prompt is known: the rest of the reference call is not needed

    monkeypatch.setattr(reference, "get_image_caption", reference_caption)
    monkeypatch.setattr(reference, "encode_prompt", reference_encode_prompt)
    with pytest.raises(Stop):
        reference(image=image, prompt="", layers=2, resolution=640, num_inference_steps=1, use_en_prompt=True)

    ours = LayeredPipeline.from_pretrained(tiny_checkpoint, device="cpu", dtype=torch.float32)
    captioned = []
    monkeypatch.setattr(ours, "caption", lambda im, en: captioned.append(im) or LayeredPipeline.caption(ours, im, en))
    params = GenerationParams(layers=2, resolution=640, num_inference_steps=1, use_en_prompt=True)
    for given in (image, resize_to_bucket(image, 640)):  # as the offline pipeline and as the server pass it
        prompt = ours.encode_prompts(given, "", " ", params)[2]
        assert prompt == seen["reference_prompt"] and prompt
    reference_image = seen["reference_image"]
    for im in captioned:
        assert im.size == reference_image.size == (768, 512) and im.mode == reference_image.mode == "RGBA"
        assert np.array_equal(np.asarray(im), np.asarray(reference_image))
