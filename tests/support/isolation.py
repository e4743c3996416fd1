"""A fresh Python process without the package: what a Hub user who never installed hf-wemoe has."""

# Prepend to the code of a subprocess: any import of hf_wemoe then fails, so the code can only use what a saved
# folder brings along (its own model files, run as remote code).
WITHOUT_PACKAGE = """
import importlib.abc
import sys


class _BlockPackage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "hf_wemoe" or name.startswith("hf_wemoe."):
            raise ImportError("hf_wemoe is blocked in this process")


sys.meta_path.insert(0, _BlockPackage())
"""
