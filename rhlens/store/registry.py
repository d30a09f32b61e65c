"""Where each kind of saved result is defined, so that a folder can be read in a fresh
interpreter without knowing its kinds, while the store imports no analysis.

A result class registers itself with the store when its module is imported
(``Result.__init_subclass__``); the *homes* here say which module to import for a kind
not seen yet. The table is given by the layer that knows the analyses (``rhlens/__init__.py``
registers rhlens' own kinds); a package of one's own registers its kinds with
:func:`register_home`. This module imports nothing, so ``import rhlens`` stays fast.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["home_of", "register_home", "register_homes", "register_view", "view_home"]

_HOMES: dict[str, str] = {}
_VIEW: list[str] = []  # the module that displays results (rhlens.store.display)


def register_home(kind: str, module: str) -> None:
    """Results of ``kind`` are defined in ``module`` (imported on the first load of one)."""
    if not isinstance(kind, str) or not isinstance(module, str) or not kind or not module:
        raise TypeError("register_home takes a kind and a module name, both non-empty strings")
    _HOMES[kind] = module


def register_homes(homes: Mapping[str, str]) -> None:
    """:func:`register_home` for every ``kind: module`` of ``homes``."""
    for kind, module in homes.items():
        register_home(kind, module)


def home_of(kind: str) -> str | None:
    """The module registered for ``kind``, or ``None``."""
    return _HOMES.get(kind)


def register_view(module: str) -> None:
    """Results display through ``module`` (its ``result_html``, ``figure`` and ``dataframe``)."""
    if not isinstance(module, str) or not module:
        raise TypeError("register_view takes a module name, a non-empty string")
    _VIEW[:] = [module]


def view_home() -> str | None:
    """The module registered to display results, or ``None``."""
    return _VIEW[0] if _VIEW else None
