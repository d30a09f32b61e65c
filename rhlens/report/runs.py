"""Saving a run: every output of a detection run (scores, summary, the paper's JSON,
properties, figures), of a NIAH sweep, a mask sweep and a KV budget sweep, into the layout
of :mod:`rhlens.store.layout`."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from rhlens.errors import ConfigError
from rhlens.plotting import (
    plot_head_heatmap,
    plot_k_curve,
    plot_mask_heatmaps,
    plot_niah_heatmap,
    plot_score_distribution,
)
from rhlens.plotting.compress import plot_budget_curve
from rhlens.properties import detection_properties
from rhlens.retrieval.config import DetectConfig
from rhlens.retrieval.detect import scores_from_records
from rhlens.retrieval.scores import RetrievalScores
from rhlens.store.files import atomic_write, read_jsonl, write_json
from rhlens.store.layout import COMPRESS_LOG, LEGACY_RESULT_FILE, NIAH_LOG, PROPERTY_NAMES, RunDir  # noqa: F401  (rhlens.runs' names)
from rhlens.store.results import Result
from rhlens.store.runs import RunContents, load_saved, load_single_file, read_run  # noqa: F401

__all__ = ["detection_summary", "save_compress_run", "save_detection_run", "save_figure",
           "save_mask_sweep_run", "save_niah_run", "save_properties"]


def find_scores(source: str | Path) -> RetrievalScores:
    """:meth:`RetrievalScores.from_any` (the name of older rhlens, kept for ``rhlens.runs``)."""
    return RetrievalScores.from_any(source)


# ---- writing ---------------------------------------------------------------------------------
def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    """Write a matplotlib figure atomically (a crash leaves the old file or the new)."""
    path = Path(path)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format=path.suffix[1:] or "png"))


def _remove(path: Path) -> None:
    """Remove an output that no longer applies (a file, or a saved result's directory)."""
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def detection_summary(scores, *, wall_seconds: float | None = None, top: int = 20,
                      extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The numbers a reader wants first: successes, top heads, fraction above 0.1."""
    summary: dict[str, Any] = {
        "model": scores.model_name,
        "layers": scores.n_layers,
        "heads": scores.n_heads,
        "kv_heads": scores.n_kv_heads,
        "probes": scores.n_probes,
        "successful_probes": scores.n_successful,
        "config": scores.config.to_dict() if scores.config is not None else None,
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


def _with_every_record(run: RunDir, scores):
    """``scores`` extended to every probe the run's log holds, so that the outputs describe
    the whole run (a rerun on a subset of the grid must not shrink them)."""
    if not run.probes.exists():
        return scores
    records = {r["key"]: r for r in read_jsonl(run.probes) if isinstance(r, dict) and "key" in r}
    keys = [p.get("key") for p in scores.probes]
    if len(keys) != scores.n_probes or not set(keys) <= set(records):
        raise ConfigError(f"{run.probes} holds the log of another run (it lacks probes of these "
                          "scores); save them into another directory")
    extra = [k for k in records if k not in set(keys)]
    if not extra:
        return scores
    config = scores.config if isinstance(scores.config, DetectConfig) else DetectConfig()
    return scores_from_records([records[k] for k in keys + extra], scores.model_name,
                               scores.n_kv_heads, config)


def save_detection_run(out: str | Path, scores, *, wall_seconds: float | None = None,
                       figures: bool = True, properties=None) -> dict[str, Path]:
    """Write every output of a detection run from the full set of its records.

    ``scores/``, ``summary.json``, ``head_scores.json`` (paper format), the saved
    properties (``properties=``: a :class:`~rhlens.properties.PropertySettings`, default
    ones when ``None``) and the figures. When ``out`` holds the run's ``probes.jsonl``,
    the outputs cover every probe in it, not only those of ``scores``. Outputs that no
    longer apply (no probe succeeded: no head scores, heatmaps or properties) are removed,
    so nothing stale is left beside the new summary.

    Returns:
        The written files by name.
    """
    run = RunDir(out)
    scores = _with_every_record(run, scores)
    written: dict[str, Path] = {"scores": scores.save(run.scores)}
    written["summary"] = write_json(run.summary,
                                    detection_summary(scores, wall_seconds=wall_seconds))
    if scores.n_successful:
        written["head_scores"] = scores.to_paper_json(run.head_scores)
    else:
        _remove(run.head_scores)
    written.update(_write_properties(run, detection_properties(scores, properties)))
    for path in (run.heatmap, run.distribution, run.niah_figure):
        _remove(path)
    if figures:
        if scores.n_successful:
            written["heatmap"] = save_figure(plot_head_heatmap(scores), run.heatmap)
            written["distribution"] = save_figure(plot_score_distribution(scores),
                                                  run.distribution)
        written["niah"] = save_figure(plot_niah_heatmap(scores), run.niah_figure)
    return written


def _write_properties(run: RunDir, results: dict[str, Result]) -> dict[str, Path]:
    written = {}
    for name in PROPERTY_NAMES:
        if name in results:
            written[name] = results[name].save(run.property_dir(name))
        else:
            _remove(run.property_dir(name))
    return written


def save_properties(out: str | Path, settings=None) -> dict[str, Path]:
    """(Re)write the saved properties of a finished detection run from its ``scores/``
    (for runs written before rhlens saved them, or to change their settings)."""
    run = RunDir(out)
    scores = RetrievalScores.load(run.scores)
    return _write_properties(run, detection_properties(scores, settings))


def save_niah_run(out: str | Path, result, *, figures: bool = True) -> dict[str, Path]:
    """Write a NIAH sweep's result (``niah/``) and its heatmaps into a run directory."""
    run = RunDir(out)
    written = {"niah": result.save(run.niah)}
    _remove(run.legacy_niah)  # the older form of the same output
    if figures:
        written["heatmaps"] = save_figure(plot_mask_heatmaps(result), run.niah_heatmaps)
    return written


def save_mask_sweep_run(out: str | Path, sweep, *, figures: bool = True) -> dict[str, Path]:
    """Write a mask sweep (``mask_sweep/``), its K curve and NIAH heatmaps."""
    run = RunDir(out)
    written = {"mask_sweep": sweep.save(run.mask_sweep)}
    _remove(run.legacy_sweep)
    _remove(run.legacy_niah)
    if figures:
        written["k_curve"] = save_figure(plot_k_curve(sweep), run.k_curve)
        written["heatmaps"] = save_figure(
            plot_mask_heatmaps(sweep.niah, sweep.heatmap_labels()), run.niah_heatmaps)
    return written


def save_compress_run(out: str | Path, result, *, figures: bool = True) -> dict[str, Path]:
    """Write a KV budget sweep (``compress/``) and its figure (``compress.png``)."""
    run = RunDir(out)
    written = {"compress": result.save(run.compress)}
    if figures:
        written["figure"] = save_figure(plot_budget_curve(result), run.compress_figure)
    return written


