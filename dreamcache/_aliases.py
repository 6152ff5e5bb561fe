"""Old module paths (before the core / comfy / apps layout of 0.2) kept importable for users' scripts.

``import dreamcache.patch`` still works and gives the very module ``dreamcache.core.patch`` (with a
DeprecationWarning). The pack's own code imports the new paths.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

#: old submodule (relative to the package) -> new one
MOVED = {
    **{m: f"core.{m}" for m in ("adapter", "adapter_io", "attention", "block", "cache", "capture", "errors", "image",
                                "layers", "patch", "sam", "subject")},
    **{m: f"apps.{m}" for m in ("cli", "runner", "workflow")},
    "server": "apps.comfy_client",
    "apps.server": "apps.comfy_client",
    "comfy.trainer": "apps.trainer",
    "comfy.synth": "apps.synth",
    "comfy.patching": "comfy.apply_patch",
}


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        warnings.warn(f"{module.__name__} moved to {self.target}; import it from there.", DeprecationWarning,
                      stacklevel=2)
        # The import system re-reads sys.modules after exec_module, so the old name now *is* the new module.
        sys.modules[module.__name__] = importlib.import_module(self.target)


class _AliasFinder(importlib.abc.MetaPathFinder):
    def __init__(self, package: str):
        self.map = {f"{package}.{old}": f"{package}.{new}" for old, new in MOVED.items()}

    def find_spec(self, fullname, path=None, target=None):
        new = self.map.get(fullname)
        return None if new is None else importlib.util.spec_from_loader(fullname, _AliasLoader(new))


def install(package: str) -> None:
    if not any(isinstance(f, _AliasFinder) and f.map == _AliasFinder(package).map for f in sys.meta_path):
        sys.meta_path.append(_AliasFinder(package))
