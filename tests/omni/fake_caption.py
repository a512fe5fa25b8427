"""Test-only vLLM-Omni general plugin: a fixed caption per language in the servers the tests start.

The embedded tiny model captions an empty prompt with random tokens, which do not show which instruction
(English or Chinese) it was given. Where ``FAKE_CAPTION_ENV`` is set, ``LayeredPipeline.caption`` returns
``CAPTIONS[use_en_prompt]`` instead, so a request shows which language its pipeline was asked for.
"""

from __future__ import annotations

import os

FAKE_CAPTION_ENV = "VLLM_LAYERED_TEST_FAKE_CAPTION"
CAPTIONS = {True: "a caption written in English", False: "一段中文图像描述"}


def register() -> None:
    if os.environ.get(FAKE_CAPTION_ENV) != "1":
        return
    from vllm_layered.model_executor.pipeline import LayeredPipeline

    def caption(self, image, use_en_prompt: bool) -> str:
        return CAPTIONS[bool(use_en_prompt)]

    LayeredPipeline.caption = caption
