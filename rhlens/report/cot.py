"""The report's chain-of-thought section: saved CoT results, accuracies with their bootstrap
intervals and drops under masks, as the experiment computed them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rhlens.plotting import plot_cot_bars
from rhlens.report.document import Section, Table, Text
from rhlens.report.format import clip, image, setting

__all__ = ["cot_section"]


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def _broken(result: Any) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(unmasked, masked) answer pairs where the mask turned a correct answer wrong."""
    base = {(r["mode"], r.get("id")): r for r in result.records if r.get("mask", "none") == "none"}
    out = []
    for r in result.records:
        b = base.get((r["mode"], r.get("id")))
        if r.get("mask", "none") != "none" and b is not None and b["correct"] and not r["correct"]:
            out.append((b, r))
    return out


def cot_section(results: Sequence[Any], *, examples: int, dpi: int) -> Section:
    """Accuracy per task, mask and prompting mode with intervals; the answers a mask broke."""
    sec = Section("Chain of thought")
    n_answers = sum(len(r.records) for r in results)
    sec.add(Text(f"{n_answers} answers of {results[0].model_name} on "
                 f"{', '.join(r.task for r in results)}: accuracy per task, mask (random seeds "
                 "pooled) and prompting mode, with bootstrap intervals over items; a mask's drop "
                 "is a paired bootstrap against the unmasked run."))
    rows = []
    level = None
    for res in results:
        for row in res.table():
            drop = (f"{100 * row['drop']:+.0f} [{100 * row['drop_low']:+.0f}, "
                    f"{100 * row['drop_high']:+.0f}]") if "drop" in row else ""
            rows.append((row["task"], row["mask"], row["mode"], str(row["n"]),
                         _pct(row["accuracy"]), f"[{_pct(row['low'])}, {_pct(row['high'])}]",
                         drop))
        level = setting(res.config, "level")
    interval = f"{100 * level:g}% interval" if level else "interval"
    sec.add(Table(("task", "mask", "mode", "items", "accuracy", interval, "drop (points)"),
                  tuple(rows), caption="Accuracy"))
    sec.add(image(plot_cot_bars(list(results)), "cot-bars",
                  "Accuracy per task and prompting mode under each mask, with bootstrap "
                  "intervals.", dpi))
    broken = [(res, b, m) for res in results for b, m in _broken(res)]
    if broken:
        sec.children.append(Section("Answers broken by a mask", [Table(
            ("task", "mode", "item", "gold", "mask", "unmasked output", "masked output"),
            tuple((res.task, str(b["mode"]), str(b.get("id", "")), clip(b.get("gold")),
                   str(m.get("mask")), clip(b.get("output")), clip(m.get("output")))
                  for res, b, m in broken[:examples]))]))
    return sec
