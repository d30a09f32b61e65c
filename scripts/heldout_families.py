"""The score-family table held out (issue 30): heads scored on the choosing split, judged on both.

On the default model (SmolLM2-135M-Instruct, CPU): the copy (the paper's), mass and query score
families are computed on the choosing split (the packaged ``choose`` needles, the stdlib
haystack; one probe per needle at length ``--length``, depths cycled), and each family's top-K
heads are masked (K = 1, 2, 5, 10, 20; random-K with ``--seeds`` seeds) on the choosing probes themselves
(in-sample, as ``scripts/families.py`` does) and on the report split (the ``report`` needles in
a rotated haystack): K to halve NIAH and the area under the curve, with bootstrap intervals over
probes (:meth:`rhlens.families.DamageResult.summary`). Resumable; writes ``--out`` and, with
``--results``, ``families.json`` there.

    python scripts/heldout_families.py --out runs/heldout/families --results scripts/results/heldout
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rhlens.families import DamageResult, FamiliesConfig, FamilySet, damage_sweep, score_families
from rhlens.models import load_model
from rhlens.needlesets import record_split, split_probes
from rhlens.niah import NIAHConfig
from rhlens.results import write_json
from rhlens.retrieval import DetectConfig

DEPTHS = (10.0, 50.0, 90.0)
KS, SEEDS = (1, 2, 5, 10, 20), 2
FAMILIES = ("copy", "mass", "query")
BUDGET, NIAH_BUDGET, CHUNK = 32, 24, 64


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/heldout/families")
    ap.add_argument("--results", default=None)
    ap.add_argument("--length", type=int, default=1000)
    ap.add_argument("--n", type=int, default=12, help="needles (= probes) per split")
    ap.add_argument("--seeds", type=int, default=SEEDS, help="random-K masks per K")
    ap.add_argument("--splits", default="choose,report", help="judge on these splits (in order)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    model, tok = load_model(device="cpu")
    built = {s: split_probes(tok, s, lengths=(args.length,), depths=DEPTHS, n_needles=args.n,
                             max_length=model.cfg.n_ctx) for s in ("choose", "report")}
    path = out / "scores" / "result"
    if path.exists():
        fs = FamilySet.load(path)
    else:
        t = time.perf_counter()
        fs = score_families(model, built["choose"][0], tokenizer=tok, out=out / "scores", needle_set="choose",
                            config=FamiliesConfig(families=FAMILIES, detect=DetectConfig().with_generation(
                                max_new_tokens=BUDGET, prefill_chunk=CHUNK)))
        fs.save(path)
        say(f"scored on the choosing split ({time.perf_counter() - t:.0f} s): "
            + ", ".join(f"{f.family} {f.n_successful}/{f.n_probes}" for f in fs.families))
    record_split(out / "scores", {**built["choose"][1], "used_for": "scoring the heads (every family)"})
    rankings = {f: fs[f] for f in fs.defined()}
    table = []
    for split in args.splits.split(","):
        d = out / f"damage-{split}"
        if (d / "result").exists():
            res = DamageResult.load(d / "result")
        else:
            t = time.perf_counter()
            res = damage_sweep(model, built[split][0], rankings, ks=KS, seeds=args.seeds, tokenizer=tok,
                               needle_set=split, out=d,
                               config=NIAHConfig().with_generation(max_new_tokens=NIAH_BUDGET,
                                                                   prefill_chunk=CHUNK))
            res.save(d / "result")
            say(f"judged on the {split} split ({time.perf_counter() - t:.0f} s)")
        record_split(d, {**built[split][1], "used_for": "judging by masking the heads scored on the "
                         "choosing split" + (" (in-sample)" if split == "choose" else " (held out)")})
        for name, s in res.summary().items():
            table.append({"split": split, "family": name, "unmasked": s["curve"][0],
                          "k_half": s["k_half"], "k_half_ci": s["k_half_ci"], "auc": s["auc"],
                          "auc_ci": s["auc_ci"], "curve": s["curve"], "reached_half": s["reached_half"]})
    say(f"{'split':>7} {'family':>8} {'NIAH':>5} {'K to halve [CI]':>22} {'AUC [CI]':>20}")
    for r in table:
        k = "> 20" if math.isinf(r["k_half"]) else f"{r['k_half']:.1f}"
        say(f"{r['split']:>7} {r['family']:>8} {r['unmasked']:5.1f} {k:>6} "
            f"[{r['k_half_ci'][0]:.1f}, {r['k_half_ci'][1]:.1f}] {r['auc']:8.2f} "
            f"[{r['auc_ci'][0]:.2f}, {r['auc_ci'][1]:.2f}]")
    doc = {"length": args.length, "depths": list(DEPTHS), "ks": list(KS), "seeds": args.seeds,
           "families": list(rankings), "splits": {s: built[s][1] for s in built},
           "top5": {f: [list(h) for h in fs[f].top_heads(5)] for f in rankings}, "rows": table,
           "command": "python scripts/heldout_families.py "
           + " ".join(argv if argv is not None else sys.argv[1:])}
    write_json(out / "families.json", doc)
    if args.results:
        write_json(Path(args.results) / "families.json", doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
