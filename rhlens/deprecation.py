"""Old import paths that keep working, with a ``DeprecationWarning``, after a module moved.

Two kinds of move:

* a whole module moved (``rhlens.results`` is now ``rhlens.store.results``): importing the old
  path warns once and gives the new module itself (the same object, so every name, private
  ones too, and every monkeypatch reach the code that runs). No file stays at the old path;
  :func:`install` puts a finder on ``sys.meta_path`` that knows the map.
* some names left a module (``rhlens.ablation.top_k_mask`` is now ``rhlens.masks.top_k_mask``):
  the module's ``__getattr__`` is :func:`moved_names`, which warns and hands the name over.
* a module became a package (``rhlens.models``, ``rhlens.probes``, ``rhlens.retrieval``): the
  package's ``__getattr__`` is :func:`package_names`, which serves every name the module had
  from the submodules it was split into.

This module imports nothing of rhlens, so ``import rhlens`` stays fast.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from types import ModuleType
from typing import Any

__all__ = ["MOVED_MODULES", "install", "moved_names", "package_names"]

# old module -> its new home
MOVED_MODULES: dict[str, str] = {
    "rhlens.results": "rhlens.store.results",
    "rhlens.io": "rhlens.store.logs",
    "rhlens.identity": "rhlens.store.identity",
    "rhlens.runs": "rhlens.report.runs",
    "rhlens.scores": "rhlens.retrieval.scores",
    "rhlens.official": "rhlens.retrieval.official",
    "rhlens.probe": "rhlens.probes.probe",
    "rhlens.haystacks": "rhlens.probes.haystacks",
    "rhlens.model_files": "rhlens.models.files",
    "rhlens.patching_cli": "rhlens.cli.patch",
}


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the old path of a moved module; loads it as the module at the new path."""

    def __init__(self, moved: Mapping[str, str]) -> None:
        self.moved = dict(moved)
        self.specs: dict[str, Any] = {}

    def find_spec(self, fullname: str, path: Any = None, target: Any = None):
        if fullname not in self.moved:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        new = self.moved[spec.name]
        warnings.warn(f"{spec.name} moved to {new}; import it from there (the old path will go)",
                      DeprecationWarning, stacklevel=2)
        module = importlib.import_module(new)
        self.specs[new] = module.__spec__
        return module

    def exec_module(self, module) -> None:
        # The new module ran when it was imported; the import system has just set its
        # __spec__ to the old path's: give it back its own.
        module.__spec__ = self.specs[module.__name__]


def install(moved: Mapping[str, str] = MOVED_MODULES) -> None:
    """Put the finder of ``moved`` first on ``sys.meta_path`` (once): first, so that a stale
    file left at an old path (an older checkout on ``sys.path``) is never imported instead."""
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MovedFinder(moved))


def moved_names(module: str, names: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``names`` (name -> new module) that left ``module``."""
    def __getattr__(name: str) -> Any:
        if name in names:
            warnings.warn(f"{module}.{name} moved to {names[name]}.{name}; import it from there",
                          DeprecationWarning, stacklevel=2)
            return getattr(importlib.import_module(names[name]), name)
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__


def package_names(package: str, modules: Sequence[ModuleType]) -> Callable[[str], Any]:
    """A package ``__getattr__`` serving every name of ``modules`` (its submodules, private
    names included): what the module ``package`` held before it was split into them, so that
    older code keeps working."""
    def __getattr__(name: str) -> Any:
        for module in modules:
            if hasattr(module, name):
                return getattr(module, name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
