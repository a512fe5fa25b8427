"""Registers the test-only CPU platform (cpu_omni_platform.py) and caption plugin (fake_caption.py) with
vLLM-Omni before it is imported, and loads the import shims (shims/) into this process.

vLLM-Omni resolves its platform when first imported, from the entry-point group
``vllm_omni.platform_plugins``, and runs the group ``vllm_omni.general_plugins`` in every process it
starts. A throw-away ``.dist-info`` folder on ``sys.path`` declares both entry points for this process;
``PLUGIN_PATH`` also goes on ``PYTHONPATH`` of servers the tests start. vLLM-Omni's server modules
(which our /v1/images/edits route imports from) need the shims, as the servers do.
"""

from __future__ import annotations

import atexit
import importlib.util
import shutil
import sys
import tempfile
from pathlib import Path

DIST_NAME = "vllm_layered_test_cpu_omni_platform"
PLUGIN_PATH = Path(tempfile.mkdtemp(prefix="omni-cpu-platform-"))
SHIMS = Path(__file__).parent / "shims"
atexit.register(shutil.rmtree, PLUGIN_PATH, True)


def _install_test_plugins(directory: Path) -> None:
    info = directory / f"{DIST_NAME}-0.0.0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {DIST_NAME}\nVersion: 0.0.0\n")
    (info / "entry_points.txt").write_text(
        "[vllm_omni.platform_plugins]\ncpu = tests.omni.cpu_omni_platform:platform_plugin\n\n"
        "[vllm_omni.general_plugins]\nfake_caption = tests.omni.fake_caption:register\n"
    )


def _load_shims() -> None:
    """What shims/ does in the servers' processes (PYTHONPATH + its sitecustomize), in this one; only
    where vLLM-Omni is installed (.ci/omni's environment), not in the main test run."""
    if importlib.util.find_spec("vllm_omni") is None:
        return
    sys.path.insert(0, str(SHIMS))
    spec = importlib.util.spec_from_file_location("_omni_test_sitecustomize", SHIMS / "sitecustomize.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))


_install_test_plugins(PLUGIN_PATH)
sys.path.insert(0, str(PLUGIN_PATH))
_load_shims()
