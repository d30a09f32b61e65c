"""Figures of head patching: the layer x head effect map, effect vs retrieval score, and
attribution against exact patching."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from rhlens.patching import HeadPatchingResult, PatchingVsRetrieval

__all__ = ["plot_patching_agreement", "plot_patching_heatmap", "plot_patching_vs_retrieval"]


def _describe(config) -> str:
    """``z exact/denoise/answer/logit_diff`` from a PatchConfig."""
    positions = config.get("positions", "?")
    if not isinstance(positions, str):
        positions = f"{len(positions)} positions"
    parts = [config.get("mode", "?"), config.get("direction", "?"), positions, config.get("metric", "?")]
    return f"{config.get('activation', 'z')} " + "/".join(str(p) for p in parts)


def plot_patching_heatmap(result: HeadPatchingResult, *, annotate: int = 5) -> Figure:
    """Mean patching effect of every (layer, head); the ``annotate`` largest are written in.

    The colour scale is symmetric around 0 (a head can also push towards the corrupted
    answer); unpatched layers are blank.
    """
    mean = result.mean.numpy()
    finite = np.isfinite(mean)
    vmax = float(np.abs(mean[finite]).max()) if finite.any() else 1.0
    vmax = max(vmax, 1e-6)
    n_layers, n_heads = mean.shape
    fig = Figure(figsize=(2.2 + 0.35 * n_heads, 1.6 + 0.16 * n_layers), layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(np.ma.masked_invalid(mean), cmap="RdBu_r", vmin=-vmax, vmax=vmax,
                   aspect="auto", origin="upper", interpolation="nearest")
    ax.set_xlabel("KV head" if set(result.config.atoms) <= {"k", "v"} else "head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(n_heads), [str(h) for h in range(n_heads)], fontsize=7)
    step = max(1, n_layers // 15)
    ax.set_yticks(range(0, n_layers, step), [str(la) for la in range(0, n_layers, step)], fontsize=7)
    for la, h, e in result.top(annotate):
        ax.text(h, la, f"{e:.2f}", ha="center", va="center", fontsize=8,
                color="white" if abs(e) > 0.6 * vmax else "black")
    fig.colorbar(im, ax=ax, shrink=0.8, label="effect (1 = carries it all)")
    ax.set_title(f"{result.model_name}\nhead patching, {_describe(result.config)}, "
                 f"{result.n_pairs} pairs", fontsize=8)
    return fig


def plot_patching_vs_retrieval(comparison: PatchingVsRetrieval, *, label: int = 6) -> Figure:
    """Each head's patching effect against its retrieval score, thresholds drawn, the heads
    that stand out (largest effect or score) labelled ``L<layer>H<head>``."""
    effect = comparison.effect.numpy()
    score = comparison.score.numpy()
    ok = np.isfinite(effect) & np.isfinite(score)
    fig = Figure(figsize=(5.2, 4.0), layout="constrained")
    ax = fig.add_subplot()
    ax.scatter(score[ok], effect[ok], s=12, alpha=0.6, color="tab:blue", edgecolors="none")
    ax.axvline(comparison.score_threshold, color="tab:red", ls="--", lw=0.8,
               label=f"retrieval score {comparison.score_threshold:g}")
    ax.axhline(comparison.effect_threshold, color="tab:green", ls="--", lw=0.8,
               label=f"effect {comparison.effect_threshold:g}")
    cells = [(la, h) for la, h in zip(*np.nonzero(ok))]
    by_effect = sorted(cells, key=lambda c: -effect[c])[:label]
    by_score = sorted(cells, key=lambda c: -score[c])[:label]
    for la, h in dict.fromkeys(by_effect + by_score):
        ax.annotate(f"L{la}H{h}", (score[la, h], effect[la, h]), fontsize=8,
                    xytext=(3, 2), textcoords="offset points")
    ax.margins(x=0.1, y=0.08)  # room for the labels of the extreme heads
    ax.set_xlabel("retrieval score (mean over successful probes)")
    ax.set_ylabel("patching effect (mean over pairs)")
    ax.set_title(f"{comparison.model_name}: Spearman {comparison.spearman:.2f}, "
                 f"Pearson {comparison.pearson:.2f}\n{_describe(comparison.patch_config)}",
                 fontsize=8)
    ax.legend(fontsize=7, loc="best")
    return fig


def plot_patching_agreement(exact: HeadPatchingResult, estimate: HeadPatchingResult) -> Figure:
    """Attribution (or any estimate) against exact patching, one point per head."""
    from rhlens.patching import compare_patching

    a, b = exact.mean.numpy().ravel(), estimate.mean.numpy().ravel()
    ok = np.isfinite(a) & np.isfinite(b)
    stats = compare_patching(exact, estimate)
    fig = Figure(figsize=(4.4, 4.0), layout="constrained")
    ax = fig.add_subplot()
    ax.scatter(a[ok], b[ok], s=12, alpha=0.6, edgecolors="none")
    lo = float(min(a[ok].min(), b[ok].min())) if ok.any() else 0.0
    hi = float(max(a[ok].max(), b[ok].max())) if ok.any() else 1.0
    ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls=":")
    ax.set_xlabel(f"exact effect ({exact.config.mode})")
    ax.set_ylabel(f"estimated effect ({estimate.config.mode})")
    ax.set_title(f"Spearman {stats['spearman']:.2f}, sign agreement "
                 f"{stats['sign_agreement']:.2f}\n{_describe(exact.config)}", fontsize=8)
    return fig
