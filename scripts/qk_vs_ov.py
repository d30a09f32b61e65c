"""How do the top retrieval heads retrieve? Their query/key side (where they look) against their
value/output side (what they move), measured by patching on swap pairs.

1. Retrieval scores: ``--scores DIR`` (a detection run), or a small detection run into
   ``--detect-out`` (resumes): lengths 500 and 1000, depths 0, 50, 100, the first 2 built-in
   needles, 32 new tokens.
2. The top ``--k`` heads by mean retrieval score (:func:`rhlens.stats.top_k_heads`).
3. Swap pairs (:func:`rhlens.patching.make_pairs`, ``kind="swap"``): the clean prompt holds the
   needle's answer, the corrupted one another answer of the same token length at the same place.
4. For each head, denoising (clean into corrupted) at every position, one activation at a time:

   ========== =====================================================================
   ``z``      the whole head (its output before W_O)
   ``q+k``    query/key side: its queries and the keys of its KV head
   ``pattern`` query/key side, this head alone: its attention pattern
   ``v``      value side: the values of its KV head (shared by its GQA group: the
              other query heads of the group read them too)
   ``ov``     value/output side, this head alone: its own pattern times clean values
   ========== =====================================================================

   Effects are normalised per pair: (patched - corrupted) / (clean - corrupted) of the
   logit difference between the clean and the corrupted answer's first differing token.

Prints a table (mean, std, min and max over pairs) and writes ``OUT/qk_vs_ov.json``; each
activation's per-pair log sits in ``OUT/<activation>/`` so a rerun resumes.

    .venv/bin/python scripts/qk_vs_ov.py --out runs/qk_vs_ov
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from rhlens.models import load_model
from rhlens.patching import PatchConfig, make_pairs, patch_heads
from rhlens.probes import BUILTIN_NEEDLES, ProbeConfig, build_probes
from rhlens.results import write_json
from rhlens.retrieval import DetectConfig, detect_retrieval_heads
from rhlens.scores import RetrievalScores
from rhlens.stats import top_k_heads

ACTIVATIONS = ("z", "q+k", "pattern", "v", "ov")
SIDE = {"z": "whole head", "q+k": "QK (q + KV-group k)", "pattern": "QK (own pattern)",
        "v": "OV (KV-group v)", "ov": "OV (own pattern x clean v)"}


def ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def spread(values: torch.Tensor) -> dict[str, float]:
    v = values[torch.isfinite(values)].double()
    if not len(v):
        return {"mean": math.nan, "std": math.nan, "min": math.nan, "max": math.nan, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std()) if len(v) > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max()), "n": len(v)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="default: the packaged SmolLM2-135M-Instruct")
    ap.add_argument("--scores", default=None, help="retrieval scores (run dir or paper JSON); "
                                                   "default: run a small detection")
    ap.add_argument("--detect-out", default="runs/detect", help="where the small detection runs")
    ap.add_argument("--k", type=int, default=3, help="top retrieval heads to split (default 3)")
    ap.add_argument("--lengths", type=ints, default=(500,), help="pair lengths (default 500)")
    ap.add_argument("--depths", type=floats, default=(25.0, 50.0, 75.0),
                    help="needle depths of the pairs (default 25,50,75)")
    ap.add_argument("--answer-buffer", type=int, default=100)
    ap.add_argument("--direction", choices=("denoise", "noise"), default="denoise")
    ap.add_argument("--threads", type=int, default=None, help="torch threads")
    ap.add_argument("--out", default="runs/qk_vs_ov", help="output directory")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)

    t0 = time.perf_counter()
    model, tok = load_model(args.model)
    n_ctx = getattr(model.cfg, "n_ctx", None)
    if args.scores:
        scores = RetrievalScores.from_any(args.scores)
    else:
        probes = build_probes(tok, config=ProbeConfig(lengths=(500, 1000), depths=(0, 50, 100)),
                              needles=list(BUILTIN_NEEDLES)[:2], max_length=n_ctx)
        scores = detect_retrieval_heads(model, probes, out=args.detect_out,
                                        config=DetectConfig().with_generation(max_new_tokens=32))
    heads = top_k_heads(scores.mean, args.k)
    print(f"{scores}\ntop {args.k} retrieval heads: "
          + ", ".join(f"L{la}H{h} ({float(scores.mean[la, h]):.2f})" for la, h in heads))

    probes = build_probes(tok, config=ProbeConfig(lengths=args.lengths, depths=args.depths,
                                                  answer_buffer=args.answer_buffer), max_length=n_ctx)
    pairs = make_pairs(tok, probes, kind="swap")
    print(f"{len(pairs)} swap pairs of {min(p.n_tokens for p in pairs)}-"
          f"{max(p.n_tokens for p in pairs)} tokens")

    # v alone is indexed by KV head (as in TransformerLens): the group a query head reads
    group = int(model.cfg.n_heads) // int(getattr(model.cfg, "n_key_value_heads", None) or model.cfg.n_heads)
    cell = {a: {(la, h): (la, h // group if a == "v" else h) for la, h in heads} for a in ACTIVATIONS}
    configs = {a: PatchConfig(activation=a, heads=sorted(set(cell[a].values())), positions="all",
                              direction=args.direction) for a in ACTIVATIONS}
    results = {}
    for activation, config in configs.items():
        t = time.perf_counter()
        results[activation] = patch_heads(model, pairs, config=config, out=out / activation)
        print(f"  {activation:>8}: {time.perf_counter() - t:6.1f} s")

    first = results["z"]
    rows_pairs = []
    print(f"\nclean vs corrupted logit difference per pair ({args.direction}):")
    for i, (rec, c, r) in enumerate(zip(first.pairs, first.clean.tolist(), first.corrupted.tolist())):
        rows_pairs.append({"key": rec.get("key"), "clean_answer": rec.get("clean_answer"),
                           "corrupted_answer": rec.get("corrupted_answer"), "clean": c, "corrupted": r})
        print(f"  [{i:2}] {rec.get('key')}: clean {c:6.2f}  corrupted {r:6.2f}  "
              f"({rec.get('clean_answer')!r} -> {rec.get('corrupted_answer')!r})")

    table = []
    print(f"\nnormalised {args.direction} effect per head, mean ± std over pairs [min, max]:")
    print(f"{'head':>7} {'score':>6} " + " ".join(f"{a:>22}" for a in ACTIVATIONS))
    for la, h in heads:
        row = {"layer": la, "head": h, "retrieval_score": float(scores.mean[la, h]), "effects": {}}
        cells = []
        for activation in ACTIVATIONS:
            values = results[activation].effects[(slice(None), *cell[activation][la, h])]
            s = spread(values)
            row["effects"][activation] = {**s, "per_pair": [
                None if not math.isfinite(x) else x for x in values.tolist()]}
            cells.append(f"{s['mean']:6.3f}±{s['std']:.3f} [{s['min']:5.2f},{s['max']:5.2f}]")
        table.append(row)
        print(f"  L{la:>2}H{h} {row['retrieval_score']:6.2f} " + " ".join(f"{c:>22}" for c in cells))

    summary = {"model": first.model_name, "direction": args.direction, "positions": "all",
               "metric": "logit_diff", "activations": {a: SIDE[a] for a in ACTIVATIONS},
               "heads": table, "pairs": rows_pairs,
               "scores": {"source": args.scores or str(args.detect_out),
                          "successful_probes": scores.n_successful, "probes": scores.n_probes},
               "seconds": round(time.perf_counter() - t0, 1)}
    write_json(out / "qk_vs_ov.json", summary)
    print(f"\nwrote {out / 'qk_vs_ov.json'} ({summary['seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
