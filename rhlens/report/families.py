"""The report's score-families section: how families agree, where their tops sit, what masking them does."""

from __future__ import annotations

import math
from collections.abc import Sequence

from rhlens.families import FAMILIES, DamageResult, FamilySet
from rhlens.plotting import plot_damage_curves, plot_family_correlations, plot_family_tops
from rhlens.report.document import Section, Table, Text
from rhlens.report.format import head_list, image, num

__all__ = ["families_section"]


def _ci(values: Sequence[float], digits: int) -> str:
    lo, hi = values
    if not (math.isfinite(lo) or math.isinf(lo)) or math.isnan(hi):
        return "n/a"
    show = lambda x: "inf" if math.isinf(x) else f"{x:.{digits}f}"  # noqa: E731
    return f"[{show(lo)}, {show(hi)}]"


def _k(x: float) -> str:
    return "> max K" if math.isinf(x) else num(x, 1)


def _agreement(fs: FamilySet, top: int, dpi: int) -> Section:
    where = f" on the {fs.needle_set} needles" if fs.needle_set else ""
    answers = getattr(fs.config, "answers", "model")
    how = "" if answers == "model" else " (reference answers)"
    tag = (fs.needle_set or "probes") + ("" if answers == "model" else "-reference")
    sec = Section(f"Score families of {fs.model_name}{where}{how}")
    spans = (f"mass looks at the {getattr(fs.config, 'mass_span', 'answer')} span, query at the "
             f"{getattr(fs.config, 'query_span', 'needle')} span")
    sec.add(Text(
        f"Each family ranks the {fs.families[0].n_layers} x {fs.families[0].n_heads} heads its own way "
        + ("(copy and mass at the model's own answers, means over the probes it answered"
           if answers == "model" else "(copy and mass with the needle's answer teacher-forced, every probe "
           "counted") + f"; {spans}). Spearman and top-10 overlap are against the paper's copy score."))
    defined = set(fs.defined())
    for name in fs.names:
        if name not in defined:
            sec.add(Text(f"{name}: no probe answered correctly, so no score is defined.", "note"))
    rows = []
    for row in fs.table(reference="copy", k=10):
        share = row.get("top10_layer_share")
        rows.append((row["family"], f"{row['counted']}/{row['probes']}",
                     num(row.get("spearman_vs_copy"), 2), num(row.get("top10_overlap_vs_copy"), 1),
                     *((num(share.get("global"), 1),) if share is not None else ()),
                     head_list(fs[row["family"]].top_heads(min(top, 5)))))
    header = ("family", "probes counted", "Spearman vs copy", "top-10 overlap",
              *(("top-10 in global layers",) if fs.layer_types else ()), "top heads")
    sec.add(Table(header, tuple(rows), caption="Families side by side"))
    if fs.layer_types:
        n_global = fs.layer_types.count("global")
        sec.add(Text(f"{n_global} of {len(fs.layer_types)} layers attend globally (layers "
                     f"{', '.join(str(i) for i, t in enumerate(fs.layer_types) if t == 'global')}); "
                     "the others through a sliding window."))
    if len(defined) >= 2:
        sec.add(image(plot_family_correlations(fs), f"family-correlations-{tag}",
                      "Spearman rank correlation between families' head scores.", dpi))
    if defined:
        sec.add(image(plot_family_tops(fs), f"family-tops-{tag}",
                      "Each family's top-10 heads on the layer x head grid.", dpi))
    return sec


def _damage(res: DamageResult, dpi: int) -> Section:
    where = f" on the {res.needle_set} needles" if res.needle_set else ""
    sec = Section(f"Masking each family's top heads{where}")
    summary = res.summary()
    base = summary["random"]["curve"][0]
    n_probes = len(res.probe_keys)
    sec.add(Text(
        f"{res.niah.model_name}: NIAH score (ROUGE-1 recall x 100) over {n_probes} probes with "
        f"each family's top-K heads masked, K in {', '.join(map(str, res.ks))}, against K random "
        f"heads ({len(res.seeds)} seeds); unmasked score {base:.1f}. K to halve: where the curve "
        "reaches half the unmasked score (linear between the Ks tried); AUC: the share of the "
        "unmasked score kept on average over K in [0, max K] (lower = more damage). Intervals: "
        "95% bootstrap over probes."))
    if base < 20:
        sec.add(Text(f"The unmasked score is only {base:.1f}: the model rarely answers these probes, "
                     "so there is little retrieval for a mask to break and the curves say little.",
                     "note"))
    rows = tuple((name, _k(s["k_half"]), _ci(s["k_half_ci"], 1), num(s["auc"], 2), _ci(s["auc_ci"], 2),
                  " / ".join(num(x, 0) for x in s["curve"]))
                 for name, s in summary.items())
    sec.add(Table(("heads masked", "K to halve", "95% CI", "AUC", "95% CI",
                   f"NIAH at K = {', '.join(map(str, res.all_ks))}"), rows,
                  caption="Damage per family"))
    sec.add(image(plot_damage_curves(res), f"damage-{res.needle_set or 'probes'}",
                  "NIAH score against K for each family's top-K heads and for random heads.", dpi))
    return sec


def families_section(sets: Sequence[FamilySet], damages: Sequence[DamageResult], *, top: int,
                     dpi: int) -> Section:
    """Agreement tables and figures of every family set, and the damage of every sweep."""
    sec = Section("Score families")
    sec.add(Text("Which heads retrieve? The paper's copy score against attention mass on the needle "
                 "while answering, attention from the question to the needle, and TransformerLens' "
                 "head detectors; judged by what masking each family's top heads does to NIAH."))
    names = list(dict.fromkeys(n for fs in sets for n in fs.names))
    if names:
        sec.add(Table(("family", "what it measures"), tuple((n, FAMILIES[n]) for n in names),
                      caption="Definitions"))
    sec.children.extend(_agreement(fs, top, dpi) for fs in sets)
    sec.children.extend(_damage(res, dpi) for res in damages)
    return sec
