"""Figures of a detection run: score distribution and the NIAH (length x depth) heatmap."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from rhlens.scores import RetrievalScores

__all__ = ["niah_grid", "plot_niah_heatmap", "plot_niah_heatmaps", "plot_score_distribution"]


def plot_score_distribution(scores: RetrievalScores, threshold: float = 0.1) -> Figure:
    """All heads' mean scores, sorted: the paper's evidence that retrieval heads are few."""
    mean = scores.mean.flatten().sort(descending=True).values.numpy()
    fig = Figure(figsize=(6, 3.5), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(np.arange(1, len(mean) + 1), mean, marker=".", lw=1)
    ax.axhline(threshold, color="tab:red", ls="--", lw=1, label=f"threshold {threshold}")
    n_above = int((mean > threshold).sum())
    ax.set_xscale("log")
    ax.set_xlabel("head rank")
    ax.set_ylabel("retrieval score")
    ax.set_title(f"{scores.model_name}: {n_above}/{len(mean)} heads above {threshold} "
                 f"({100 * n_above / len(mean):.1f}%)", fontsize=9)
    ax.legend(fontsize=8)
    return fig


def niah_grid(records: Iterable[Mapping[str, Any]], value: str = "rouge_recall",
              scale: float = 100.0) -> tuple[list[int], list[float], np.ndarray]:
    """Mean of ``value`` per (length, depth) cell: (lengths, depths, [depth, length] array)."""
    cells: dict[tuple[int, float], list[float]] = defaultdict(list)
    for r in records:
        cells[(int(r["length"]), float(r["depth"]))].append(float(r[value]) * scale)
    lengths = sorted({k[0] for k in cells})
    depths = sorted({k[1] for k in cells})
    grid = np.full((len(depths), len(lengths)), np.nan)
    for (length, depth), vals in cells.items():
        grid[depths.index(depth), lengths.index(length)] = float(np.mean(vals))
    return lengths, depths, grid


def _draw_grid(ax, lengths, depths, grid, title: str, vmax: float = 100.0):
    im = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=vmax, aspect="auto", origin="upper")
    ax.set_xticks(range(len(lengths)), [str(x) for x in lengths], fontsize=8, rotation=45)
    ax.set_yticks(range(len(depths)), [f"{d:g}%" for d in depths], fontsize=8)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    mean = np.nanmean(grid) if np.isfinite(grid).any() else float("nan")
    ax.set_title(f"{title}\nmean {mean:.1f}", fontsize=9)
    if grid.size <= 120:
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                if np.isfinite(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.0f}", ha="center", va="center",
                            fontsize=9 if grid.size <= 40 else 7)
    return im


def _fit_titles(fig: Figure, margin: float = 0.3) -> Figure:
    """Widen ``fig`` until every axes title fits in it (a narrow grid of few lengths would
    otherwise cut its title off at both sides)."""
    fig.draw_without_rendering()
    dpi = fig.dpi
    widths = [ax.title.get_window_extent().width / dpi for ax in fig.axes if ax.get_title()]
    need = sum(widths) + margin * (len(widths) + 1) + (1.0 if len(fig.axes) > len(widths) else 0)
    width, height = fig.get_size_inches()
    if need > width:
        fig.set_size_inches(need, height)
    return fig


def plot_niah_heatmap(records: Iterable[Mapping[str, Any]] | RetrievalScores,
                      title: str = "needle in a haystack (ROUGE-1 recall x 100)") -> Figure:
    """The paper harness' picture: answer quality per context length (x) and depth (y)."""
    if isinstance(records, RetrievalScores):
        records = records.probes
    lengths, depths, grid = niah_grid(records)
    fig = Figure(figsize=(1.8 + 0.7 * len(lengths), 1.7 + 0.35 * len(depths)),
                 layout="constrained")
    ax = fig.add_subplot()
    im = _draw_grid(ax, lengths, depths, grid, title)
    fig.colorbar(im, ax=ax, shrink=0.8)
    return _fit_titles(fig)


def plot_niah_heatmaps(panels: Mapping[str, Sequence[Mapping[str, Any]]]) -> Figure:
    """Several NIAH heatmaps side by side on one colour scale (unmasked / top-K / random-K)."""
    n = len(panels)
    if n == 0:
        raise ValueError("no panels to draw")
    fig = Figure(figsize=(3.2 * n + 0.8, 3.4), layout="constrained")
    axes = fig.subplots(1, n, squeeze=False)[0]
    im = None
    for ax, (title, records) in zip(axes, panels.items()):
        lengths, depths, grid = niah_grid(records)
        im = _draw_grid(ax, lengths, depths, grid, title)
    fig.colorbar(im, ax=list(axes), shrink=0.8)
    return _fit_titles(fig)
