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
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compress_ci import load_scores as load  # this folder: the one reader of compress.jsonl

from rhlens.stats import paired_gaps


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
            gaps = paired_gaps(col, 1, full=0, streaming=2 if side == "report" else None,
                               random=range(3, len(names)), n_boot=args.boot)
            out = {"n_probes": len(probes), "full": gaps["full"], ranking: gaps["score"],
                   "vs_full": gaps["vs_full"], "vs_full_ci": gaps["vs_full_ci"]}
            if side == "report":
                out.update({k: v for k, v in gaps.items()
                            if k.startswith(("streaming", "gap_", "random_"))})
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
