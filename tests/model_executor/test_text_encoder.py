"""PromptEncoder against diffusers' QwenImageLayeredPipeline.encode_prompt / get_image_caption."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import torch
from PIL import Image

from vllm_layered.model_executor.models import text_encoder as te
from vllm_layered.model_executor.models.text_encoder import CaptionUnavailableError, PromptEncoder, pad_embeddings

pytest.importorskip("diffusers")

SHORT = "a red cat"
LONG = (
    "Two yellow birds fly over the old stone bridge while the sun sets behind the tall mountains, "
    "and a young woman in a long black coat walks her brown dog along the wet street."
)


def _torchvision_importable() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:
        return False
    return True


@pytest.fixture(scope="module")
def encoder(tiny_checkpoint: Path) -> PromptEncoder:
    return PromptEncoder.from_pretrained(tiny_checkpoint, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def reference(tiny_checkpoint: Path):
    from diffusers import QwenImageLayeredPipeline

    processor = {} if _torchvision_importable() else {"processor": None}
    return QwenImageLayeredPipeline.from_pretrained(tiny_checkpoint, torch_dtype=torch.float32, **processor)


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
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_layered

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


def test_caption(encoder: PromptEncoder, reference) -> None:
    image = Image.new("RGBA", (96, 64), (200, 30, 30, 255))
    if not _torchvision_importable():
        with pytest.raises(CaptionUnavailableError, match="torchvision") as info:
            encoder.caption(image, use_en_prompt=True)
        assert "processor" in str(info.value) and str(encoder.processor_path) in str(info.value)
        with pytest.raises(CaptionUnavailableError):  # the failure is remembered, not retried
            encoder.caption(image, use_en_prompt=False)
        assert encoder.encode([SHORT])  # everything else still works
        return
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
