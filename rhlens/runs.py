"""The run-directory layout: every file a run holds is named here, written here, found here.

A run directory (``--out`` of a command, or any folder a notebook saves into) holds::

    run.json, probes.jsonl        detect: its settings and one record per finished probe
    scores/                       RetrievalScores (all probes of the log)
    head_scores.json              the same in the paper's format (successful probes only)
    summary.json                  the headline numbers
    properties/sparse|dynamic|stability/   the properties a report shows, as saved results
    heatmap.png, score_distribution.png, niah.png
    niah.run.json, niah.jsonl     niah / mask-sweep: settings and one record per answer
    niah/  or  mask_sweep/        NIAHResult, or MaskSweepResult; niah_heatmaps.png, k_curve.png
    compress.run.json, compress.jsonl, compress/, compress.png   compress: the KV budget sweep
    cot_<task>.run.json, cot_<task>.jsonl, cot/<task>/, cot_bars.png      CoT
    patching/, patching_vs_retrieval/, patching_heatmap.png, patching_vs_retrieval.png

Files of older rhlens versions are still found: ``meta.json`` bundles, ``niah_result.json``
+ ``mask_sweep.json``, ``cot_<task>.json``, ``patching_vs_retrieval.json``.
:func:`read_run` finds what a folder holds (any saved result, by its kind), so the report
and :meth:`RetrievalScores.from_any` need no knowledge of the layout.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rhlens.errors import ConfigError
from rhlens.io import read_jsonl
from rhlens.results import RESULT_FILE, Result, ResultError, load_result, read_json, result_class, write_json

__all__ = [
    "RunContents",
    "RunDir",
    "detection_summary",
    "find_scores",
    "load_saved",
    "load_single_file",
    "read_run",
    "save_compress_run",
    "save_detection_run",
    "save_figure",
    "save_mask_sweep_run",
    "save_niah_run",
    "save_properties",
]

NIAH_LOG = "niah.jsonl"  # the log of a NIAH sweep (its settings: niah.run.json)
COMPRESS_LOG = "compress.jsonl"  # the log of a KV budget sweep (its settings: compress.run.json)
LEGACY_RESULT_FILE = "meta.json"  # a result saved before the one protocol (schema 0)
PROPERTY_NAMES = ("sparse", "dynamic", "stability")



class RunDir:
    """The paths of one run directory (nothing is created by naming them)."""

    __slots__ = ("path",)

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # detect
    run_json = property(lambda self: self.path / "run.json")
    probes = property(lambda self: self.path / "probes.jsonl")
    scores = property(lambda self: self.path / "scores")
    head_scores = property(lambda self: self.path / "head_scores.json")
    summary = property(lambda self: self.path / "summary.json")
    properties = property(lambda self: self.path / "properties")
    heatmap = property(lambda self: self.path / "heatmap.png")
    distribution = property(lambda self: self.path / "score_distribution.png")
    niah_figure = property(lambda self: self.path / "niah.png")
    # niah / mask-sweep
    niah_log = property(lambda self: self.path / NIAH_LOG)
    niah = property(lambda self: self.path / "niah")
    mask_sweep = property(lambda self: self.path / "mask_sweep")
    niah_heatmaps = property(lambda self: self.path / "niah_heatmaps.png")
    k_curve = property(lambda self: self.path / "k_curve.png")
    legacy_niah = property(lambda self: self.path / "niah_result.json")
    legacy_sweep = property(lambda self: self.path / "mask_sweep.json")
    # compress
    compress_log = property(lambda self: self.path / COMPRESS_LOG)
    compress = property(lambda self: self.path / "compress")
    compress_figure = property(lambda self: self.path / "compress.png")
    # cot
    cot = property(lambda self: self.path / "cot")
    cot_figure = property(lambda self: self.path / "cot_bars.png")
    # patching
    patching = property(lambda self: self.path / "patching")
    patching_vs_retrieval = property(lambda self: self.path / "patching_vs_retrieval")
    patching_figure = property(lambda self: self.path / "patching_heatmap.png")
    patching_vs_retrieval_figure = property(lambda self: self.path / "patching_vs_retrieval.png")
    legacy_patching_vs_retrieval = property(
        lambda self: self.path / "patching_vs_retrieval.json")

    def property_dir(self, name: str) -> Path:
        """``properties/<name>`` (sparse, dynamic or stability)."""
        return self.properties / name

    def cot_result(self, task: str) -> Path:
        """``cot/<task>``: the saved CoTResult of one task."""
        return self.cot / task

    def cot_log(self, task: str) -> Path:
        """``cot_<task>.jsonl``: the answers of one task, as they are made."""
        return self.path / f"cot_{task}.jsonl"


# ---- writing ---------------------------------------------------------------------------------
def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    """Write a matplotlib figure atomically (a crash leaves the old file or the new)."""
    from rhlens.results import atomic_write

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
    from rhlens.retrieval import DetectConfig, scores_from_records

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
    from rhlens.properties import detection_properties

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
        from rhlens.plotting import plot_head_heatmap, plot_niah_heatmap, plot_score_distribution

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
    from rhlens.properties import detection_properties
    from rhlens.scores import RetrievalScores

    run = RunDir(out)
    scores = RetrievalScores.load(run.scores)
    return _write_properties(run, detection_properties(scores, settings))


def save_niah_run(out: str | Path, result, *, figures: bool = True) -> dict[str, Path]:
    """Write a NIAH sweep's result (``niah/``) and its heatmaps into a run directory."""
    run = RunDir(out)
    written = {"niah": result.save(run.niah)}
    _remove(run.legacy_niah)  # the older form of the same output
    if figures:
        from rhlens.plotting import plot_mask_heatmaps

        written["heatmaps"] = save_figure(plot_mask_heatmaps(result), run.niah_heatmaps)
    return written


