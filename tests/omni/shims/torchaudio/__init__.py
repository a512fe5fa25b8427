"""Test-only stand-in: vLLM-Omni's chat server imports torchaudio (and submodules) at module level;
image edits never call it. Every submodule imports; every name is a function that raises."""
import importlib.abc
import importlib.util
import sys
import types


def _unavailable(name):
    def missing(*args, **kwargs):
        raise RuntimeError(f"torchaudio is not available in this test environment ({name})")

    return missing


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return _unavailable(name)


class _Stub(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname.startswith("torchaudio."):
            return importlib.util.spec_from_loader(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__getattr__ = __getattr__
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


sys.meta_path.insert(0, _Stub())
