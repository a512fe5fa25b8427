"""The prompt encoder: Qwen2.5-VL's last hidden state over a fixed template, and image captioning.

Prompts are wrapped in a fixed system template whose first 34 tokens (the system part and the
user header) are dropped; each prompt gives one unpadded ``[L, hidden]`` tensor. An empty prompt
is replaced by a caption that the same VLM writes for the input image. Only captioning needs the
multimodal processor, so it is loaded on first use; it is built without its video processor (captions
never pass a video, and the video processor is the one part that needs torchvision), so captioning works
without torchvision too.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from vllm_layered.model_executor.model_loader.dummy_loader import check_load_format, dummy_text_encoder
from vllm_layered.model_executor.text import check_text

PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
TEMPLATE_PREFIX_TOKENS = 34  # "<|im_start|>system\n...background:<|im_end|>\n<|im_start|>user\n"
MAX_SEQUENCE_LENGTH_LIMIT = 1024

# The reference pipeline's captioning instructions, kept byte for byte (line breaks included).
CAPTION_PROMPT_CN = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n# 图像标注器\n"
    "你是一个专业的图像标注器。请基于输入图像，撰写图注:\n1.\n"
    "使用自然、描述性的语言撰写图注，不要使用结构化形式或富文本形式。\n2. 通过加入以下内容，丰富图注细节：\n"
    " - 对象的属性：如数量、颜色、形状、大小、位置、材质、状态、动作等\n -\n"
    "对象间的视觉关系：如空间关系、功能关系、动作关系、从属关系、比较关系、因果关系等\n"
    " - 环境细节：例如天气、光照、颜色、纹理、气氛等\n"
    " - 文字内容：识别图像中清晰可见的文字，不做翻译和解释，用引号在图注中强调\n3.\n"
    "保持真实性与准确性：\n - 不要使用笼统的描述\n -\n"
    "描述图像中所有可见的信息，但不要加入没有在图像中出现的内容\n"
    "<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n<|im_start|>assistant\n"
)
CAPTION_PROMPT_EN = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n# Image Annotator\n"
    "You are a professional\nimage annotator. Please write an image caption based on the input image:\n"
    "1. Write the caption using natural,\ndescriptive language without structured formats or rich text.\n"
    "2. Enrich caption details by including: \n - Object\nattributes, such as quantity, color, shape, size, "
    "material, state, position, actions, and so on\n - Vision Relations\nbetween objects, such as spatial "
    "relations, functional relations, possessive relations, attachment relations, action\nrelations, "
    "comparative relations, causal relations, and so on\n - Environmental details, such as weather, "
    "lighting,\ncolors, textures, atmosphere, and so on\n - Identify the text clearly visible in the image, "
    "without translation or\nexplanation, and highlight it in the caption with quotation marks\n"
    "3. Maintain authenticity and accuracy:\n - Avoid\ngeneralizations\n - Describe all visible information "
    "in the image, while do not add information not explicitly shown in\nthe image\n"
    "<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n<|im_start|>assistant\n"
)


class CaptionUnavailableError(RuntimeError):
    """Auto-captioning was asked for but the multimodal processor cannot be loaded here."""


class PromptEncoder:
    """Qwen2.5-VL text encoder, its tokenizer and (loaded on first use) its processor."""

    def __init__(self, model, tokenizer, processor_path: Path) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.processor_path = processor_path
        self._processor = None
        self._processor_error: CaptionUnavailableError | None = None
        self._processor_lock = threading.Lock()

    @classmethod
    def from_pretrained(
        cls,
        root: str | Path,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        load_format: str = "safetensors",
    ) -> PromptEncoder:
        """Load ``root/text_encoder`` and ``root/tokenizer`` of a diffusers-layout folder
        (``load_format="dummy"``: the text encoder's config with random weights, see model_loader/dummy_loader.py)."""
        from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration
        from transformers.utils import is_accelerate_available

        root = Path(root)
        device = torch.device(device)
        if check_load_format(load_format) == "dummy":
            model = dummy_text_encoder(root / "text_encoder", device=device, dtype=dtype)
        else:
            kwargs: dict = {"dtype": dtype}
            if device.type != "cpu" and is_accelerate_available():
                kwargs["device_map"] = str(device)  # stream the weights straight to the device
            model = Qwen2_5_VLForConditionalGeneration.from_pretrained(root / "text_encoder", **kwargs)
        model.to(device).eval().requires_grad_(False)
        tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
        return cls(model, tokenizer, root / "processor")

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def hidden_size(self) -> int:
        return self.model.config.text_config.hidden_size

    @torch.no_grad()
    def encode(self, prompts: Sequence[str], *, max_sequence_length: int = 512) -> list[torch.Tensor]:
        """One ``[L_i, hidden]`` tensor per prompt, L_i = min(tokens after the template prefix, max).

        Equals the reference's padded-batch encoding row for row: prompts are right-padded into one
        batch and run with the attention mask. Tokens past ``34 + max_sequence_length`` are cut
        before the forward; attention is causal, so the kept rows do not change.
        """
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be a list of strings")
        for i, prompt in enumerate(prompts):
            check_text(prompt, f"prompt {i}")
        if (
            isinstance(max_sequence_length, bool)
            or not isinstance(max_sequence_length, int)
            or not 1 <= max_sequence_length <= MAX_SEQUENCE_LENGTH_LIMIT
        ):
            raise ValueError(
                f"max_sequence_length must be an integer in [1, {MAX_SEQUENCE_LENGTH_LIMIT}], "
                f"got {max_sequence_length!r}"
            )
        if not prompts:
            return []
        keep = TEMPLATE_PREFIX_TOKENS + max_sequence_length
        token_ids = [ids[:keep] for ids in self.tokenizer([PROMPT_TEMPLATE.format(p) for p in prompts])["input_ids"]]
        lengths = [len(ids) for ids in token_ids]
        width = max(lengths)
        pad_id = self.tokenizer.pad_token_id or 0
        input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, ids in enumerate(token_ids):
            input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[i, : len(ids)] = 1
        hidden = self.model.model(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            use_cache=False,
        ).last_hidden_state
        return [hidden[i, TEMPLATE_PREFIX_TOKENS:n] for i, n in enumerate(lengths)]

    @torch.no_grad()
    def caption(self, image: Image.Image, *, use_en_prompt: bool, max_new_tokens: int = 512) -> str:
        """A caption of ``image`` written by the VLM (greedy), with the English or Chinese instruction.

        Raises CaptionUnavailableError, naming the cause, if the processor cannot be loaded here.
        """
        if not isinstance(image, Image.Image):
            raise ValueError(f"image must be a PIL image, got {type(image).__name__}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        processor = self.processor
        prompt = CAPTION_PROMPT_EN if use_en_prompt else CAPTION_PROMPT_CN
        inputs = processor(text=prompt, images=image, padding=True, return_tensors="pt").to(self.device)
        generated = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new_tokens = generated[:, inputs["input_ids"].shape[1] :]
        text = processor.batch_decode(new_tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return text[0].strip()

    @property
    def processor(self):
        """The Qwen2VLProcessor of ``root/processor`` (images only), loaded on first use."""
        with self._processor_lock:
            if self._processor is None and self._processor_error is None:
                self._processor, self._processor_error = _load_processor(self.processor_path)
        if self._processor_error is not None:
            raise self._processor_error
        return self._processor


def _load_processor(path: Path):
    """(processor, None) or (None, the error to raise on every caption)."""
    try:
        return load_caption_processor(path), None
    except Exception as exc:
        cause = f"{type(exc).__name__}: {' '.join(str(exc).split())}".rstrip(".")
        error = CaptionUnavailableError(
            f"auto-captioning (an empty prompt) needs the processor in {path}, which could not be loaded: "
            f"{cause}. Give a non-empty prompt to skip captioning."
        )
        error.__cause__ = exc
        return None, error


def load_caption_processor(path: Path, *, pil: bool | None = None):
    """The Qwen2VLProcessor of ``path`` without its video processor.

    Its image processor is transformers' default (``pil`` False), as Qwen2VLProcessor.from_pretrained loads
    it: the torchvision one, so captions equal the full processor's. ``pil`` True takes the PIL one instead,
    whose resize differs slightly from torchvision's (so may a caption); None (default): PIL only where
    torchvision cannot be imported.
    """
    from transformers import AutoImageProcessor, AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    if pil is None:
        pil = _torchvision_problem() is not None
    image_processor = (Qwen2VLImageProcessorPil if pil else AutoImageProcessor).from_pretrained(path)
    processor_class = _image_only_processor_class()
    return processor_class(image_processor=image_processor, tokenizer=AutoTokenizer.from_pretrained(path))


@functools.cache
def _image_only_processor_class() -> type:
    from transformers import Qwen2VLProcessor

    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
        # transformers takes a processor's parts from its __init__ signature: no video_processor here.
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs) -> None:
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    return ImageOnlyQwen2VLProcessor


def _torchvision_problem() -> str | None:
    try:
        import torchvision  # noqa: F401
    except Exception as exc:  # a mismatched build fails with RuntimeError, not ImportError
        return f"{type(exc).__name__}: {exc}"
    return None


def pad_embeddings(embeds: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad ``[L_i, H]`` tensors with zeros: ``(embeds [B, L, H], mask [B, L] long)``."""
    if len(embeds) == 0:
        raise ValueError("pad_embeddings needs at least one tensor")
    if any(e.dim() != 2 or e.shape[1] != embeds[0].shape[1] for e in embeds):
        raise ValueError(f"expected [L, H] tensors of one hidden size, got shapes {[tuple(e.shape) for e in embeds]}")
    first = embeds[0]
    width = max(e.shape[0] for e in embeds)
    out = first.new_zeros((len(embeds), width, first.shape[1]))
    mask = torch.zeros((len(embeds), width), dtype=torch.long, device=first.device)
    for i, e in enumerate(embeds):
        out[i, : e.shape[0]] = e
        mask[i, : e.shape[0]] = 1
    return out, mask
