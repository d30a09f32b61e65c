"""The KV-compression claim with a held-out split (issue 30): choose on one set of probes, report on another.

The ranking is the retrieval scores of ``scripts/compress_default.py --stage detect`` (the 4
built-in needles at 500-2,000 tokens; none of the needles below). The free setting is the other
KV heads' window, which at a fixed budget is also the budget's split between whole heads and
windows (a longer window buys fewer whole heads). Per budget:

1. ``choose``: every candidate window on the choosing split (the packaged needles of split
   ``choose``, the ordinary stdlib haystack): retrieval heads kept whole, and the full cache;
   the window with the best mean NIAH score is chosen (:func:`rhlens.needlesets.choose_then_report`);
2. ``report``: the chosen window only, on the report split (the ``report`` needles in a rotated
   haystack), with StreamingLLM, random heads and the full cache; paired bootstrap intervals
   over its probes (``scripts/compress_ci.py``).

``--stage sanity`` answers every packaged needle once at a short length (full cache) and lists
those the model misses. Each stage resumes (rerun the same command).

    python scripts/heldout_compress.py --out runs/heldout --stage sanity
    python scripts/heldout_compress.py --out runs/heldout --results scripts/results/heldout
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from compress_default import CHUNK, MAX_NEW, stage_detect

from rhlens.ablation import Mask
from rhlens.compress import CacheLayout, CompressConfig
from rhlens.compress.heldout import heldout_compress
from rhlens.compress.policy import full_heads_for_budget
from rhlens.engine import KernelPolicy
from rhlens.errors import ConfigError
from rhlens.models import load_model
from rhlens.needlesets import needle_table, packaged_needles, record_split, split_probes
from rhlens.niah import NIAHConfig, niah_sweep
from rhlens.results import write_json

DEPTHS = (10.0, 30.0, 50.0, 70.0, 90.0)


def say(msg: str) -> None:
    print(msg, flush=True)


def stage_sanity(model, tok, out: Path, length: int) -> dict:
    rows = {}
    for split in ("choose", "report"):
        probes, rec = split_probes(tok, split, lengths=(length,), depths=(50.0,),
                                   needles=packaged_needles(split))
        res = niah_sweep(model, probes, masks=[Mask.none()], tokenizer=tok, out=out / "sanity" / split,
                         config=NIAHConfig().with_generation(max_new_tokens=MAX_NEW, prefill_chunk=CHUNK))
        record_split(out / "sanity" / split, {**rec, "used_for": "sanity: does the model answer"})
        for r in res.for_mask("none"):
            rows[r["needle_id"] if "needle_id" in r else r["probe"]] = {
                "split": split, "score": r["score"], "response": r["response"]}
    missed = sorted(k for k, v in rows.items() if v["score"] < 50)
    doc = {"length": length, "depth": 50.0, "n": len(rows),
           "mean": float(np.mean([v["score"] for v in rows.values()])), "missed": missed, "rows": rows}
    write_json(out / "sanity" / "sanity.json", doc)
    say(f"sanity at {length}: mean {doc['mean']:.1f} over {len(rows)} needles; missed (< 50): "
        f"{', '.join(missed) or 'none'}")
    return doc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/heldout")
    ap.add_argument("--results", default=None, help="copy the tables here (scripts/results/heldout)")
    ap.add_argument("--stage", choices=("all", "sanity"), default="all")
    ap.add_argument("--length", type=int, default=2560)
    ap.add_argument("--sanity-length", type=int, default=1000)
    ap.add_argument("--budgets", default="0.3,0.5")
    ap.add_argument("--windows", default="28,124,252,508")
    ap.add_argument("--n-choose", type=int, default=20, help="needles (= probes) of the choosing split")
    ap.add_argument("--n-report", type=int, default=20, help="needles (= probes) of the report split")
    ap.add_argument("--seeds", type=int, default=2, help="random-head policies on the report split")
    ap.add_argument("--sink", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    model, tok = load_model(device="cpu")
    if args.stage == "sanity":
        stage_sanity(model, tok, out, args.sanity_length)
        return 0
    scores = stage_detect(model, tok, out)
    budgets = [float(x) for x in args.budgets.split(",")]
    windows = [int(x) for x in args.windows.split(",")]
    layout = CacheLayout.of(model)
    built = {}
    for split, n in (("choose", args.n_choose), ("report", args.n_report)):
        built[split] = split_probes(tok, split, lengths=(args.length,), depths=DEPTHS, n_needles=n,
                                    max_length=model.cfg.n_ctx)
    context = max(p.n_tokens for p in built["choose"][0])
    for b in budgets:
        for w in windows:
            try:
                full_heads_for_budget(layout, context, b, args.sink, w)
            except ConfigError as exc:
                raise SystemExit(f"budget {b} with window {w}: {exc}") from None

    t = time.perf_counter()
    doc = heldout_compress(model, built["choose"][0], built["report"][0], {"retrieval": scores},
                           budgets=budgets, windows=windows, seeds=args.seeds,
                           config=CompressConfig(sink=args.sink), out=out / "compress",
                           splits={s: built[s][1] for s in built}, tokenizer=tok,
                           niah=NIAHConfig().with_generation(max_new_tokens=MAX_NEW, prefill_chunk=CHUNK),
                           kernel_policy=KernelPolicy(rows="batch"), progress=True)
    say(f"held-out sweep ({time.perf_counter() - t:.0f} s this run)")
    for r in doc["rows"]:
        c, p = r["choose"], r["report"]
        say(f"budget {r['budget']:g} (share {r['share']:.3f}, {r['full_kv_heads']}/{r['of_kv_heads']} "
            f"KV heads whole): window {r['window']} chosen ("
            + ", ".join(f"{w}: {v:.1f}" for w, v in r["choose_scores"]) + ")")
        say(f"   choose: retrieval {c['retrieval']:.1f} / full {c['full']:.1f} = {c['vs_full']:.3f}; "
            f"report: retrieval {p['retrieval']:.1f} / full {p['full']:.1f} = {p['vs_full']:.3f}, "
            f"streaming {p['streaming']:.1f}, random {p['random_mean']:.1f} +- {p['random_std']:.1f}")
    doc.update({"length": args.length, "command": "python scripts/heldout_compress.py "
                + " ".join(argv if argv is not None else sys.argv[1:])})
    write_json(out / "heldout_compress.json", doc)
    if args.results:
        res_dir = Path(args.results)
        write_json(res_dir / "compress.json", doc)
        write_json(res_dir / "needles.json", {"rows": needle_table()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
