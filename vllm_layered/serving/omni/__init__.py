"""The vLLM-Omni plugin: ``vllm serve Qwen/Qwen-Image-Layered --omni`` runs our model executor.

vLLM-Omni calls :func:`register` (entry-point group ``vllm_omni.general_plugins``) in every process it
starts; it maps the checkpoint's architecture name ``QwenImageLayeredPipeline`` to
:class:`vllm_layered.serving.omni.pipeline.OmniLayeredPipeline`. This module imports nothing from
vLLM-Omni at import time, so the rest of the package works without it; ``pipeline`` needs it.
"""

from __future__ import annotations

from vllm_layered.model_executor.pipeline import PIPELINE_CLASS

PIPELINE_MODULE = "vllm_layered.serving.omni.pipeline"
ADAPTER_CLASS = "OmniLayeredPipeline"
PRE_PROCESS_FUNC = "get_layered_pre_process_func"


def register() -> None:
    """Replace vLLM-Omni's built-in QwenImageLayeredPipeline with ours (safe to call more than once)."""
    from vllm_omni.diffusion.registry import register_diffusion_model

    register_diffusion_model(
        PIPELINE_CLASS,
        PIPELINE_MODULE,
        ADAPTER_CLASS,
        pre_process_func_name=PRE_PROCESS_FUNC,
    )
