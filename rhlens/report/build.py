"""``build_report``: the report of some run directories and paper-format score files."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from rhlens.errors import ConfigError
from rhlens.report.across import across_section
from rhlens.report.compress import compress_section
from rhlens.report.cot import cot_section
from rhlens.report.detection import detection_section
from rhlens.report.document import Report, Section, Text
from rhlens.report.families import families_section
from rhlens.report.niah import niah_section, sweep_section
from rhlens.report.patching import patching_section
from rhlens.retrieval.official import load_official
from rhlens.retrieval.scores import RetrievalScores
from rhlens.store.runs import RunContents, read_run

__all__ = ["build_report"]


def _official_sets(sources: Sequence[str | Path]) -> list[tuple[RetrievalScores, str]]:
    """Paper-format score files; a folder of them stands for every ``*.json`` in it (a run
    folder, or saved scores, for its scores)."""
    out: list[tuple[RetrievalScores, str]] = []
    for source in sources:
        source = Path(source)
        if not source.is_dir():
            out.append((load_official(source), str(source)))
            continue
        try:
            out.append((RetrievalScores.from_any(source), str(source)))
        except ConfigError:  # no run, no saved scores: a folder of paper files
            out += [(scores, str(source / f"{name}.json"))
                    for name, scores in load_official(source).items()]
    return out


def _label(run: RunContents) -> str:
    return run.path.name or run.path.resolve().name


def _model(run: RunContents) -> str:
    for part in (run.scores, run.patching, run.sweep.niah if run.sweep else None, run.niah,
                 *run.cot, *run.of_kind("FamilySet"), run.compress):
        if part is not None and getattr(part, "model_name", None):
            return part.model_name
    return "?"


def _run_section(run: RunContents, label: str, *, top: int, examples: int, dpi: int) -> Section:
    sec = Section(f"Run {label}")
    parts = [name for name, present in (
        ("detection", run.scores is not None), ("masking sweep", run.sweep is not None),
        ("NIAH under masks", run.niah is not None),
        ("head patching", run.patching is not None or run.patching_vs_retrieval is not None),
        ("chain of thought", bool(run.cot)),
        ("score families", bool(run.of_kind("FamilySet", "DamageResult"))),
        ("KV compression", run.compress is not None)) if present]
    sec.add(Text(f"Directory {run.path}; model {_model(run)}; holds "
                 f"{', '.join(parts) if parts else 'no finished result'}."))
    for note in run.notes:
        sec.add(Text(note, "note"))
    if run.scores is not None:
        sec.children.append(detection_section(run, run.scores, top=top, dpi=dpi))
    if run.sweep is not None:
        sec.children.append(sweep_section(run.sweep, examples=examples, dpi=dpi))
    if run.niah is not None:
        sec.children.append(niah_section(run.niah, examples=examples, dpi=dpi))
    if run.patching is not None or run.patching_vs_retrieval is not None:
        sec.children.append(patching_section(run, top=top, dpi=dpi))
    if run.cot:
        sec.children.append(cot_section(run.cot, examples=examples, dpi=dpi))
    if run.of_kind("FamilySet", "DamageResult"):
        sec.children.append(families_section(run.of_kind("FamilySet"), run.of_kind("DamageResult"),
                                             top=top, dpi=dpi))
    if run.compress is not None:
        sec.children.append(compress_section(run.compress, dpi=dpi))
    return sec


def build_report(run_dirs: str | Path | Sequence[str | Path] = (), *,
                 official: str | Path | Sequence[str | Path] = (),
                 title: str = "rhlens report", top: int = 20, examples: int = 5,
                 dpi: int = 100) -> Report:
    """Gather the saved results of run directories and paper-format score files into a report.

    Only what is saved is shown (no model is loaded, no analysis rerun with other settings);
    where an older run folder lacks a result the report shows, a note says how to make it.

    Args:
        run_dirs: directories written by ``rhlens detect / niah / mask-sweep / patch / cot``
            (or by the same functions from Python); each becomes one section holding a
            sub-section per kind of result found in it.
        official: paper-format JSON files (``{"<layer>-<head>": [scores]}``), or folders of
            them, such as the scores Wu et al. released; they enter the cross-model tables.
        title: the report's title.
        top: rows of the top-heads tables.
        examples: masked answers shown next to unmasked ones, per mask.
        dpi: resolution of the embedded figures.

    Raises:
        FileNotFoundError: a path does not exist.
        ConfigError: nothing was given, or a directory holds no rhlens result.
    """
    runs_in = [run_dirs] if isinstance(run_dirs, (str, Path)) else list(run_dirs)
    official_in = [official] if isinstance(official, (str, Path)) else list(official)
    if not runs_in and not official_in:
        raise ConfigError("nothing to report: give at least one run directory or official file")
    if top < 1 or examples < 0 or dpi < 10:
        raise ConfigError(f"need top >= 1, examples >= 0 and dpi >= 10, got {top}, {examples}, {dpi}")
    runs = [read_run(p) for p in runs_in]
    official_sets = _official_sets(official_in)

    labels = [_label(r) for r in runs]
    counts = Counter(labels)
    labels = [f"{x} ({i + 1})" if counts[x] > 1 else x for i, x in enumerate(labels)]
    sections = [_run_section(run, label, top=top, examples=examples, dpi=dpi)
                for run, label in zip(runs, labels)]

    score_sets = [(r.scores, str(r.path)) for r in runs if r.scores is not None] + official_sets
    across = across_section(score_sets, dpi=dpi)
    if across is not None:
        sections.append(across)
    elif official_sets:
        sections.append(Section("Across score sets", [Text(
            "Fewer than two score sets with successful probes: nothing to compare.", "note")]))
    sources = [str(p) for p in runs_in] + [src for _, src in official_sets]
    return Report(title=title, sections=sections, sources=sources)
