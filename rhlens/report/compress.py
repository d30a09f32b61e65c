"""The report's KV-compression section: NIAH against the KV budget, per cache policy."""

from __future__ import annotations

from rhlens.compress.sweep import CompressSweepResult
from rhlens.plotting.compress import plot_budget_curve
from rhlens.report.document import Section, Table, Text
from rhlens.report.format import image, num, setting

__all__ = ["compress_section"]


def compress_section(result: CompressSweepResult, *, dpi: int) -> Section:
    """The budget curve, its numbers (actual shares, heads kept, windows) and what was compared."""
    sec = Section("KV cache compression")
    n_probes = len(result.niah.for_mask("full"))
    cfg = result.config
    some = next(iter(result.policies.values()))
    sec.add(Text(
        f"{result.model_name}: {n_probes} NIAH probes answered with the full KV cache and with "
        f"head-selective caches at budgets of {', '.join(f'{b:g}' for b in result.budgets)} of the "
        f"full cache's bytes, counted at {result.context} tokens ({some['n_selectable']} KV heads "
        f"to choose from). A ranked policy keeps its best KV heads whole (as many as the budget "
        f"buys; under grouped-query attention a KV head scores the {setting(cfg, 'pool', 'max')} of "
        f"its query heads) and every other KV head {setting(cfg, 'sink', '?')} sink + "
        f"{setting(cfg, 'window', '?')} recent tokens; StreamingLLM keeps sink + the window the "
        f"budget buys in every head; random policies keep as many KV heads as the ranked ones, "
        f"drawn at random ({len(result.seeds)} seeds). The policies act while the model answers; "
        "the prompt is read with full attention (the cache is compressed after the prefill)."))
    header = ["budget", "share", "KV heads kept", "full"]
    header += list(result.rankings)
    if result.has_streaming:
        header += ["StreamingLLM (window)"]
    if result.seeds:
        header += ["random (mean ± std)"]
    rows = []
    for r in result.table():
        row = [f"{r['budget']:g}", num(r["share"], 3), f"{r['full_kv_heads']}/{r['of_kv_heads']}",
               num(r["full"], 1)]
        row += [num(r[name], 1) for name in result.rankings]
        if result.has_streaming:
            row.append(f"{num(r['streaming'], 1)} ({r['streaming_window']})")
        if result.seeds:
            row.append(f"{r['random_mean']:.1f} ± {r['random_std']:.1f}")
        rows.append(tuple(row))
    sec.add(Table(tuple(header), tuple(rows),
                  caption="NIAH score (ROUGE-1 recall x 100) per budget; share: the ranked and random "
                          "policies' actual bytes over the full cache's"))
    sec.add(image(plot_budget_curve(result), "compress-budget",
                  "NIAH score against the share of the KV bytes kept, one line per policy; the band is "
                  "random heads' mean ± std over seeds.", dpi))
    return sec
