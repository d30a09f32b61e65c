"""A KV budget sweep whose free setting is chosen on one split of probes and reported on another.

At a fixed budget the other KV heads' window is also the budget's split between whole heads and
windows (a longer window buys fewer whole heads). :func:`heldout_compress` runs every candidate
window on the choosing probes (the ranked policies and the full cache only), picks per budget
the window whose ranked policy scores best there (:func:`rhlens.needlesets.choose_setting`), and
runs only each budget's chosen window on the report probes, with StreamingLLM, random heads and the full
cache. Each split is one sweep (every policy of a probe decoded on one prefill): ``out/choose`` and
``out/report``, each saying in its ``run.json``
(``"heldout"``) which split it holds and what it was used for; ``out/heldout.json`` has the table.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rhlens.compress.policy import CompressConfig
from rhlens.compress.sweep import CompressSweepResult, compress_sweep
from rhlens.errors import ConfigError
from rhlens.needlesets import choose_setting, record_split
from rhlens.results import write_json

__all__ = ["heldout_compress"]


def heldout_compress(model, choose_probes: Sequence, report_probes: Sequence,
                     rankings: Mapping[str, Any], *, budgets: Sequence[float], windows: Sequence[int],
                     seeds: int = 3, config: CompressConfig | None = None, ranking: str | None = None,
                     out: str | Path, splits: Mapping[str, Mapping[str, Any]] | None = None,
                     sweep: Callable[..., CompressSweepResult] = compress_sweep,
                     **sweep_kw: Any) -> dict[str, Any]:
    """Choose the window per budget on ``choose_probes``, report on ``report_probes``.

    Args:
        rankings: as :func:`~rhlens.compress.sweep.compress_sweep`'s; ``ranking`` (default the
            first) is the one whose score on the choosing split picks the window.
        windows: the candidate windows of the other KV heads (``config``'s sink and pool kept).
        splits: what each split is made of (``{"choose": record, "report": record}``, e.g.
            :func:`rhlens.needlesets.split_probes`' records), written into the runs.
        sweep: the sweep function (a test may pass a stand-in); ``sweep_kw`` go to it.

    Returns the table: per budget the chosen window, every window's score on the choosing split,
    and the chosen window's scores on both splits (ranked, full; on the report split also
    StreamingLLM and random heads).
    """
    config = config or CompressConfig()
    windows = [int(w) for w in windows]
    if not windows or len(set(windows)) != len(windows):
        raise ConfigError(f"windows must be distinct and at least one, got {list(windows)!r}")
    if not rankings:
        raise ConfigError("a held-out sweep needs a ranking to choose with")
    ranking = ranking or next(iter(rankings))
    if ranking not in rankings:
        raise ConfigError(f"ranking {ranking!r} is not among {', '.join(rankings)}")
    choose_keys = {p.key for p in choose_probes}
    shared = choose_keys & {p.key for p in report_probes}
    if shared:
        raise ConfigError(f"the choosing and report probes share {len(shared)} probe(s), e.g. "
                          f"{sorted(shared)[0]}: held out means disjoint")
    splits = dict(splits or {})
    out = Path(out)
    budgets = sorted({float(b) for b in budgets})

    # Choosing: every window as its own copy of the ranking, all decoded on one prefill a probe.
    names = {w: f"{ranking}-w{w}" for w in windows}
    choose = sweep(model, choose_probes, {names[w]: rankings[ranking] for w in windows}, budgets=budgets,
                   seeds=0, streaming=False, config=config, ranking_windows={names[w]: w for w in windows},
                   out=out / "choose", **sweep_kw)
    record_split(out / "choose", {"split": "choose", "used_for": "choosing the window per budget",
                                  **splits.get("choose", {})})
    chosen: dict[float, int] = {}
    scored: dict[float, list] = {}
    for b in budgets:
        chosen[b], scored[b] = choose_setting(
            windows, lambda w, b=b: choose.score(f"{names[w]}@{b:g}"))

    # Reporting: the chosen window of each budget only, with the baselines, on the other split.
    report = sweep(model, report_probes, rankings, budgets=budgets, seeds=seeds, streaming=True,
                   config=config, windows=chosen, out=out / "report", **sweep_kw)
    record_split(out / "report", {"split": "report", "used_for": "the reported numbers, at the "
                                  f"windows chosen on the choosing split: {chosen}",
                                  **splits.get("report", {})})
    by_budget = {r["budget"]: r for r in report.table()}
    rows = []
    for b in budgets:
        w = chosen[b]
        label = f"{ranking}@{b:g}"
        rrow = by_budget[b]
        row = {"budget": b, "window": w, "ranking": ranking, "choose_scores": scored[b],
               "full_kv_heads": report.policies[label]["n_full"],
               "of_kv_heads": report.policies[label]["n_selectable"], "share": report.share(label),
               "choose": {"full": choose.score("full"), ranking: choose.score(f"{names[w]}@{b:g}"),
                          "n_probes": len(choose_probes)},
               "report": {"full": report.score("full"), ranking: report.score(label),
                          "n_probes": len(report_probes),
                          **{k: rrow[k] for k in ("streaming", "random_mean", "random_std") if k in rrow}}}
        for side in ("choose", "report"):
            full = row[side]["full"]
            row[side]["vs_full"] = row[side][ranking] / full if full else float("nan")
        rows.append(row)
    doc = {"ranking": ranking, "budgets": budgets, "windows": windows, "sink": config.sink,
           "pool": config.pool, "splits": {"choose": {"used_for": "choosing the window per budget",
                                                      **splits.get("choose", {})},
                                           "report": {"used_for": "the reported numbers",
                                                      **splits.get("report", {})}},
           "rows": rows}
    write_json(out / "heldout.json", doc)
    return doc
