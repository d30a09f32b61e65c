"""Every rhlens analysis of a model on top of scripts/families.py: detection, masking, patching, CoT, report.

Detection and masking come from the families run (its ``copy`` family is the paper's
detection on 20 probes; its damage sweep is the masking sweep, top-K against random-K): the
copy scores are written as a detection run (``rhlens.runs.save_detection_run``: scores, paper
JSON, properties, figures). Patching and CoT vs direct run through the ``rhlens`` command a
user would type (small grids for 2 shared CPU cores, resumable). Writes
``<out>/<model>/{detect,patch,cot}``, ``<out>/<model>/report.html`` (every run of the model,
the families included) and ``<out>/<model>/every.json``: the headline numbers, and where the
top retrieval heads sit in sliding-window vs global layers::

    PYTHONPATH=. python scripts/families_every.py --model gemma-3-270m [--families runs/families]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rhlens.cli import main as rhlens
from rhlens.results import write_json


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
    ap.add_argument("--families", default="runs/families", help="the output of scripts/families.py")
    args = ap.parse_args()
    from rhlens.cot.experiment import CoTResult
    from rhlens.families import DamageResult, FamilySet
    from rhlens.patching import PatchingVsRetrieval
    from rhlens.runs import save_detection_run
    from rhlens.scores import RetrievalScores

    base, fam = Path(args.out) / args.model, Path(args.families) / args.model / "literal"
    fs = FamilySet.load(fam / "families" / "result")
    copy = fs["copy"]
    scores = RetrievalScores(per_probe=copy.per_probe, success=copy.success, model_name=copy.model_name,
                             n_kv_heads=copy.n_kv_heads, probes=copy.probes, config=fs.config.detect)
    save_detection_run(base / "detect", scores)
    m = ["--model", args.model, "--quiet"]
    run("patch", *m, "--scores", str(base / "detect"), "--lengths", "700", "--depths", "50",
        "--n-needles", "2", "--out", str(base / "patch"))
    run("cot", *m, "--task", "arithmetic", "--scores", str(base / "detect"), "--k", "5", "--seeds", "1",
        "--n-items", "6", "--max-new-tokens-cot", "80", "--out", str(base / "cot"))

    kinds = fs.layer_types
    top = scores.top(10)
    summary = {"model": args.model, "successful_probes": f"{scores.n_successful}/{scores.n_probes}",
               "top10": [[la, h, round(s, 3)] for la, h, s in top],
               "fraction_above_0.1": scores.fraction_above(0.1)}
    if kinds:
        above = scores.retrieval_heads(0.1)
        summary.update(layer_types=kinds, global_layer_share=kinds.count("global") / len(kinds),
                       top10_in_global_layers=sum(kinds[la] == "global" for la, _, _ in top) / len(top),
                       heads_above_01_in_global_layers=f"{sum(kinds[la] == 'global' for la, _ in above)}"
                                                       f"/{len(above)}")
    damage = DamageResult.load(fam / "damage" / "result")
    summary["masking"] = {name: {"k_half": s["k_half"], "auc": s["auc"], "curve": s["curve"]}
                          for name, s in damage.summary().items() if name in ("copy", "random")}
    cmp = PatchingVsRetrieval.load(base / "patch" / "patching_vs_retrieval")
    summary["patching_vs_retrieval"] = {"spearman": cmp.spearman, "pearson": cmp.pearson}
    summary["cot"] = CoTResult.load(base / "cot" / "cot" / "arithmetic").table()
    write_json(base / "every.json", summary)
    dirs = [str(base / d) for d in ("detect", "patch", "cot")]
    dirs += [str(p) for p in sorted((Path(args.families) / args.model).glob("*literal")) if p.is_dir()]
    run("report", *dirs, "--out", str(base / "report.html"))


if __name__ == "__main__":
    main()
