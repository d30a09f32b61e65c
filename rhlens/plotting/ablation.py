"""Figures of masking experiments: the K curve (paper Fig. 7) and side-by-side NIAH maps."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from rhlens.niah import MaskSweepResult, NIAHResult
from rhlens.plotting.detection import plot_niah_heatmaps

__all__ = ["plot_k_curve", "plot_mask_heatmaps"]


def plot_k_curve(sweep: MaskSweepResult) -> Figure:
    """Mean NIAH score against K: top-K retrieval heads vs random-K (mean ± std over seeds)."""
    c = sweep.curve()
    k = np.array(c["k"])
    mean, std = np.array(c["random_mean"]), np.array(c["random_std"])
    fig = Figure(figsize=(5.5, 4.2), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(k, c["top"], "o-", color="tab:red", label="top-K retrieval heads masked")
    ax.plot(k, mean, "s-", color="tab:blue", label=f"K random heads masked ({len(sweep.seeds)} seeds)")
    ax.fill_between(k, mean - std, mean + std, color="tab:blue", alpha=0.2)
    ax.set_xticks(k)
    ax.set_xlabel("K (heads masked)")
    ax.set_ylabel("NIAH score (ROUGE-1 recall x 100)")
    ax.set_ylim(-2, 102)
    ax.set_title(f"{sweep.niah.model_name}: masking retrieval heads", fontsize=9)
    fig.legend(fontsize=9, loc="outside lower center")  # below the axes, never over a line
    return fig


def plot_mask_heatmaps(result: NIAHResult, labels: list[str] | None = None) -> Figure:
    """NIAH heatmaps per mask, side by side, one colour scale (unmasked / top-K / random-K)."""
    labels = labels or result.labels
    return plot_niah_heatmaps({label: result.for_mask(label) for label in labels})