def save_mask_sweep_run(out: str | Path, sweep, *, figures: bool = True) -> dict[str, Path]:
    """Write a mask sweep (``mask_sweep/``), its K curve and NIAH heatmaps."""
    run = RunDir(out)
    written = {"mask_sweep": sweep.save(run.mask_sweep)}
    _remove(run.legacy_sweep)
    _remove(run.legacy_niah)
    if figures:
        from rhlens.plotting import plot_k_curve, plot_mask_heatmaps

        written["k_curve"] = save_figure(plot_k_curve(sweep), run.k_curve)
        written["heatmaps"] = save_figure(
            plot_mask_heatmaps(sweep.niah, sweep.heatmap_labels()), run.niah_heatmaps)
    return written


def save_compress_run(out: str | Path, result, *, figures: bool = True) -> dict[str, Path]:
    """Write a KV budget sweep (``compress/``) and its figure (``compress.png``)."""
    run = RunDir(out)
    written = {"compress": result.save(run.compress)}
    if figures:
        from rhlens.plotting.compress import plot_budget_curve

        written["figure"] = save_figure(plot_budget_curve(result), run.compress_figure)
    return written


# ---- reading ---------------------------------------------------------------------------------
def load_single_file(cls: type[Result], directory: str | Path, name: str) -> Result | None:
    """A ``cls`` from the one JSON file ``name`` an older rhlens wrote into ``directory``
    (read as schema 0 through ``cls.upgrade``); ``None`` when the directory holds a current
    result, or no such file."""
    directory = Path(directory)
    path = directory / name
    if (directory / RESULT_FILE).exists() or not path.is_file():
        return None
    data = read_json(path, name)
    if not isinstance(data, dict) or data.get("kind") != cls.kind:
        raise ResultError(f"{path} holds no {cls.kind}")
    doc = cls.upgrade({"kind": cls.kind, "schema_version": 0, "meta": data}, 0, directory)
    return cls._from_doc(doc, directory)


def _kind_of(directory: Path) -> str | None:
    """The kind a saved-result directory declares (``None`` when it is not one)."""
    for name in (RESULT_FILE, LEGACY_RESULT_FILE):
        path = directory / name
        if path.is_file():
            doc = read_json(path, name)
            kind = doc.get("kind") if isinstance(doc, dict) else None
            if not isinstance(kind, str):
                raise ResultError(f"{path} names no kind of result (damaged?)")
            return kind
    return None


def load_saved(path: str | Path) -> Any:
    """The result saved at ``path`` (a directory, or an older single-file result), as its
    own class, whatever its kind."""
    path = Path(path)
    if path.is_file():
        doc = read_json(path)
        kind = doc.get("kind") if isinstance(doc, dict) else None
        cls = result_class(kind) if isinstance(kind, str) else None
        if cls is None:
            raise ResultError(f"{path} holds no rhlens result this version can read")
        return cls.load(path)
    kind = _kind_of(path)
    if kind is None:
        raise ResultError(f"{path} holds no saved rhlens result")
    return load_result(path)


def find_scores(source: str | Path):
    """Retrieval scores from saved scores, a run directory (``scores/``, else its
    ``head_scores.json``), or a paper-format JSON file."""
    from rhlens.scores import RetrievalScores

    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"{source} does not exist")
    if source.is_file():
        return RetrievalScores.from_paper_json(source)
    run = RunDir(source)
    for candidate in (source, run.scores):
        if candidate.is_dir() and _kind_of(candidate) == "RetrievalScores":
            return RetrievalScores.load(candidate)
    if run.head_scores.is_file():
        name = source.resolve().name
        if run.summary.is_file():
            summary = read_json(run.summary, "summary.json")
            name = summary.get("model", name) if isinstance(summary, dict) else name
        return RetrievalScores.from_paper_json(run.head_scores, model_name=name)
    raise ConfigError(f"{source} holds no retrieval scores (expected scores/ or "
                      "head_scores.json of a detection run, or a paper-format JSON file)")


