"""Paired bootstrap intervals for a KV-compression sweep (issue 17, target 1): how sure is a budget's verdict?

Reads a sweep's ``compress.jsonl`` (``rhlens compress`` / ``scripts/compress_default.py``) and, for
every policy at every budget, resamples the probes (the same resample for every policy: paired)
and prints the policy's mean NIAH score, its share of the full cache's score with a 95% interval,
and its gap to StreamingLLM and to random heads (mean over seeds) with 95% intervals.

    python scripts/compress_ci.py runs/compress-w252-curve/sweep \
        --out scripts/results/compress-default/window-252/ci.json
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep", help="a folder holding compress.jsonl")
    ap.add_argument("--boot", type=int, default=2000)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    scores: dict[str, dict[str, float]] = defaultdict(dict)  # mask -> probe -> score
    for line in (Path(args.sweep) / "compress.jsonl").read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            if "score" in r:
                scores[r["mask"]][r["probe"]] = float(r["score"])
    probes = sorted(scores["full"])
    col = {m: torch.tensor([s[p] for p in probes], dtype=torch.float64) for m, s in scores.items()
           if set(s) >= set(probes)}
    names = sorted(col)
    boot = bootstrap_means(torch.stack([col[m] for m in names], dim=1), n_boot=args.boot)  # [boot, policy]
    at = {m: i for i, m in enumerate(names)}
    full = boot[:, at["full"]]
    budgets = sorted({m.split("@")[1] for m in names if "@" in m}, key=float)
    rows = []
    for b in budgets:
        rnd = [m for m in names if m.startswith("random") and m.endswith(f"@{b}")]
        rnd_boot = boot[:, [at[m] for m in rnd]].mean(1) if rnd else None
        for policy in ("retrieval", "needle-mass"):
            m = f"{policy}@{b}"
            if m not in at:
                continue
            x = boot[:, at[m]]
            row = {"budget": float(b), "policy": policy, "score": float(col[m].mean()),
                   "vs_full": float(col[m].mean() / col["full"].mean()),
                   "vs_full_ci": ci(x / full)}
            if f"streaming@{b}" in at:
                row["gap_streaming_ci"] = ci(x - boot[:, at[f"streaming@{b}"]])
            if rnd_boot is not None:
                row["gap_random_ci"] = ci(x - rnd_boot)
            rows.append(row)
            print(f"{b:>5} {policy:>12} {row['score']:5.1f}  x full {row['vs_full']:.3f} "
                  f"[{row['vs_full_ci'][0]:.3f}, {row['vs_full_ci'][1]:.3f}]  "
                  f"gap to streaming {row.get('gap_streaming_ci')}  gap to random {row.get('gap_random_ci')}")
    out = {"probes": len(probes), "full": float(col["full"].mean()), "boot": args.boot, "rows": rows}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
