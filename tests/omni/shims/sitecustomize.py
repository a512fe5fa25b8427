"""Test-only: transformers' torchvision image processors resolve to their PIL twins (no torchvision)."""
import importlib
import importlib.abc
import importlib.util
import sys


class _PilTwin(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        head, _, leaf = fullname.rpartition(".")
        if not (head.startswith("transformers.models.") and leaf.startswith("image_processing_")):
            return None
        if leaf.startswith("image_processing_pil_") or leaf in ("image_processing_auto",):
            return None
        twin = f"{head}.image_processing_pil_{leaf[len('image_processing_'):]}"
        if importlib.util.find_spec(twin) is None:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        head, _, leaf = spec.name.rpartition(".")
        return importlib.import_module(f"{head}.image_processing_pil_{leaf[len('image_processing_'):]}")

    def exec_module(self, module):
        pass


sys.meta_path.insert(0, _PilTwin())
