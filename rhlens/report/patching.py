"""The report's patching section: a saved head-patching result and its saved comparison with
the retrieval scores (nothing is recomputed; a missing comparison is noted)."""

from __future__ import annotations

from typing import Any

from rhlens.plotting.patching import plot_patching_heatmap, plot_patching_vs_retrieval
from rhlens.report.document import Section, Table, Text
from rhlens.report.format import clip, head_name, image, num, setting
from rhlens.store.runs import RunContents

__all__ = ["patching_section"]

_SETTING = ("mode", "direction", "positions", "metric")


def _summary(res: Any) -> Table:
    cfg = res.config
    rows = [("model", res.model_name), ("pairs", str(res.n_pairs)),
            ("setting", "/".join(str(setting(cfg, k, "?")) for k in _SETTING)),
            ("clean metric (mean)", num(float(res.clean.mean()))),
            ("corrupted metric (mean)", num(float(res.corrupted.mean())))]
    layers = setting(cfg, "layers")
    if layers:
        rows.append(("layers patched", ", ".join(str(x) for x in layers)))
    if res.seconds:
        rows.append(("time per pair", f"{sum(res.seconds) / len(res.seconds):.1f} s"))
    return Table(("quantity", "value"), tuple(rows), caption="Summary")


def _heads_table(res: Any, scores: Any, top: int) -> Table | Text:
    df = res.to_dataframe().head(top) if bool(res.mean.isfinite().any()) else None
    same_grid = (scores is not None and scores.n_successful
                 and (scores.n_layers, scores.n_heads) == (res.n_layers, res.n_heads))
    score = scores.mean if same_grid else None
    header = (("rank", "head", "effect", "std over pairs", "pairs") +
        (("retrieval score",) if score is not None else ()))
    rows = []
    for rank, r in enumerate(df.itertuples(index=False) if df is not None else (), start=1):
        row = (str(rank), head_name(int(r.layer), int(r.head)), num(r.effect), num(r.std),
               str(r.n_pairs))
        if score is not None:
            row += (num(float(score[int(r.layer), int(r.head)])),)
        rows.append(row)
    if not rows:
        return Text("No head has a finite patching effect (do the pairs' runs differ?).", "note")
    return Table(header, tuple(rows),
                 caption="Heads by mean effect (1 = the head alone carries the difference)")


def _comparison(cmp: Any, dpi: int) -> Section:
    vs = Section("Patching effect vs retrieval score")
    vs.add(Text(f"Over the heads that have both, Spearman {num(cmp.spearman)} and Pearson "
                f"{num(cmp.pearson)}; a head is causal above an effect of "
                f"{cmp.effect_threshold:g} and a retrieval head above a score of "
                f"{cmp.score_threshold:g}."))
    groups = (("both", cmp.both), ("causal, not retrieval", cmp.causal_not_retrieval),
              ("retrieval, not causal", cmp.retrieval_not_causal))
    rows = tuple((name, head_name(la, h), num(e), num(s))
                 for name, items in groups for la, h, e, s in items[:10])
    if rows:
        vs.add(Table(("group", "head", "effect", "retrieval score"), rows,
                     caption="Where the two measures agree and disagree (10 per group at most)"))
    vs.add(image(plot_patching_vs_retrieval(cmp), "patching-vs-retrieval",
                 "Each head's patching effect against its retrieval score.", dpi))
    return vs


def patching_section(run: RunContents, *, top: int, dpi: int) -> Section:
    """Summary, heads by effect, the pairs, the effect map, and effect vs retrieval score."""
    sec = Section("Head patching")
    res, cmp = run.patching, run.patching_vs_retrieval
    if res is not None:
        sec.add(_summary(res))
        sec.add(_heads_table(res, run.scores, top))
        if res.pairs:
            sec.add(Table(("pair", "clean answer", "corrupted answer", "clean", "corrupted"), tuple(
                (clip(p.get("key", i), 60), clip(p.get("clean_answer", "")),
                 clip(p.get("corrupted_answer", "")), num(c), num(k))
                for i, (p, c, k) in enumerate(zip(res.pairs[:10], res.clean.tolist(),
                                                  res.corrupted.tolist()))),
                caption="Pairs (metric of the unpatched clean and corrupted runs)"))
        sec.add(image(plot_patching_heatmap(res), "patching-heatmap",
                      "Mean patching effect of every head.", dpi))
        if cmp is None and run.scores is not None:
            sec.add(Text("This folder holds retrieval scores and a patching result but no saved "
                         "comparison of the two; rerun rhlens patch with --scores, or save "
                         "rhlens.patching.patching_vs_retrieval(result, scores) into "
                         f"{run.path}/patching_vs_retrieval.", "note"))
    if cmp is not None:
        sec.children.append(_comparison(cmp, dpi))
    return sec
