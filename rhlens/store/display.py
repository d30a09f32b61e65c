"""Results that display themselves (Jupyter's ``_repr_html_``, ``.plot()``, ``.to_dataframe()``),
without the store or an analysis importing a view.

:class:`Displayed` is a mixin of the analyses' result classes (listed before ``Result``). Its
methods hand the result to the view module registered with :func:`rhlens.store.registry.register_view`
(``rhlens/__init__.py`` registers :mod:`rhlens.views.results`), imported on first use: data flows
up, the import graph points down.
"""

from __future__ import annotations

import importlib
from typing import Any

from rhlens.errors import RhlensError
from rhlens.store.registry import view_home

__all__ = ["Displayed"]


def _views():
    home = view_home()
    if home is None:
        raise RhlensError("no view module is registered to display results (import rhlens first)")
    return importlib.import_module(home)


class Displayed:
    """Mixin of the analyses' results: Jupyter's display, ``.plot()`` and a generic
    ``.to_dataframe()`` (a class with its own overrides it)."""

    def _repr_html_(self) -> str:
        """Jupyter's display: a one-line summary, a compact table and the figure, inline."""
        return _views().result_html(self)

    def plot(self, **kwargs: Any):
        """The result's figure (a matplotlib ``Figure``; never shown: save or display it)."""
        return _views().figure(self, **kwargs)

    def to_dataframe(self):
        """The result's table as a ``pandas.DataFrame``."""
        return _views().dataframe(self)
