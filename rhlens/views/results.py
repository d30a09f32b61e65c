"""Results that display themselves: a compact table and the result's figure, inline.

``Result._repr_html_`` (what Jupyter shows), ``Result.plot()`` and the generic
``Result.to_dataframe()`` come here. Each kind of result names its compact table and its figure
(:mod:`rhlens.plotting`); nothing is computed that the result does not hold.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any

__all__ = ["Displayed", "compact_table", "dataframe", "figure", "result_html"]

_ROWS = 10  # rows of a compact table


def _kind(result: Any) -> str:
    return type(result).__name__


def dataframe(result: Any):
    """The result's table as a ``pandas.DataFrame`` (for results with a ``table()`` or a curve)."""
    import pandas as pd

    kind = _kind(result)
    if kind == "MaskSweepResult":
        c = result.curve()
        return pd.DataFrame({"k": c["k"], "top_k": c["top"], "random_k_mean": c["random_mean"],
                             "random_k_std": c["random_std"]})
    if kind == "PatchingVsRetrieval":
        rows = [{"group": group, "layer": r[0], "head": r[1], "effect": r[2], "score": r[3]}
                for group in ("both", "causal_not_retrieval", "retrieval_not_causal")
                for r in getattr(result, group)]
        return pd.DataFrame(rows, columns=["group", "layer", "head", "effect", "score"])
    table = getattr(result, "table", None)
    if callable(table):
        rows = table()
        if isinstance(rows, dict):
            return pd.DataFrame({"name": list(rows), "value": list(rows.values())})
        return pd.DataFrame(rows)
    raise TypeError(f"a {kind} has no table")


def compact_table(result: Any):
    """The few rows worth showing inline, as a DataFrame (``None`` when there is no table)."""
    import pandas as pd

    kind = _kind(result)
    if kind == "RetrievalScores":
        if result.n_successful == 0:
            return None
        df = result.to_dataframe().head(_ROWS)
        return df.assign(score=df["score"].round(3), active_fraction=df["active_fraction"].round(2))
    if kind == "NIAHResult":
        rows = []
        for label in result.labels:
            counts = result.class_counts(label)
            rows.append({"mask": label, "NIAH score": round(result.score(label), 1),
                         "probes": len(result.for_mask(label)),
                         **{k: counts.get(k, 0) for k in sorted(
                             {r["answer_class"] for r in result.records})}})
        return pd.DataFrame(rows)
    if kind == "HeadPatchingResult":
        df = result.to_dataframe().head(_ROWS)
        return df.assign(effect=df["effect"].round(3), std=df["std"].round(3))
    try:
        df = result.to_dataframe()
    except (TypeError, AttributeError):
        return None
    return df.head(3 * _ROWS).round(3) if hasattr(df, "round") else df


def figure(result: Any, **kwargs: Any):
    """The result's figure (a matplotlib ``Figure``, never shown)."""
    kind = _kind(result)
    if kind == "RetrievalScores":
        from rhlens.plotting.properties import plot_head_heatmap

        return plot_head_heatmap(result, **kwargs)
    if kind == "NIAHResult":
        from rhlens.plotting.ablation import plot_mask_heatmaps

        return plot_mask_heatmaps(result, **kwargs)
    if kind == "MaskSweepResult":
        from rhlens.plotting.ablation import plot_k_curve

        return plot_k_curve(result, **kwargs)
    if kind == "HeadPatchingResult":
        from rhlens.plotting.patching import plot_patching_heatmap

        return plot_patching_heatmap(result, **kwargs)
    if kind == "PatchingVsRetrieval":
        from rhlens.plotting.patching import plot_patching_vs_retrieval

        return plot_patching_vs_retrieval(result, **kwargs)
    if kind == "CoTResult":
        from rhlens.plotting.cot import plot_cot_bars

        return plot_cot_bars(result, **kwargs)
    if kind == "CompressSweepResult":
        from rhlens.plotting.compress import plot_budget_curve

        return plot_budget_curve(result, **kwargs)
    named = {"SparsityResult": "plot_sparsity", "DynamicResult": "plot_dynamic",
             "IntrinsicResult": "plot_intrinsic", "StabilityResult": "plot_stability",
             "UniversalTable": "plot_universal"}
    if kind in named:
        from rhlens.plotting import properties

        return getattr(properties, named[kind])(result, **kwargs)
    raise TypeError(f"no figure for a {kind}")


def _png(fig, dpi: int = 80) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def result_html(result: Any, *, dpi: int = 80) -> str:
    """A heading with the result's one-line summary, its compact table and its figure, inline."""
    parts = [f"<div class='rhlens-result' style='font-family:system-ui,sans-serif'>"
             f"<div style='font-weight:600;margin-bottom:4px'>{html.escape(repr(result))}</div>"]
    table = compact_table(result)
    body = []
    if table is not None and len(table):
        body.append("<div style='flex:0 1 auto;overflow:auto;max-height:420px'>"
                    + table.to_html(index=False, border=0, classes="rhlens-table") + "</div>")
    try:
        fig = figure(result)
    except TypeError:
        fig = None
    if fig is not None:
        body.append(f"<div style='flex:1 1 360px'><img alt='{html.escape(_kind(result))} figure' "
                    f"style='max-width:100%' src='data:image/png;base64,{_png(fig, dpi)}'></div>")
    parts.append("<div style='display:flex;gap:16px;flex-wrap:wrap;align-items:flex-start'>"
                 + "".join(body) + "</div></div>")
    return "".join(parts)


class Displayed:
    """Mixin of the analyses' results: Jupyter's display, ``.plot()`` and a generic
    ``.to_dataframe()`` (a class with its own overrides it). The store's ``Result`` imports no
    view; each analysis' result class lists this mixin before ``Result``."""

    def _repr_html_(self) -> str:
        """Jupyter's display: a one-line summary, a compact table and the figure, inline."""
        return result_html(self)

    def plot(self, **kwargs: Any):
        """The result's figure (a matplotlib ``Figure``; never shown: save or display it)."""
        return figure(self, **kwargs)

    def to_dataframe(self):
        """The result's table as a ``pandas.DataFrame``."""
        return dataframe(self)
