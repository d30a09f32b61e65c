"""Figures of the score families: rank agreement, where their top heads sit, damage curves."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

from rhlens.families import DamageResult, FamilySet
from rhlens.stats import top_k_heads

__all__ = ["plot_damage_curves", "plot_family_correlations", "plot_family_tops"]

_RANDOM_COLOR = "0.45"
_MARKERS = ("o", "^", "v", "D", "P", "X")
_LINES = ("-", "--", "-.", ":")


def plot_family_correlations(families: FamilySet) -> Figure:
    """Spearman rank correlation between every two families' head scores (an annotated grid)."""
    corr = families.correlations()
    names = list(corr)
    m = np.array([[corr[a][b] for b in names] for a in names], dtype=float)
    size = 1.2 + 0.55 * max(len(names), 2)
    fig = Figure(figsize=(size + 1.2, size), layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(m, vmin=-1, vmax=1, cmap="RdBu_r")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    for i in range(len(names)):
        for j in range(len(names)):
            if math.isfinite(m[i, j]):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if abs(m[i, j]) > 0.6 else "black")
    fig.colorbar(im, ax=ax, shrink=0.8, label="Spearman")
    where = f", {families.needle_set} needles" if families.needle_set else ""
    ax.set_title(f"{families.model_name}: rank agreement of head scores{where}", fontsize=9)
    return fig


def plot_family_tops(families: FamilySet, k: int = 10) -> Figure:
    """Each family's top-``k`` heads on the layer x head grid (one panel per family), with
    sliding-window layers shaded when the model has them."""
    names = families.defined()
    n_layers, n_heads = families.families[0].n_layers, families.families[0].n_heads
    cols = max(len(names), 1)
    fig = Figure(figsize=(1.2 + 1.0 * cols + 0.12 * n_heads * cols, 1.2 + 0.14 * n_layers),
                 layout="constrained")
    axes = fig.subplots(1, cols, squeeze=False)[0]
    for ax, name in zip(axes, names):
        grid = np.zeros((n_layers, n_heads))
        for rank, (la, h) in enumerate(top_k_heads(families[name].mean, min(k, n_layers * n_heads))):
            grid[la, h] = k - rank
        if families.layer_types:
            for la, kind in enumerate(families.layer_types):
                if kind == "global":
                    ax.axhspan(la - 0.5, la + 0.5, color="tab:orange", alpha=0.18, lw=0)
        ax.imshow(np.ma.masked_equal(grid, 0), aspect="auto", cmap="viridis", vmin=0, vmax=k,
                  interpolation="nearest")
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("head", fontsize=7)
        ax.tick_params(labelsize=6)
    axes[0].set_ylabel("layer" + (" (orange: global)" if families.layer_types else ""), fontsize=7)
    fig.suptitle(f"{families.model_name}: top-{k} heads per family (brighter = higher rank)", fontsize=9)
    return fig


def plot_damage_curves(results: DamageResult | Sequence[DamageResult], titles: Sequence[str] = ()) -> Figure:
    """NIAH score against K, one line per family's top-K heads and random-K (mean ± std over
    seeds); one panel per result (e.g. one per model or probe set)."""
    results = [results] if isinstance(results, DamageResult) else list(results)
    fig = Figure(figsize=(4.2 * len(results), 3.4), layout="constrained")
    axes = fig.subplots(1, len(results), squeeze=False)[0]
    for i, (ax, res) in enumerate(zip(axes, results)):
        ks = res.all_ks
        for j, name in enumerate(res.rankings):  # families often share heads: tell lines apart
            ax.plot(ks, res.curve(name), marker=_MARKERS[j % len(_MARKERS)], ms=4 + (j % 3),
                    ls=_LINES[j % len(_LINES)], alpha=0.85, label=f"{name} top-K")
        per_seed = np.array([[float(res.per_probe(x).mean()) for x in labels]
                             for labels in res.labels_of("random")[1:]])  # [k, seed]
        base = res.curve("random")[0]
        mean = np.concatenate([[base], per_seed.mean(1)])
        std = np.concatenate([[0.0], per_seed.std(1)])
        seeds = f"{len(res.seeds)} seed{'s' if len(res.seeds) > 1 else ''}"
        ax.plot(ks, mean, "s-", ms=3, lw=2, color=_RANDOM_COLOR, label=f"random-K ({seeds})")
        ax.fill_between(ks, mean - std, mean + std, color=_RANDOM_COLOR, alpha=0.2)
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_ylim(-2, 102)
        ax.set_xlabel("K (heads masked)")
        ax.set_ylabel("NIAH score (ROUGE-1 recall x 100)")
        title = (titles[i] if i < len(titles) else
            f"{res.niah.model_name}{', ' + res.needle_set if res.needle_set else ''}")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    return fig
