"""Every rhlens analysis of one model through the CLI: detection, masking, patching, CoT, properties, report.

Run for Gemma-3-270M next to the default model; small grids sized for 2 shared CPU cores
(about 20 minutes a model). Each step is the ``rhlens`` command a user would type, so the
folders resume when rerun. Writes ``<out>/<model>/{detect,sweep,patch,cot}``, the report
``<out>/<model>/report.html`` (with the score-families runs of ``scripts/families.py`` when
they are there) and ``<out>/<model>/every.json``: the headline numbers, and where the top
retrieval heads sit in sliding-window vs global layers::

    PYTHONPATH=. python scripts/families_every.py --model gemma-3-270m [--out runs/every]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rhlens.cli import main as rhlens
from rhlens.results import read_json, write_json


def run(*argv: str) -> None:
    t = time.perf_counter()
    print(f"[{time.strftime('%H:%M:%S')}] rhlens {' '.join(argv)}", flush=True)
    code = rhlens(list(argv))
    if code:
        raise SystemExit(f"rhlens {argv[0]} failed with exit code {code}")
    print(f"  ({time.perf_counter() - t:.0f} s)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--out", default="runs/every")
    ap.add_argument("--families", default="runs/families",
                    help="the output of scripts/families.py, added to the report when present")
    args = ap.parse_args()
    base = Path(args.out) / args.model
    m = ["--model", args.model, "--quiet"]
    grid = ["--lengths", "1000", "--depths", "10,30,50,70,90", "--max-new-tokens", "32"]
    run("detect", *m, *grid, "--prefill-chunk", "64", "--out", str(base / "detect"))
    run("mask-sweep", *m, "--scores", str(base / "detect"), "--lengths", "1000", "--depths", "50",
        "--ks", "0,5,20", "--seeds", "1", "--max-new-tokens", "24", "--out", str(base / "sweep"))
    run("patch", *m, "--scores", str(base / "detect"), "--lengths", "700", "--depths", "50",
        "--n-needles", "2", "--out", str(base / "patch"))
    run("cot", *m, "--task", "arithmetic", "--scores", str(base / "detect"), "--k", "5", "--seeds", "1",
        "--n-items", "6", "--max-new-tokens-cot", "80", "--out", str(base / "cot"))

    from rhlens.families import FamilySet
    from rhlens.niah import MaskSweepResult
    from rhlens.patching import PatchingVsRetrieval
    from rhlens.scores import RetrievalScores

    scores = RetrievalScores.load(base / "detect" / "scores")
    families = Path(args.families) / args.model / "literal" / "families"
    kinds = FamilySet.load(families / "result").layer_types if (families / "result").exists() else None
    top = scores.top(10)
    summary = {"model": args.model, "successful_probes": f"{scores.n_successful}/{scores.n_probes}",
               "top10": [[la, h, round(s, 3)] for la, h, s in top],
               "fraction_above_0.1": scores.fraction_above(0.1),
               "detect_summary": read_json(base / "detect" / "summary.json")}
    if kinds:
        summary["layer_types"] = kinds
        summary["top10_in_global_layers"] = sum(kinds[la] == "global" for la, _, _ in top) / len(top)
        summary["global_layer_share"] = kinds.count("global") / len(kinds)
        above = scores.retrieval_heads(0.1)
        summary["heads_above_0.1_in_global_layers"] = \
            f"{sum(kinds[la] == 'global' for la, _ in above)}/{len(above)}"
    sweep = MaskSweepResult.load(base / "sweep" / "mask_sweep")
    summary["mask_sweep"] = sweep.curve()
    cmp = PatchingVsRetrieval.load(base / "patch" / "patching_vs_retrieval")
    summary["patching_vs_retrieval"] = {"spearman": cmp.spearman, "pearson": cmp.pearson}
    from rhlens.cot.experiment import CoTResult

    cot = CoTResult.load(base / "cot" / "cot" / "arithmetic")
    summary["cot"] = cot.table()
    write_json(base / "every.json", summary)
    dirs = [str(base / d) for d in ("detect", "sweep", "patch", "cot")]
    dirs += [str(p) for p in sorted((Path(args.families) / args.model).glob("*literal")) if p.is_dir()]
    run("report", *dirs, "--out", str(base / "report.html"))


if __name__ == "__main__":
    main()
