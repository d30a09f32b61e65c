"""Paired bootstrap intervals for a held-out KV sweep (``scripts/heldout_compress.py``, issue 30).

Reads ``<run>/heldout.json`` and the two sweeps' ``compress.jsonl`` (``<run>/choose``,
``<run>/report``) and, per budget, resamples each split's probes (one resample for every policy
of a split: paired) for the chosen window's ranked policy: its share of the full cache's score
on both splits, and on the report split its gaps to StreamingLLM and to random heads (mean
over seeds), each with a 95% percentile interval.

    python scripts/heldout_ci.py runs/heldout/compress --out scripts/results/heldout/compress_ci.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rhlens.stats import bootstrap_means, percentile_interval


def ci(samples: torch.Tensor) -> list[float]:
    lo, hi = percentile_interval(samples)
    return [round(float(lo), 3), round(float(hi), 3)]


def load(sweep: Path) -> dict[str, dict[str, float]]:
    scores: dict[str, dict[str, float]] = defaultdict(dict)
    for line in (sweep / "compress.jsonl").read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            if "score" in r:
                scores[r["mask"]][r["probe"]] = float(r["score"])
    return scores


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="the folder holding heldout.json, choose/ and report/")
    ap.add_argument("--boot", type=int, default=2000)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    run = Path(args.run)
    doc = json.loads((run / "heldout.json").read_text())
    ranking = doc["ranking"]
    sides = {s: load(run / s) for s in ("choose", "report")}
    rows = []
    for r in doc["rows"]:
        b, w = r["budget"], r["window"]
        row = {"budget": b, "window": w, "share": r["share"], "full_kv_heads": r["full_kv_heads"]}
        for side, scores in sides.items():
            label = f"{ranking}-w{w}@{b:g}" if side == "choose" else f"{ranking}@{b:g}"
            probes = sorted(scores["full"])
            names = ["full", label]
            if side == "report":
                rnd = sorted(m for m in scores if m.startswith("random") and m.endswith(f"@{b:g}"))
                names += [f"streaming@{b:g}", *rnd]
            col = torch.tensor([[scores[m][p] for m in names] for p in probes], dtype=torch.float64)
            boot = bootstrap_means(col, n_boot=args.boot)  # [boot, policy]
            mean = col.mean(0)
            out = {"n_probes": len(probes), "full": float(mean[0]), ranking: float(mean[1]),
                   "vs_full": float(mean[1] / mean[0]), "vs_full_ci": ci(boot[:, 1] / boot[:, 0])}
            if side == "report":
                out["streaming"] = float(mean[2])
                out["gap_streaming"] = float(mean[1] - mean[2])
                out["gap_streaming_ci"] = ci(boot[:, 1] - boot[:, 2])
                if len(names) > 3:
                    out["random_mean"] = float(mean[3:].mean())
                    out["gap_random"] = float(mean[1] - mean[3:].mean())
                    out["gap_random_ci"] = ci(boot[:, 1] - boot[:, 3:].mean(1))
                    out["random_seeds"] = len(names) - 3
            row[side] = out
        rows.append(row)
        c, p = row["choose"], row["report"]
        print(f"budget {b:g} (share {r['share']:.3f}), window {w}: choose {c[ranking]:.1f}/{c['full']:.1f} "
              f"= {c['vs_full']:.3f} {c['vs_full_ci']}; report {p[ranking]:.1f}/{p['full']:.1f} = "
              f"{p['vs_full']:.3f} {p['vs_full_ci']}, gap to streaming {p['gap_streaming']:.1f} "
              f"{p['gap_streaming_ci']}, to random {p.get('gap_random', float('nan')):.1f} "
              f"{p.get('gap_random_ci')}")
    res = {"boot": args.boot, "ranking": ranking, "rows": rows,
           "choose_scores": {str(r["budget"]): r["choose_scores"] for r in doc["rows"]}}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
