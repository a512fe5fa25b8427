"""The names users import keep working where they were (the README's "Moved" list says where the rest went)."""

from __future__ import annotations


def test_public_import_paths():
    from vllm_layered import LayeredPipeline
    from vllm_layered.cli import main
    from vllm_layered.model_executor.forward_batch import SequenceLayout as batch_module_name
    from vllm_layered.model_executor.pipeline import LayeredPipeline as pipeline_module_name
    from vllm_layered.model_executor.sequence_layout import SequenceLayout
    from vllm_layered.serving.api_server import build_app
    from vllm_layered.serving.engine.engine import AsyncLayeredEngine, ThreadedEngine

    assert LayeredPipeline is pipeline_module_name
    assert AsyncLayeredEngine is ThreadedEngine  # the engine's first name
    assert batch_module_name is SequenceLayout  # where it was defined before it had its own module
    assert callable(build_app) and callable(main)
