"""Every compatibility shim of the pack, in one place, each with the release that removes it.

Old module paths stay importable for users' scripts: ``import dreamcache.patch`` gives the very module
``dreamcache.core.patch``, with a DeprecationWarning that names the new path and the release that drops the old
one. Three kinds of old path:

* :data:`MOVED`: a module that moved (the 0.1 flat layout, and the single-room ``dreamcache.apps`` of the
  development versions before one folder per application); an import hook serves the old name.
* :data:`MOVED_NAMES`: a module that became a package of the same name (``dreamcache.apps.train``): the names it
  held are served by the package's ``__getattr__`` (:func:`moved_attributes`).
* :data:`ENTRY_MODULES`: ``dreamcache.train`` and ``dreamcache.data``, command entry points now; imported (0.1
  scripts), they give the library they held (:func:`entry_module_imported`).

The pack's own code imports the new paths only (tests/test_architecture.py checks that importing it warns about
nothing).
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings

#: The release that removes the 0.1 paths (0.2 keeps them, with a warning).
OLD_LAYOUT_REMOVED_IN = "0.3.0"
#: The release that removes the development paths of the single-room dreamcache.apps (never in a release).
APPS_ROOM_REMOVED_IN = "0.3.0"

#: old submodule (relative to the package) -> (new one, the release that removes the old path)
MOVED = {
    **{m: (f"core.{m}", OLD_LAYOUT_REMOVED_IN)
       for m in ("adapter", "adapter_io", "attention", "block", "cache", "capture", "errors", "image", "layers",
                 "patch", "sam", "subject")},
    **{m: (f"apps.run.{m}", OLD_LAYOUT_REMOVED_IN) for m in ("cli", "runner", "workflow")},
    "server": ("apps.run.comfy_client", OLD_LAYOUT_REMOVED_IN),
    "comfy.trainer": ("apps.train.loop", OLD_LAYOUT_REMOVED_IN),
    "comfy.synth": ("apps.data.synth", OLD_LAYOUT_REMOVED_IN),
    "comfy.patching": ("comfy.apply_patch", OLD_LAYOUT_REMOVED_IN),
    "core.layout": ("core.placement", APPS_ROOM_REMOVED_IN),
    **{f"apps.{m}": (f"apps.run.{m}", APPS_ROOM_REMOVED_IN) for m in ("cli", "runner", "comfy_client", "workflow")},
    "apps.trainer": ("apps.train.loop", APPS_ROOM_REMOVED_IN),
    "apps.train_cli": ("apps.train.cli", APPS_ROOM_REMOVED_IN),
    "apps.distributed": ("apps.train.parallel", APPS_ROOM_REMOVED_IN),
    "apps.synth": ("apps.data.synth", APPS_ROOM_REMOVED_IN),
    "apps.eval.training": ("apps.train.evaluation", APPS_ROOM_REMOVED_IN),
}

#: package that was a module -> (the module now holding its names, the release that removes the old names)
MOVED_NAMES = {
    "apps.train": ("apps.train.config", APPS_ROOM_REMOVED_IN),
}

#: entry module -> (the library an import of it gives, the release from which an import gives nothing)
ENTRY_MODULES = {
    "train": ("apps.train.config", OLD_LAYOUT_REMOVED_IN),
    "data": ("apps.data", OLD_LAYOUT_REMOVED_IN),
}


def _warn(old: str, new: str, release: str, stacklevel: int = 3):
    warnings.warn(f"{old} moved to {new}; import it from there ({old} goes in release {release}).",
                  DeprecationWarning, stacklevel=stacklevel)


def _split(name: str) -> tuple[str, str]:
    """``dreamcache.apps.train`` -> (``dreamcache``, ``apps.train``)."""
    package, _, rest = name.partition(".")
    return package, rest


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str, release: str):
        self.target, self.release = target, release

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        _warn(module.__name__, self.target, self.release)
        # The import system re-reads sys.modules after exec_module, so the old name now *is* the new module.
        sys.modules[module.__name__] = importlib.import_module(self.target)


class _AliasFinder(importlib.abc.MetaPathFinder):
    def __init__(self, package: str):
        self.map = {f"{package}.{old}": (f"{package}.{new}", release) for old, (new, release) in MOVED.items()}

    def find_spec(self, fullname, path=None, target=None):
        hit = self.map.get(fullname)
        return None if hit is None else importlib.util.spec_from_loader(fullname, _AliasLoader(*hit))


def install(package: str) -> None:
    if not any(isinstance(f, _AliasFinder) and f.map == _AliasFinder(package).map for f in sys.meta_path):
        sys.meta_path.append(_AliasFinder(package))


def moved_attributes(package_name: str):
    """The ``__getattr__`` of a package in :data:`MOVED_NAMES`: a public name of the module it was, fetched from
    the module that holds it now, with a DeprecationWarning; anything else is an AttributeError as usual."""
    package, rel = _split(package_name)
    new_rel, release = MOVED_NAMES[rel]
    target = f"{package}.{new_rel}"

    def __getattr__(name: str):
        if not name.startswith("_"):
            module = importlib.import_module(target)
            value = module.__dict__.get(name)
            if value is not None and not isinstance(value, types.ModuleType):
                _warn(f"{package_name}.{name}", f"{target}.{name}", release)
                return value
        raise AttributeError(f"module {package_name!r} has no attribute {name!r}")

    return __getattr__


def entry_module_imported(module_name: str, namespace: dict) -> None:
    """``import dreamcache.train`` (not run): fill the entry module's ``namespace`` with the public names of the
    library it held in 0.1, with a DeprecationWarning."""
    package, rel = _split(module_name)
    new_rel, release = ENTRY_MODULES[rel]
    target = importlib.import_module(f"{package}.{new_rel}")
    names = getattr(target, "__all__", None) or [n for n in vars(target) if not n.startswith("_")]
    namespace.update({n: getattr(target, n) for n in names})
    _warn(module_name, f"{package}.{new_rel}", release, stacklevel=4)
