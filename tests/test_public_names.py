"""The names users import keep working where they were (the README's "Moved" list says where the rest went), and
the moved ones import from their new homes."""

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


def test_moved_names_import_from_their_new_homes():
    from vllm_layered import formats
    from vllm_layered.clients import DecomposeOptions, Layers, tree_from_response
    from vllm_layered.layer_tree import TreeJob
    from vllm_layered.serving.intake import decode_upload, load_request_image

    for name in ("save_layers", "save_tree", "tree_files", "package_bytes", "stack_tree", "encode_png",
                 "encode_webp", "layer_name", "layer_file_name", "check_layers", "composite_layers"):
        assert callable(getattr(formats, name)), name
    assert formats.SAVE_FORMATS == ("png", *formats.PACKAGE_FORMATS) and formats.IMAGE_FORMATS == ("png", "webp")
    assert set(formats.MIME_TYPES) == {*formats.SAVE_FORMATS, *formats.IMAGE_FORMATS}
    assert "steps" in DecomposeOptions.__annotations__ and callable(Layers.save_psd) and callable(tree_from_response)
    assert TreeJob.__dataclass_fields__.keys() == {"path", "image", "layers", "prompt", "seed"}
    assert callable(load_request_image) and callable(decode_upload)
