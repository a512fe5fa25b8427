"""Where the model's weights come from: a checkpoint, seeded random values, or a checkpoint written here.

- weight_loader.py: safetensors (one file or shards) streamed onto the target device into meta-built modules;
- dummy_loader.py: ``--load-format dummy``, the same tensors drawn at random (seeded), no file read;
- dummy_checkpoint.py: the released model's configs (no weights), what ``--load-format dummy`` loads by default;
- random_weights.py: the seeded values both the dummy loader and the tiny checkpoint use;
- tiny_checkpoint.py: the embedded default model, a tiny random checkpoint in the official folder layout,
  written on first use (it ships on purpose: the CLI runs on a fresh machine with no download);
- folders.py: how those two folders are written (atomically) and reused (while their configs match).
"""
