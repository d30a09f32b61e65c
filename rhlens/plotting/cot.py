"""The CoT-vs-direct figure, in the spirit of the paper's Figure 10: grouped bars with CIs."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

from rhlens.cot.experiment import CoTResult
from rhlens.errors import ConfigError

__all__ = ["plot_cot_bars"]


def plot_cot_bars(results: CoTResult | Sequence[CoTResult]) -> Figure:
    """Accuracy per task x prompting (groups) x mask (bars), with bootstrap intervals.

    ``results``: one :class:`CoTResult` per task (saved results load with ``CoTResult.load``).
    """
    results = [results] if isinstance(results, CoTResult) else list(results)
    if not results:
        raise ConfigError("no CoT results to plot")
    rows = [row for r in results for row in r.table()]
    groups = list(dict.fromkeys((row["task"], row["mode"]) for row in rows))
    masks = list(dict.fromkeys(row["mask"] for row in rows))
    width = 0.8 / len(masks)
    fig = Figure(figsize=(1.6 + 1.3 * len(groups), 3.8), layout="constrained")
    ax = fig.add_subplot()
    colors = {"none": "tab:gray"}
    palette = iter(["tab:red", "tab:blue", "tab:orange", "tab:green", "tab:purple"])
    for j, mask in enumerate(masks):
        color = colors.get(mask) or next(palette, "tab:brown")
        xs, ys, err = [], [], [[], []]
        for i, key in enumerate(groups):
            row = next((r for r in rows if (r["task"], r["mode"]) == key and r["mask"] == mask), None)
            if row is None:
                continue
            xs.append(i - 0.4 + width * (j + 0.5))
            ys.append(100 * row["accuracy"])
            err[0].append(100 * (row["accuracy"] - row["low"]))
            err[1].append(100 * (row["high"] - row["accuracy"]))
        ax.bar(xs, ys, width * 0.95, yerr=np.array(err), capsize=2, color=color, label=mask)
    ax.set_xticks(range(len(groups)), [f"{t}\n{m}" for t, m in groups], fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title(f"{results[0].model_name}: chain of thought vs direct answers under masks",
                 fontsize=9)
    ax.legend(fontsize=7, ncols=min(4, len(masks)))
    return fig
