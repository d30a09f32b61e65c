"""Figure of a KV budget sweep: NIAH score against the share of the KV bytes kept, one line per policy."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from rhlens.compress.sweep import CompressSweepResult

__all__ = ["plot_budget_curve"]

_STYLE = {"retrieval": ("tab:red", "o-"), "streaming": ("tab:green", "^-"),
          "random": ("tab:blue", "s-"), "full": ("black", "--")}
_OTHERS = ("tab:purple", "tab:orange", "tab:brown", "tab:olive")


def plot_budget_curve(result: CompressSweepResult) -> Figure:
    """NIAH score against the KV share: each ranking's policy, StreamingLLM, random heads
    (mean ± std over seeds, as a band) and the full cache (a dashed line). Points sit at each
    policy's actual share of the bytes (at most the budget)."""
    c = result.curve()
    share = np.array(c["share"])
    fig = Figure(figsize=(6.2, 3.9), layout="constrained")
    ax = fig.add_subplot()
    others = iter(_OTHERS)
    for name in result.rankings:
        color, style = _STYLE.get(name) or (next(others, "tab:gray"), "D-")
        label = "retrieval heads kept" if name == "retrieval" else f"{name} heads kept"
        ax.plot(share, c[name], style, color=color, label=label)
    if "streaming" in c:
        color, style = _STYLE["streaming"]
        ax.plot(c["streaming_share"], c["streaming"], style, color=color,
                label="StreamingLLM (every head sink + window)")
    if "random_mean" in c:
        mean, std = np.array(c["random_mean"]), np.array(c["random_std"])
        color, style = _STYLE["random"]
        ax.plot(share, mean, style, color=color, label=f"random heads kept ({len(result.seeds)} seeds)")
        ax.fill_between(share, mean - std, mean + std, color=color, alpha=0.2)
    ax.axhline(c["full"], color="black", ls="--", lw=1, label=f"full cache ({c['full']:.1f})")
    ax.set_xlabel("share of the full KV cache's bytes")
    ax.set_ylabel("NIAH score (ROUGE-1 recall x 100)")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(-2, 102)
    n = len(result.niah.for_mask("full"))
    model = result.model_name.rstrip("/").rsplit("/", 1)[-1]
    ax.set_title(f"{model}: NIAH against KV budget\n({n} probes, {result.context} tokens)", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    return fig
