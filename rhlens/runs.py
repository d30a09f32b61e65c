"""Finished-run files: what a detection run leaves in its directory.

Shared by the CLI and notebooks, so that ``rhlens detect --out DIR`` and
``save_detection_run(DIR, scores)`` write the same thing.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rhlens.io import write_json
from rhlens.scores import RetrievalScores

__all__ = ["detection_summary", "save_detection_run", "save_figure"]


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=dpi)
    tmp.replace(path)
    return path


def detection_summary(scores: RetrievalScores, *, wall_seconds: float | None = None,
                      top: int = 20, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The numbers a reader wants first: successes, top heads, fraction above 0.1."""
    summary: dict[str, Any] = {
        "model": scores.model_name,
        "layers": scores.n_layers,
        "heads": scores.n_heads,
        "kv_heads": scores.n_kv_heads,
        "probes": scores.n_probes,
        "successful_probes": scores.n_successful,
        "config": scores.config,
        "written": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if scores.n_successful:
        summary["top_heads"] = [{"layer": la, "head": h, "score": round(s, 4)}
                                for la, h, s in scores.top(top)]
        summary["fraction_above_0.1"] = round(scores.fraction_above(0.1), 4)
        summary["n_retrieval_heads"] = len(scores.retrieval_heads(0.1))
    if wall_seconds is not None:
        summary["wall_seconds"] = round(wall_seconds, 1)
    summary.update(extra or {})
    return summary


def save_detection_run(out: str | Path, scores: RetrievalScores, *,
                       wall_seconds: float | None = None, figures: bool = True) -> dict[str, Path]:
    """Write ``head_scores.json`` (paper format), ``summary.json``, ``scores/`` and PNG figures."""
    from rhlens.plotting import (
        plot_head_heatmap,
        plot_niah_heatmap,
        plot_score_distribution,
    )

    out = Path(out)
    written = {"scores": scores.save(out / "scores"),
               "summary": write_json(out / "summary.json",
                                     detection_summary(scores, wall_seconds=wall_seconds))}
    if scores.n_successful:
        written["head_scores"] = scores.to_paper_json(out / "head_scores.json")
    if figures:
        if scores.n_successful:
            written["heatmap"] = save_figure(plot_head_heatmap(scores), out / "heatmap.png")
            written["distribution"] = save_figure(plot_score_distribution(scores),
                                                  out / "score_distribution.png")
        written["niah"] = save_figure(plot_niah_heatmap(scores), out / "niah.png")
    return written
