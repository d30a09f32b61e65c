"""The report's cross-run section: universality over every score set, and the intrinsic
comparison of every pair on the same layer x head grid.

No run holds these (each compares several runs or paper files), so they are computed here,
with the paper's definitions, stated in the captions: a retrieval head scores above 0.1;
the table lists each set's top 5 heads; pairs are compared on their top 20 heads.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import replace
from pathlib import Path

from rhlens.plotting import plot_intrinsic, plot_universal
from rhlens.properties import intrinsic, universal
from rhlens.report.document import Section, Table, Text
from rhlens.report.format import head_name, image, num
from rhlens.retrieval.scores import RetrievalScores

__all__ = ["across_section"]

THRESHOLD = 0.1  # the paper's retrieval head
TABLE_TOP = 5
INTRINSIC_K = 20
MAX_SCATTERS = 8


def across_section(score_sets: list[tuple[RetrievalScores, str]], *, dpi: int) -> Section | None:
    """``None`` when fewer than two sets have successful probes (nothing to compare)."""
    usable = [(s, src) for s, src in score_sets if s.n_successful > 0]
    if len(usable) < 2:
        return None
    names = Counter(s.model_name for s, _ in usable)
    labelled = [s if names[s.model_name] == 1 else
                replace(s, model_name=f"{s.model_name} [{Path(src).name}]") for s, src in usable]
    sec = Section("Across score sets")
    uni = universal(labelled, threshold=THRESHOLD, top_k=TABLE_TOP)
    uni_sec = Section("Universal")
    uni_sec.add(Table(
        ("model", "layers x heads", "probes", f"retrieval heads (> {uni.threshold:g})",
         "% of heads", f"top-{uni.top_k} heads (score)"),
        tuple((r.model, f"{r.n_layers} x {r.n_heads}", str(r.n_probes), str(r.n_retrieval),
               f"{r.percent_retrieval:.1f}%",
               ", ".join(f"{head_name(la, h)} ({s:.2f})" for la, h, s in r.top)) for r in uni.rows),
        caption="Retrieval heads in every score set"))
    uni_sec.add(image(plot_universal(uni), "universal",
                      f"Share of heads scoring above {THRESHOLD:g}, per score set.", dpi))
    sec.children.append(uni_sec)

    pairs = [(a, b) for a, b in itertools.combinations(labelled, 2)
             if (a.n_layers, a.n_heads) == (b.n_layers, b.n_heads)]
    if not pairs:
        sec.add(Text("No two score sets share a layer x head grid, so there is no intrinsic "
                     "comparison.", "note"))
        return sec
    intr = Section("Intrinsic")
    results = [intrinsic(a, b, k=min(INTRINSIC_K, a.n_layers * a.n_heads)) for a, b in pairs]
    intr.add(Table(("model A", "model B", "grid", "Pearson", "Spearman", "top-K overlap",
                    "Jaccard"), tuple(
        (r.model_a, r.model_b, f"{a.n_layers} x {a.n_heads}", num(r.pearson, 2),
         num(r.spearman, 2), f"{r.overlap}/{r.k}", num(r.jaccard, 2))
        for r, (a, _) in zip(results, pairs)),
        caption="Pairs with the same layer x head grid: a variant of a base model keeps its "
                "retrieval heads (high correlation), unrelated models do not"))
    for r in results[:MAX_SCATTERS]:
        intr.add(image(plot_intrinsic(r), f"intrinsic-{r.model_a}-{r.model_b}",
                       f"{r.model_a} against {r.model_b}, one point per head.", dpi))
    if len(results) > MAX_SCATTERS:
        intr.add(Text(f"Scatter plots of the first {MAX_SCATTERS} of {len(results)} pairs.",
                      "note"))
    sec.children.append(intr)
    return sec
