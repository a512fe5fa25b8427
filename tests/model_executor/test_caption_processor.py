"""Auto-captioning's processor: without its video processor, so captions work with and without torchvision."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from vllm_layered.model_executor.models.text_encoder import (
    CAPTION_PROMPT_CN,
    CAPTION_PROMPT_EN,
    PromptEncoder,
    load_caption_processor,
)

# Sizes that make the processor shrink, enlarge and round an image to its 28-pixel grid.
SIZES = ((96, 64), (300, 200), (1000, 700), (97, 1203))


def _torchvision_importable() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:
        return False
    return True


def _image(width: int, height: int, seed: int = 0) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def _inputs(processor, image: Image.Image, prompt: str) -> dict[str, torch.Tensor]:
    return dict(processor(text=prompt, images=image, padding=True, return_tensors="pt"))


def _assert_same_inputs(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key


@pytest.mark.skipif(not _torchvision_importable(), reason="the full Qwen2VLProcessor needs torchvision")
@pytest.mark.parametrize("pil", [False, True])
def test_model_inputs_equal_the_full_processor(tiny_checkpoint: Path, pil: bool) -> None:
    """Token ids, pixels, grid and token types are the full processor's, bit for bit, for either image backend."""
    from transformers import AutoTokenizer, AutoVideoProcessor, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    path = tiny_checkpoint / "processor"
    if not pil:  # what captioning used before: the processor as transformers loads it
        full = Qwen2VLProcessor.from_pretrained(path)
    else:  # the video processor has no PIL backend: assemble the full processor around the PIL image processor
        full = Qwen2VLProcessor(
            Qwen2VLImageProcessorPil.from_pretrained(path), AutoTokenizer.from_pretrained(path),
            AutoVideoProcessor.from_pretrained(path),
        )
    ours = load_caption_processor(path, pil=pil)
    assert not hasattr(ours, "video_processor")
    assert type(ours.image_processor) is type(full.image_processor)
    for size in SIZES:
        for prompt in (CAPTION_PROMPT_EN, CAPTION_PROMPT_CN):
            _assert_same_inputs(_inputs(ours, _image(*size), prompt), _inputs(full, _image(*size), prompt))


_CAPTION_WITHOUT_TORCHVISION = """
import json, sys
sys.modules["torchvision"] = None  # import torchvision now raises ImportError, as where it is not installed
import torch
from PIL import Image
from transformers import Qwen2VLProcessor
from vllm_layered.model_executor.models.text_encoder import PromptEncoder
try:
    Qwen2VLProcessor.from_pretrained(sys.argv[1] + "/processor")
    full = "loaded"
except ImportError as exc:
    full = str(exc)
encoder = PromptEncoder.from_pretrained(sys.argv[1], device="cpu", dtype=torch.float32)
image = Image.open(sys.argv[2])
captions = [encoder.caption(image, use_en_prompt=en, max_new_tokens=48) for en in (True, False)]
print(json.dumps({"full": full, "backend": type(encoder.processor.image_processor).__name__, "captions": captions}))
"""


def test_captions_without_torchvision(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """Where torchvision cannot be imported, captions still work: with the PIL image processor."""
    image_path = tmp_path / "in.png"
    _image(300, 200, seed=1).save(image_path)
    done = subprocess.run(
        [sys.executable, "-c", _CAPTION_WITHOUT_TORCHVISION, str(tiny_checkpoint), str(image_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert "torchvision" in result["full"].lower()  # the full processor cannot load there
    assert result["backend"] == "Qwen2VLImageProcessorPil"

    encoder = PromptEncoder.from_pretrained(tiny_checkpoint, device="cpu", dtype=torch.float32)
    encoder._processor = load_caption_processor(tiny_checkpoint / "processor", pil=True)
    expected = [encoder.caption(Image.open(image_path), use_en_prompt=en, max_new_tokens=48) for en in (True, False)]
    assert result["captions"] == expected and all(expected)
