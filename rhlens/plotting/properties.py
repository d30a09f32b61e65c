"""Figures for the retrieval-head properties (:mod:`rhlens.properties`) and the head heatmap.

Every function builds a :class:`matplotlib.figure.Figure` directly, without pyplot: nothing
is shown, no global figure list grows, and it works under any backend (headless included).
Save with ``fig.savefig(path)``; in a notebook the figure displays when returned.
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Float
from matplotlib import patheffects
from matplotlib.axes import Axes
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import Tensor

from rhlens.errors import ConfigError
from rhlens.properties import (
    DynamicResult,
    IntrinsicResult,
    SparsityResult,
    StabilityResult,
    UniversalTable,
    top_k_heads,
)
from rhlens.scores import RetrievalScores

__all__ = [
    "plot_dynamic",
    "plot_head_heatmap",
    "plot_intrinsic",
    "plot_sparsity",
    "plot_stability",
    "plot_universal",
]


def _check_top(top: int) -> int:
    if isinstance(top, bool) or not isinstance(top, int) or top < 0:
        raise ConfigError(f"top must be an integer >= 0, got {top!r}")
    return top


def plot_head_heatmap(scores: RetrievalScores | Float[Tensor, "layer head"], top: int = 10,
                      ax: Axes | None = None, title: str | None = None,
                      cmap: str = "viridis") -> Figure:
    """Layer x head heatmap of retrieval scores, the ``top`` heads boxed and ranked.

    Seeing where the retrieval heads sit (mostly middle-to-late layers, a few per layer)
    is the quickest sanity check of a detection run, so other figures reuse this one.

    Args:
        scores: a model's scores, or any [layer, head] grid (e.g. an ablation effect).
        top: how many of the best heads to outline and number (0 for none).
        ax: draw into this axes (its figure gains a colorbar); a new figure otherwise.
        title: defaults to the model name.
    """
    top = _check_top(top)
    if isinstance(scores, RetrievalScores):
        grid, name = scores.mean, scores.model_name
    else:
        grid, name = scores, "head scores"
    grid = grid.detach().float().cpu()
    n_layers, n_heads = grid.shape
    if ax is None:
        fig = Figure(figsize=(max(5.0, 0.16 * n_heads + 2.5), max(4.0, 0.14 * n_layers + 1.5)),
                     layout="constrained")
        ax = fig.subplots()
    else:
        fig = ax.figure
    image = ax.imshow(grid.numpy(), origin="lower", aspect="auto", cmap=cmap,
                      interpolation="nearest", vmin=0.0)
    fig.colorbar(image, ax=ax, label="retrieval score")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title if title is not None else name)
    heads = top_k_heads(grid, min(top, grid.numel())) if top else []
    cell_pt = 72 * fig.get_size_inches()[1] * 0.8 / n_layers  # a cell's height, in points
    size = max(6.0, min(10.0, 0.9 * cell_pt))
    for rank, (layer, head) in enumerate(heads, start=1):
        ax.add_patch(Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="red",
                               linewidth=1.2))
        # The rank inside its own cell (never over a neighbour or outside the axes), sized to
        # the cell's height, white on a dark outline so it reads on any colour.
        ax.text(head, layer, str(rank), ha="center", va="center", fontsize=size, color="white",
                fontweight="bold", path_effects=[patheffects.withStroke(linewidth=2, foreground="black")])
    return fig


def plot_sparsity(result: SparsityResult) -> Figure:
    """Two panels: the (log-scale) histogram of head scores, and retrieval heads per layer.

    The log scale is what makes sparsity visible: almost every head sits in the first bin.
    """
    fig = Figure(figsize=(11, 4), layout="constrained")
    ax_hist, ax_layer = fig.subplots(1, 2)
    edges = result.hist_edges.numpy()
    ax_hist.stairs(result.hist_counts.numpy(), edges, fill=True, alpha=0.7)
    ax_hist.set_yscale("log")
    colors = [f"C{i + 1}" for i in range(len(result.thresholds))]
    for i, t in enumerate(result.thresholds):
        ax_hist.axvline(t, color=colors[i], linestyle="--",
                        label=f"> {t:g}: {int(result.counts[i])} heads "
                              f"({100 * float(result.fractions[i]):.1f}%)")
    ax_hist.set_xlabel("retrieval score (mean over successful probes)")
    ax_hist.set_ylabel("heads")
    ax_hist.set_title(f"{result.model_name}: {result.n_total} heads, {result.n_probes} probes")
    ax_hist.legend(fontsize=8)

    n_t = len(result.thresholds)
    width = 0.8 / n_t
    layers = torch.arange(result.per_layer.shape[1]).float()
    for i, t in enumerate(result.thresholds):
        ax_layer.bar((layers + (i - (n_t - 1) / 2) * width).numpy(), result.per_layer[i].numpy(),
                     width=width, color=colors[i], label=f"score > {t:g}")
    ax_layer.set_xlabel("layer")
    ax_layer.set_ylabel("heads above threshold")
    ax_layer.set_title("retrieval heads per layer")
    ax_layer.legend(fontsize=8)
    return fig


def plot_dynamic(result: DynamicResult, top: int = 30, cmap: str = "viridis") -> Figure:
    """Activation frequency of the ``top`` best heads, sorted, coloured by their mean score.

    Bars that reach 1.0 are the always-on heads; tall-score heads with short bars are the
    context-dependent ones. The figure has two axes: the bars and the colorbar.
    """
    top = _check_top(top)
    if top == 0:
        raise ConfigError("top must be >= 1 to draw any bar")
    heads = top_k_heads(result.mean, min(top, result.mean.numel()))
    fraction = [float(result.active_fraction[la, h]) for la, h in heads]
    score = [float(result.mean[la, h]) for la, h in heads]
    order = sorted(range(len(heads)), key=lambda i: (-fraction[i], -score[i]))
    norm = Normalize(vmin=0.0, vmax=max(max(score), 1e-9))
    colormap = _cmap(cmap)
    fig = Figure(figsize=(max(6.0, 0.28 * len(heads) + 2.0), 4.2), layout="constrained")
    ax = fig.subplots()
    ax.bar(range(len(heads)), [fraction[i] for i in order],
           color=[colormap(norm(score[i])) for i in order])
    ax.set_xticks(range(len(heads)), [f"L{heads[i][0]}H{heads[i][1]}" for i in order],
                  rotation=90, fontsize=7)
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(f"fraction of probes active (score > {result.active_threshold:g})")
    ax.set_title(f"{result.model_name}: {len(result.always_active)} heads active on all "
                 f"{result.n_probes} probes, {len(result.context_dependent)} context-dependent "
                 "retrieval heads")
    mappable = _scalar_mappable(norm, colormap)
    fig.colorbar(mappable, ax=ax, label="retrieval score")
    return fig


def _cmap(name: str):
    """A colormap by name (kept outside pyplot's registry helpers)."""
    from matplotlib import colormaps

    return colormaps[name]


def _scalar_mappable(norm: Normalize, colormap):
    from matplotlib.cm import ScalarMappable

    return ScalarMappable(norm=norm, cmap=colormap)


def plot_intrinsic(result: IntrinsicResult) -> Figure:
    """Scatter of two models' head scores; the correlations and top-K overlap in the title.

    Points on the diagonal are heads both models use alike; the top-K heads of each model
    are marked so a shared set stands out from a mere correlation of near-zero heads.
    """
    fig = Figure(figsize=(5.8, 5.4), layout="constrained")
    ax = fig.subplots()
    pairs = result.pairs()
    x, y = pairs[:, 0].numpy(), pairs[:, 1].numpy()
    ax.scatter(x, y, s=8, color="grey", alpha=0.5, label="all heads")
    n_heads = result.mean_a.shape[1]
    ta, tb = set(result.top_a), set(result.top_b)
    groups = [("both top", ta & tb, "C3"), (f"top of {result.model_a} only", ta - tb, "C0"),
              (f"top of {result.model_b} only", tb - ta, "C1")]
    for label, heads, color in groups:
        if heads:
            idx = [la * n_heads + h for la, h in sorted(heads)]
            ax.scatter(x[idx], y[idx], s=22, color=color, label=f"{label} ({len(heads)})")
    hi = max(float(x.max()), float(y.max()), 1e-6) * 1.05
    ax.plot([0, hi], [0, hi], color="black", linewidth=0.7, linestyle=":")
    ax.set_xlim(-0.02 * hi, hi)
    ax.set_ylim(-0.02 * hi, hi)
    ax.set_xlabel(f"{result.model_a} retrieval score")
    ax.set_ylabel(f"{result.model_b} retrieval score")

    def fmt(v: float) -> str:
        return "n/a" if math.isnan(v) else f"{v:.2f}"

    ax.set_title(f"Pearson r = {fmt(result.pearson)}, Spearman ρ = {fmt(result.spearman)}\n"
                 f"top-{result.k} overlap {result.overlap}/{result.k}, "
                 f"Jaccard {result.jaccard:.2f}", fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    return fig


def plot_stability(result: StabilityResult, top: int | None = None) -> Figure:
    """Two panels: top-K overlap vs number of probes, and the top heads' bootstrap intervals.

    Args:
        result: a :func:`rhlens.properties.stability` result.
        top: heads in the interval panel (default: the result's ``k``).
    """
    k = result.k if top is None else _check_top(top)
    fig = Figure(figsize=(11, 4), layout="constrained")
    ax_curve, ax_ci = fig.subplots(1, 2)
    steps = result.steps.numpy()
    mean, std = result.jaccard_mean.numpy(), result.jaccard_std.numpy()
    ax_curve.plot(steps, mean, marker="o", markersize=3)
    ax_curve.fill_between(steps, (mean - std).clip(0, 1), (mean + std).clip(0, 1), alpha=0.25)
    ax_curve.axhline(result.target, color="grey", linestyle="--", linewidth=0.8,
                     label=f"target {result.target:g}")
    if result.probes_needed is not None:
        ax_curve.axvline(result.probes_needed, color="C3", linestyle=":",
                         label=f"reached at {result.probes_needed} probes")
    if len(steps) > 1 and steps.max() / max(steps.min(), 1) > 10:
        ax_curve.set_xscale("log")
    ax_curve.set_ylim(0, 1.05)
    ax_curve.set_xlabel("successful probes used")
    ax_curve.set_ylabel(f"Jaccard(top-{result.k} on n, top-{result.k} on all)")
    # The model's name above both panels: in the left title a long one ran off the figure.
    fig.suptitle(result.model_name, fontsize=10)
    ax_curve.set_title(f"top-{result.k} stability ({result.repeats} subsamples per n)")
    ax_curve.legend(fontsize=8)

    heads = top_k_heads(result.mean, min(k, result.mean.numel())) if k else []
    centre = [float(result.mean[la, h]) for la, h in heads]
    lo = [c - float(result.ci_low[la, h]) for c, (la, h) in zip(centre, heads)]
    hi = [float(result.ci_high[la, h]) - c for c, (la, h) in zip(centre, heads)]
    pos = list(range(len(heads)))
    ax_ci.errorbar(centre, pos, xerr=[lo, hi], fmt="o", markersize=3, capsize=2)
    ax_ci.set_yticks(pos, [f"L{la}H{h}" for la, h in heads], fontsize=7)
    ax_ci.invert_yaxis()
    ax_ci.axvline(result.threshold, color="grey", linestyle="--", linewidth=0.8)
    lo_n, hi_n = result.n_retrieval_ci
    ax_ci.set_xlabel(f"retrieval score, {100 * result.level:g}% bootstrap interval "
                     f"({result.n_boot} resamples)")
    ax_ci.set_title(f"{result.n_retrieval} heads score > {result.threshold:g} "
                    f"(bootstrap {100 * result.level:g}% interval of that count: "
                    f"{lo_n:.0f} to {hi_n:.0f})", fontsize=10)
    return fig


def plot_universal(table: UniversalTable) -> Figure:
    """Bar chart of the percentage of retrieval heads per model: few, but never none."""
    fig = Figure(figsize=(max(5.0, 1.2 * len(table.rows) + 2), 4), layout="constrained")
    ax = fig.subplots()
    names = [r.model for r in table.rows]
    pct = [r.percent_retrieval for r in table.rows]
    bars = ax.bar(range(len(names)), pct, color="C0")
    for bar, r in zip(bars, table.rows):
        ax.annotate(str(r.n_retrieval), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(f"% of heads with score > {table.threshold:g}")
    ax.set_title("retrieval heads per model")
    return fig
