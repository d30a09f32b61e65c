"""The report's masking sections: a NIAH sweep under masks, and the K curve of a mask sweep."""

from __future__ import annotations

from collections.abc import Sequence

from rhlens.niah import MaskSweepResult, NIAHResult
from rhlens.plotting import plot_k_curve, plot_mask_heatmaps
from rhlens.report.detection import has_niah_records
from rhlens.report.document import Image, Section, Table, Text
from rhlens.report.format import clip, image, num, setting

__all__ = ["niah_section", "sweep_section"]

ANSWER_CLASSES = ("correct", "partial", "hallucination", "refusal", "degenerate")


def _classes_table(niah: NIAHResult, labels: Sequence[str], caption: str) -> Table:
    rows = []
    for label in labels:
        counts = niah.class_counts(label)
        n_heads = len(niah.masks[label].get("heads", []))
        rows.append((label, str(n_heads), num(niah.score(label), 1),
                     *(str(counts.get(c, 0)) for c in ANSWER_CLASSES)))
    return Table(("mask", "heads", "NIAH score", *ANSWER_CLASSES), tuple(rows), caption=caption)


def _examples(niah: NIAHResult, label: str, n: int) -> Section | None:
    """The masked answers next to the unmasked ones: hallucinations first, else any failure."""
    if "none" not in niah.masks or label not in niah.masks or label == "none":
        return None
    sec = Section(f"Answers under {label}, side by side")
    rows = niah.examples(label, n=n, classes=("hallucination",))
    if not rows:
        rows = niah.examples(label, n=n, classes=("partial", "refusal", "degenerate"))
        text = (f"No answer under {label} is a hallucination; other failures:" if rows else
                f"Every answer under {label} is still correct.")
        sec.add(Text(text, "note"))
    if rows:
        sec.add(Table(("probe", "question", "expected", "unmasked answer", f"answer under {label}",
                       "class"),
                      tuple((clip(r["key"], 60), clip(r["question"]), clip(r["expected"]),
                             clip(r["unmasked"]), clip(r["masked"]), r["class"]) for r in rows)))
    return sec


def _heatmap(niah: NIAHResult, labels: Sequence[str], name: str, dpi: int) -> Image | None:
    labels = [x for x in labels if x in niah.masks]
    if not labels or not all(has_niah_records(niah.for_mask(x)) for x in labels):
        return None
    return image(plot_mask_heatmaps(niah, labels), name,
                 "NIAH score (ROUGE-1 recall x 100) per context length and needle depth, "
                 "one panel per mask.", dpi)


def sweep_section(sweep: MaskSweepResult, *, examples: int, dpi: int) -> Section:
    """The K curve, its numbers, NIAH maps and the answers the top-K mask broke."""
    niah = sweep.niah
    sec = Section("Masking sweep")
    c = sweep.curve()
    kmax = max(sweep.ks) if sweep.ks else 0
    some = niah.masks.get(f"top-{kmax}", {})
    n_probes = len(niah.for_mask("none")) if "none" in niah.masks else 0
    below = sweep.k_below(50.0)
    sec.add(Text(
        f"{niah.model_name}: NIAH score with the top-K retrieval heads masked against K random "
        f"heads (never a retrieval head), {n_probes} probes, {len(sweep.seeds)} random "
        f"draw(s) per K, mask mode {some.get('mode', '?')}, phase {some.get('phase', '?')}. "
        + (f"Masking the top {below} heads brings the score below 50."
           if below is not None else "No top-K mask tried brings the score below 50.")))
    rows = tuple((str(k), num(t, 1), f"{m:.1f} ± {s:.1f}", ", ".join(num(v, 1) for v in r))
                 for k, t, m, s, r in zip(c["k"], c["top"], c["random_mean"], c["random_std"],
                                          c["random"]))
    sec.add(Table(("K", "top-K masked", "random-K masked", "per seed"), rows,
                  caption="NIAH score against K"))
    sec.add(image(plot_k_curve(sweep), "k-curve",
                  "NIAH score against K: top-K retrieval heads (red) vs K random heads (blue).", dpi))
    maps = _heatmap(niah, sweep.heatmap_labels(), "sweep-niah-heatmaps", dpi)
    if maps is not None:
        sec.add(maps)
    sec.add(_classes_table(niah, niah.labels, "Answer classes per mask"))
    if kmax:
        ex = _examples(niah, f"top-{kmax}", examples)
        if ex is not None:
            sec.children.append(ex)
    return sec


def niah_section(niah: NIAHResult, *, examples: int, dpi: int) -> Section:
    """Scores and answer classes per mask, maps, and broken answers side by side."""
    sec = Section("NIAH under masks")
    budget = setting(niah.config, "max_new_tokens", "?")
    sec.add(Text(f"{niah.model_name}: every probe answered under {len(niah.masks)} mask(s), "
                 f"up to {budget} new tokens; the NIAH score is the ROUGE-1 recall of the "
                 "expected answer x 100."))
    sec.add(_classes_table(niah, niah.labels, "NIAH score and answer classes per mask"))
    maps = _heatmap(niah, niah.labels[:4], "niah-heatmaps", dpi)
    if maps is not None:
        sec.add(maps)
    for label in [x for x in niah.labels if x != "none"][:3]:
        ex = _examples(niah, label, examples)
        if ex is not None:
            sec.children.append(ex)
    return sec
