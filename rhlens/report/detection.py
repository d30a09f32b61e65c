"""The report's detection section: a run's scores and the properties saved beside them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rhlens.plotting import (
    plot_dynamic,
    plot_head_heatmap,
    plot_niah_heatmap,
    plot_score_distribution,
    plot_sparsity,
    plot_stability,
)
from rhlens.report.document import Section, Table, Text
from rhlens.report.format import clip, head_list, head_name, image, num, setting
from rhlens.retrieval.scores import RetrievalScores
from rhlens.store.runs import RunContents

__all__ = ["detection_section", "has_niah_records"]


def has_niah_records(records: Sequence[dict[str, Any]]) -> bool:
    """Whether ``records`` carry what a length x depth NIAH map needs."""
    return bool(records) and all(k in r for r in records for k in ("length", "depth", "rouge_recall"))


def _summary_rows(run: RunContents, scores: RetrievalScores) -> list[tuple[str, str]]:
    n_cells = scores.n_layers * scores.n_heads
    kv = f" ({scores.n_kv_heads} KV heads per layer)" if scores.n_kv_heads else ""
    rows = [("model", scores.model_name),
            ("heads", f"{scores.n_layers} layers x {scores.n_heads} heads = {n_cells}{kv}"),
            ("probes", f"{scores.n_probes}, {scores.n_successful} answered correctly")]
    mode = setting(scores.config, "mode")
    if mode:
        rows.append(("scoring", f"{mode} (success: ROUGE-1 recall > "
                                f"{setting(scores.config, 'success_threshold', 0.5)})"))
    for key, name in (("length", "context lengths"), ("depth", "needle depths (%)"),
                      ("needle_id", "needles")):
        values = sorted({p[key] for p in scores.probes if key in p})
        if values:
            rows.append((name, ", ".join(f"{v:g}" if isinstance(v, float) else str(v)
                                         for v in values)))
    summary = run.summary or {}
    if "wall_seconds" in summary:
        rows.append(("wall time", f"{summary['wall_seconds']:.0f} s"))
    if "written" in summary:
        rows.append(("written", str(summary["written"])))
    return rows


def _missing(run: RunContents, names: Sequence[str]) -> Text:
    listed = ", ".join(names)
    return Text(
        f"This run folder holds no saved {listed} result (it was written before rhlens saved "
        "the properties with the scores, or from a paper-format file). Nothing is recomputed "
        f"here with other settings; to add them, run rhlens.report.runs.save_properties({str(run.path)!r}) "
        "(or rerun the same rhlens detect command: every probe is done, so it only rewrites "
        "the outputs) and build the report again.", "note")


def _niah_section(scores: RetrievalScores, dpi: int) -> Section:
    sec = Section("Needle in a haystack")
    sec.add(image(plot_niah_heatmap(scores), "detection-niah",
                  "ROUGE-1 recall x 100 of the unmasked answers per length and depth.", dpi))
    return sec


def detection_section(run: RunContents, scores: RetrievalScores, *, top: int, dpi: int) -> Section:
    """Summary, top heads (with saved bootstrap intervals), maps, and the saved properties."""
    sec = Section("Detection")
    rows = _summary_rows(run, scores)
    n_cells = scores.n_layers * scores.n_heads
    if scores.n_successful == 0:
        sec.add(Table(("quantity", "value"), tuple(rows), caption="Summary"))
        sec.add(Text("No probe was answered correctly, so no retrieval score is defined: "
                     "use shorter contexts or other needles.", "note"))
        if has_niah_records(scores.probes):
            sec.children.append(_niah_section(scores, dpi))
        return sec

    mean = scores.mean
    for t in (0.1, 0.5):
        n_above = len(scores.retrieval_heads(t))
        rows.append((f"heads scoring > {t:g}", f"{n_above} ({100 * n_above / n_cells:.1f}%)"))
    rows.append(("highest score", num(float(mean.max()))))
    sec.add(Table(("quantity", "value"), tuple(rows), caption="Summary"))

    sparse = run.saved_property("sparse")
    dyn = run.saved_property("dynamic")
    stab = run.saved_property("stability")
    grid = (scores.n_layers, scores.n_heads)
    if stab is not None and tuple(stab.mean.shape) != grid:
        stab = None  # saved beside other scores: not these heads' intervals

    # top heads, with the saved bootstrap interval when there is one
    active = (scores.successful > 0).float().mean(0)
    group = scores.n_heads // scores.n_kv_heads if scores.n_kv_heads else None
    header = ["rank", "head", "layer", "head index", "score", "active on"]
    if stab is not None:
        header.append(f"{100 * stab.level:g}% interval")
    if group:
        header.append("KV head")
    table_rows = []
    best = [t for t in scores.top(top) if t[2] > 0]
    for rank, (la, h, s) in enumerate(best, start=1):
        row = [str(rank), head_name(la, h), str(la), str(h), num(s),
               f"{100 * float(active[la, h]):.0f}%"]
        if stab is not None:
            row.append(f"[{num(float(stab.ci_low[la, h]))}, {num(float(stab.ci_high[la, h]))}]")
        if group:
            row.append(str(h // group))
        table_rows.append(tuple(row))
    tops = Section("Top heads")
    if table_rows:
        tops.add(Table(tuple(header), tuple(table_rows),
                       caption=f"Best {len(table_rows)} heads by retrieval score (mean over the "
                               f"{scores.n_successful} successful probes); 'active on' = share of "
                               "those probes on which the head copied at least one token"))
    else:
        tops.add(Text("Every head scored 0: no head copied the needle.", "note"))
    sec.children.append(tops)

    maps = Section("Score map and distribution")
    maps.add(image(plot_head_heatmap(scores, top=min(10, n_cells)), "head-heatmap",
                   "Retrieval score of every head (layer x head); the 10 best are boxed and ranked.",
                   dpi))
    maps.add(image(plot_score_distribution(scores), "score-distribution",
                   "Every head's score, sorted: a few heads above 0.1, the rest near 0.", dpi))
    sec.children.append(maps)

    if has_niah_records(scores.probes):
        niah = _niah_section(scores, dpi)
        probe_rows = tuple(
            (str(p.get("key", i)), num(p.get("rouge_recall"), 2),
             "yes" if p.get("success") else "no", clip(p.get("response"), 160))
            for i, p in enumerate(scores.probes[:20]))
        more = f" (first 20 of {scores.n_probes})" if scores.n_probes > 20 else ""
        niah.add(Table(("probe", "recall", "counted", "answer"), probe_rows,
                       caption=f"Answers{more}"))
        sec.children.append(niah)

    missing = [name for name, res in (("sparse", sparse), ("dynamic", dyn)) if res is None]
    if stab is None and scores.n_successful >= 2:
        missing.append("stability")
    if missing:
        sec.add(_missing(run, missing))

    if sparse is not None:
        sparse_sec = Section("Sparse")
        sparse_sec.add(Table(("threshold", "heads above", "% of heads"), tuple(
            (f"{t:g}", str(int(c)), f"{100 * float(f):.1f}%")
            for t, c, f in zip(sparse.thresholds, sparse.counts, sparse.fractions))))
        sparse_sec.add(image(plot_sparsity(sparse), "sparsity",
                             "Histogram of head scores (log scale) and retrieval heads per layer.",
                             dpi))
        sec.children.append(sparse_sec)

    if dyn is not None:
        dyn_sec = Section("Dynamic")
        dyn_sec.add(Text(
            f"{len(dyn.always_active)} heads copy (score > {dyn.active_threshold:g}) on every "
            f"one of the {dyn.n_probes} successful probes: {head_list(dyn.always_active) or 'none'}. "
            f"{len(dyn.context_dependent)} retrieval heads (score > {dyn.retrieval_threshold:g}) "
            f"copy on some probes only: {head_list(dyn.context_dependent) or 'none'}."))
        dyn_sec.add(image(plot_dynamic(dyn, top=min(30, n_cells)), "dynamic",
                          "Share of probes on which each of the best heads copies, coloured by "
                          "score.", dpi))
        sec.children.append(dyn_sec)

    if stab is not None:
        sec.children.append(_stability_section(stab, dpi))
    elif scores.n_successful < 2:
        sec.add(Text("Stability needs at least 2 successful probes to resample; none saved.",
                     "note"))
    return sec


def _stability_section(stab, dpi: int) -> Section:
    sec = Section("Stability")
    lo, hi = stab.n_retrieval_ci
    reached = (f"the top-{stab.k} set reaches a Jaccard overlap of {stab.target:g} with the "
               f"full set from {stab.probes_needed} probes on"
               if stab.probes_needed is not None else
               f"the top-{stab.k} set never reaches a Jaccard overlap of {stab.target:g} "
               f"below all {stab.n_probes} probes: more probes would still change it")
    sec.add(Text(
        f"{stab.n_retrieval} heads score above {stab.threshold:g} "
        f"({100 * stab.level:g}% bootstrap interval {lo:g} to {hi:g}, {stab.n_boot} "
        f"resamples of the {stab.n_probes} successful probes, seed {stab.seed}); {reached} "
        f"({stab.repeats} subsamples per probe count)."))
    sec.add(image(plot_stability(stab), "stability",
                  "Top-K overlap against the number of probes, and bootstrap intervals of the "
                  "best heads' scores.", dpi))
    return sec