@dataclass
class RunContents:
    """What one run directory holds; each part ``None`` (or empty) when absent.

    ``results`` has every saved result found, by where it lies (relative path); the named
    parts are views on it. ``notes`` say what is there but unfinished or unreadable.
    """

    path: Path
    results: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    def of_kind(self, *kinds: str) -> list[Any]:
        return [r for r in self.results.values() if type(r).__name__ in kinds]

    def _one(self, kind: str) -> Any:
        found = self.of_kind(kind)
        return found[0] if found else None

    @property
    def scores(self):
        return self._one("RetrievalScores")

    @property
    def sweep(self):
        return self._one("MaskSweepResult")

    @property
    def niah(self):
        return self._one("NIAHResult")

    @property
    def patching(self):
        return self._one("HeadPatchingResult")

    @property
    def patching_vs_retrieval(self):
        return self._one("PatchingVsRetrieval")

    @property
    def cot(self) -> list[Any]:
        return self.of_kind("CoTResult")

    @property
    def compress(self):
        return self._one("CompressSweepResult")

    def saved_property(self, name: str) -> Any:
        """A saved property of the detection run (``sparse``, ``dynamic``, ``stability``)."""
        return self.results.get(f"properties/{name}")

    @property
    def empty(self) -> bool:
        return not self.results


def _scan(directory: Path, prefix: str, out: dict[str, Any], depth: int) -> None:
    """Load every saved result under ``directory`` (a result's own sub-folders are part of
    it and are not loaded separately)."""
    for child in sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith(".")):
        rel = f"{prefix}{child.name}"
        if _kind_of(child) is not None:
            out[rel] = load_saved(child)
        elif depth > 1:
            _scan(child, f"{rel}/", out, depth - 1)


def read_run(path: str | Path) -> RunContents:
    """Everything a run directory holds, loaded (no model, nothing recomputed).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ConfigError: ``path`` is a file, or a folder holding no rhlens output at all.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if not path.is_dir():
        raise ConfigError(f"{path} is not a run directory")
    run, contents = RunDir(path), RunContents(path=path)
    found = contents.results
    if _kind_of(path) is not None:  # the folder is itself one saved result
        found["."] = load_saved(path)
    else:
        _scan(path, "", found, depth=2)
    # older single-file results
    if run.legacy_niah.is_file() and not (contents.niah or contents.sweep):
        from rhlens.niah import MaskSweepResult, NIAHResult

        if run.legacy_sweep.is_file():
            found["mask_sweep.json"] = MaskSweepResult.load(path)
        else:
            found["niah_result.json"] = NIAHResult.load(path)
    if run.legacy_patching_vs_retrieval.is_file() and not contents.patching_vs_retrieval:
        found["patching_vs_retrieval.json"] = load_saved(run.legacy_patching_vs_retrieval)
    tasks = {getattr(r, "task", None) for r in contents.cot}
    for f in sorted(path.glob("cot_*.json")):
        if not f.name.endswith(".run.json") and f.stem[len("cot_"):] not in tasks:
            found[f.name] = load_saved(f)
    if not contents.scores and run.head_scores.is_file():
        found["head_scores.json"] = find_scores(path)
    if run.summary.is_file():
        summary = read_json(run.summary, "summary.json")
        contents.summary = summary if isinstance(summary, dict) else None
    _note_unfinished(run, contents)
    if contents.empty and not contents.notes:
        raise ConfigError(
            f"{path} holds no rhlens results: expected scores/ or head_scores.json (detect), "
            "niah/ or mask_sweep/ (niah, mask-sweep), patching/ (patch), cot/ (cot), "
            "compress/ (compress), or "
            "any saved result")
    return contents


def _note_unfinished(run: RunDir, contents: RunContents) -> None:
    """Logs without the result they lead to: a run that was interrupted (or is running)."""
    if run.probes.exists() and contents.scores is None:
        contents.notes.append(f"{run.probes.name} is here but no scores/: the detection run has "
                              "not finished; rerun the same command to resume it")
    if run.niah_log.exists() and not (contents.niah or contents.sweep):
        contents.notes.append(f"{run.niah_log.name} is here but no saved NIAH result: the sweep "
                              "has not finished; rerun the same command to resume it")
    if run.compress_log.exists() and contents.compress is None:
        contents.notes.append(f"{run.compress_log.name} is here but no saved budget sweep: the sweep "
                              "has not finished; rerun the same command to resume it")
    tasks = {getattr(r, "task", None) for r in contents.cot}
    for log in sorted(run.path.glob("cot_*.jsonl")):
        if log.stem[len("cot_"):] not in tasks:
            contents.notes.append(f"{log.name} is here but no saved CoT result for its task: "
                                  "the run has not finished; rerun the same command to resume it")
