"""Reading run folders back: any saved result by its kind, older single-file results, and
everything a run directory holds (:func:`read_run`), so the report and
:meth:`RetrievalScores.from_any <rhlens.retrieval.RetrievalScores.from_any>` need no knowledge
of the layout (:mod:`rhlens.store.layout` names the files).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rhlens.errors import ConfigError, ResultError
from rhlens.store.files import read_json
from rhlens.store.layout import LEGACY_RESULT_FILE, RESULT_FILE, RunDir
from rhlens.store.results import Result, load_result, result_class

__all__ = ["RunContents", "kind_of", "load_saved", "load_single_file", "read_run"]


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


def _registered(kind: str) -> type[Result]:
    cls = result_class(kind)
    if cls is None:
        raise ResultError(f"no class of results of kind {kind!r} is registered")
    return cls


def kind_of(directory: Path) -> str | None:
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
    kind = kind_of(path)
    if kind is None:
        raise ResultError(f"{path} holds no saved rhlens result")
    return load_result(path)


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
        if kind_of(child) is not None:
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
    if kind_of(path) is not None:  # the folder is itself one saved result
        found["."] = load_saved(path)
    else:
        _scan(path, "", found, depth=2)
    # older single-file results
    if run.legacy_niah.is_file() and not (contents.niah or contents.sweep):
        if run.legacy_sweep.is_file():
            found["mask_sweep.json"] = _registered("MaskSweepResult").load(path)
        else:
            found["niah_result.json"] = _registered("NIAHResult").load(path)
    if run.legacy_patching_vs_retrieval.is_file() and not contents.patching_vs_retrieval:
        found["patching_vs_retrieval.json"] = load_saved(run.legacy_patching_vs_retrieval)
    tasks = {getattr(r, "task", None) for r in contents.cot}
    for f in sorted(path.glob("cot_*.json")):
        if not f.name.endswith(".run.json") and f.stem[len("cot_"):] not in tasks:
            found[f.name] = load_saved(f)
    if not contents.scores and run.head_scores.is_file():
        found["head_scores.json"] = _registered("RetrievalScores").from_any(path)
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
