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

from rhlens.stats import paired_gaps


def load_scores(sweep: Path) -> dict[str, dict[str, float]]:
    """policy -> probe -> NIAH score, from a sweep folder's ``compress.jsonl``."""
    scores: dict[str, dict[str, float]] = defaultdict(dict)
    for line in (sweep / "compress.jsonl").read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            if "score" in r:
                scores[r["mask"]][r["probe"]] = float(r["score"])
    return scores


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep", help="a folder holding compress.jsonl")
    ap.add_argument("--boot", type=int, default=2000)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    scores = load_scores(Path(args.sweep))
    probes = sorted(scores["full"])
    names = sorted(m for m, s in scores.items() if set(s) >= set(probes))
    table = torch.tensor([[scores[m][p] for m in names] for p in probes], dtype=torch.float64)
    at = {m: i for i, m in enumerate(names)}
    budgets = sorted({m.split("@")[1] for m in names if "@" in m}, key=float)
    rows = []
    for b in budgets:
        rnd = [at[m] for m in names if m.startswith("random") and m.endswith(f"@{b}")]
        for policy in ("retrieval", "needle-mass"):
            m = f"{policy}@{b}"
            if m not in at:
                continue
            gaps = paired_gaps(table, at[m], full=at["full"], streaming=at.get(f"streaming@{b}"),
                               random=rnd, n_boot=args.boot)
            row = {"budget": float(b), "policy": policy, "score": gaps["score"],
                   "vs_full": gaps["vs_full"], "vs_full_ci": gaps["vs_full_ci"]}
            for key in ("gap_streaming_ci", "gap_random_ci"):
                if key in gaps:
                    row[key] = gaps[key]
            rows.append(row)
            print(f"{b:>5} {policy:>12} {row['score']:5.1f}  x full {row['vs_full']:.3f} "
                  f"[{row['vs_full_ci'][0]:.3f}, {row['vs_full_ci'][1]:.3f}]  "
                  f"gap to streaming {row.get('gap_streaming_ci')}  gap to random {row.get('gap_random_ci')}")
    out = {"probes": len(probes), "full": float(table[:, at["full"]].mean()), "boot": args.boot, "rows": rows}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
