"""Registers the test-only CPU platform (cpu_omni_platform.py) with vLLM-Omni before it is imported.

vLLM-Omni resolves its platform when first imported, from the entry-point group
``vllm_omni.platform_plugins``. A throw-away ``.dist-info`` folder on ``sys.path`` declares the entry
point for this process; ``PLUGIN_PATH`` also goes on ``PYTHONPATH`` of servers the tests start.
"""

from __future__ import annotations

import atexit
import shutil
import sys
import tempfile
from pathlib import Path

DIST_NAME = "vllm_layered_test_cpu_omni_platform"
PLUGIN_PATH = Path(tempfile.mkdtemp(prefix="omni-cpu-platform-"))
atexit.register(shutil.rmtree, PLUGIN_PATH, True)


def _install_platform_plugin(directory: Path) -> None:
    info = directory / f"{DIST_NAME}-0.0.0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {DIST_NAME}\nVersion: 0.0.0\n")
    (info / "entry_points.txt").write_text(
        "[vllm_omni.platform_plugins]\ncpu = tests.omni.cpu_omni_platform:platform_plugin\n"
    )


_install_platform_plugin(PLUGIN_PATH)
sys.path.insert(0, str(PLUGIN_PATH))
