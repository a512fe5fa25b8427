"""The vLLM-Omni plugin: ``vllm serve Qwen/Qwen-Image-Layered --omni`` runs our model executor.

vLLM-Omni calls :func:`register` (entry-point group ``vllm_omni.general_plugins``) in every process it
starts; it maps the checkpoint's architecture name ``QwenImageLayeredPipeline`` to
:class:`vllm_layered.serving.omni.pipeline.OmniLayeredPipeline` and, in the API server process, makes
``/v1/images/edits`` answer with our server's response body (images_edits.py). This module imports
nothing from vLLM-Omni at import time, so the rest of the package works without it; ``pipeline`` and
``images_edits`` need it.
"""

from __future__ import annotations

import sys

from vllm_layered.model_executor.pipeline import PIPELINE_CLASS

PIPELINE_MODULE = "vllm_layered.serving.omni.pipeline"
ADAPTER_CLASS = "OmniLayeredPipeline"
PRE_PROCESS_FUNC = "get_layered_pre_process_func"
OMNI_API_SERVER = "vllm_omni.entrypoints.openai.api_server"


def register() -> None:
    """Replace vLLM-Omni's built-in QwenImageLayeredPipeline with ours and, where vLLM-Omni's API server
    runs, its /v1/images/edits response (safe to call more than once).

    vLLM-Omni's CLI imports its API server module before it loads plugins, and adds that module's
    router to the app after; other processes (engine, workers) do not import it and serve no HTTP.
    Raises RuntimeError if this vLLM-Omni's server is not the one the route was written against."""
    from vllm_omni.diffusion.registry import register_diffusion_model

    register_diffusion_model(
        PIPELINE_CLASS,
        PIPELINE_MODULE,
        ADAPTER_CLASS,
        pre_process_func_name=PRE_PROCESS_FUNC,
    )
    server = sys.modules.get(OMNI_API_SERVER)
    if server is None:
        return
    try:
        from vllm_layered.serving.omni import images_edits
    except ImportError as e:
        raise RuntimeError(
            f"vllm-layered cannot serve its /v1/images/edits response on this vLLM-Omni ({e}); its plugin is "
            "written against vLLM-Omni 0.30"
        ) from e
    images_edits.install(server)
