"""Which heads retrieve? Every score family of two models, two needle sets, judged by masking.

For each model (SmolLM2-135M-Instruct, Gemma-3-270M) and each needle set (the four built-in,
literal needles; the same needles asked in other words, ``NONLITERAL_NEEDLES``), on 20
probes (one context length x 5 depths x 4 needles):

1. ``<model>/literal/families``: every family, copy and mass at the model's own answers
   (the paper's setting), query from the question's rows, TransformerLens' detectors;
2. ``<model>/literal/reference`` and ``<model>/nonliteral/reference``: copy, mass (and
   query) with the needle's answer teacher-forced, so both sets are scored on every probe
   (the models rarely answer the non-literal questions);
3. ``<model>/nonliteral/families``: the model's own answers on the non-literal probes (how
   often it answers them: the NIAH baseline there);
4. ``<model>/literal/damage``: NIAH (24-token answers) with each family's top-K heads masked
   (K = 1, 2, 5, 10, 20) against random-K (2 seeds), on 12 of the probes (depths 10, 50, 90:
   the CPU budget); ``<model>/nonliteral/damage`` the same on the non-literal probes, with the
   literal copy heads as one more ranking, when the unmasked NIAH score there is at least 25
   (else there is little retrieval for a mask to break, and the JSON says so).

Writes ``runs/families/<model>/...`` (saved results, resumable logs) and
``runs/families/table.json`` (score family x model x needle set: K to halve NIAH, AUC with
bootstrap intervals, Spearman with the copy score, top-10 overlap with it, top-10 share in
global layers) and ``runs/families/damage.png``. Rerun to resume. On 2 shared CPU cores
this takes about two hours::

    PYTHONPATH=. python scripts/families.py [--models smollm2-135m,gemma-3-270m] [--out runs/families]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from rhlens import load_model
from rhlens.families import (
    NONLITERAL_NEEDLES,
    DamageResult,
    FamiliesConfig,
    FamilySet,
    damage_sweep,
    score_families,
)
from rhlens.niah import NIAHConfig
from rhlens.probes import BUILTIN_NEEDLES, ProbeConfig, build_probes
from rhlens.results import write_json
from rhlens.retrieval import DetectConfig
from rhlens.stats import spearman

LENGTH, DEPTHS = 1000, (10, 30, 50, 70, 90)
JUDGED_DEPTHS = (10, 50, 90)  # the damage sweeps answer these probes only (CPU budget)
KS, SEEDS = (1, 2, 5, 10, 20), 2
JUDGED = ("copy", "mass", "query", "induction")
MIN_BASELINE = 25.0  # unmasked NIAH score below which the damage sweep is skipped
BUDGET, NIAH_BUDGET, CHUNK = 32, 24, 64  # answer tokens (scoring, masked NIAH); prefill chunk


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def families(model, tok, probes, out: Path, name: str, **kw) -> FamilySet:
    path = out / "result"
    if path.exists():
        return FamilySet.load(path)
    t = time.perf_counter()
    fs = score_families(model, probes, tokenizer=tok, out=out, needle_set=name,
                        config=FamiliesConfig(**kw))
    fs.save(path)
    say(f"  {out}: {time.perf_counter() - t:.0f} s, "
        + ", ".join(f"{f.family} {f.n_successful}/{f.n_probes}" for f in fs.families))
    return fs


def damage(model, tok, probes, rankings, out: Path, name: str) -> DamageResult:
    path = out / "result"
    if path.exists():
        return DamageResult.load(path)
    t = time.perf_counter()
    res = damage_sweep(model, probes, rankings, ks=KS, seeds=SEEDS, tokenizer=tok, needle_set=name,
                       config=NIAHConfig().with_generation(max_new_tokens=NIAH_BUDGET, prefill_chunk=CHUNK),
                       out=out)
    res.save(path)
    say(f"  {out}: {time.perf_counter() - t:.0f} s, {len(res.niah.masks)} masks run")
    return res


def rows_for(model_name: str, needle_set: str, fs: FamilySet, ref: FamilySet | None,
             dmg: DamageResult | None, skipped: str | None) -> list[dict]:
    summary = dmg.summary() if dmg is not None else {}
    out = []
    names = [*dict.fromkeys([*(dmg.rankings if dmg else []), *fs.defined()]), "random"]
    for name in names:
        row: dict = {"model": model_name, "needles": needle_set, "family": name}
        if name in summary:
            s = summary[name]
            row.update(k_half=s["k_half"], k_half_ci=s["k_half_ci"], auc=s["auc"], auc_ci=s["auc_ci"],
                       curve=s["curve"], reached_half=s["reached_half"])
        elif skipped:
            row["damage"] = skipped
        src = fs if name in fs.defined() else ref if ref is not None and name in ref.defined() else None
        if src is not None and "copy" in src.defined():
            row["spearman_vs_copy"] = src.spearman(name, "copy")
            row["top10_overlap_vs_copy"] = src.top_overlap(name, "copy", 10)
            share = src.layer_share(name, 10)
            if share is not None:
                row["top10_global_share"] = share["global"]
                row["global_layer_share"] = share["global_layers"]
            row["scored_with"] = getattr(src.config, "answers", "model") + " answers"
            row["top5"] = [list(h) for h in src[name].top_heads(5)]
        out.append(row)
    return out


def run_model(model_name: str, root: Path) -> list[dict]:
    say(f"{model_name}: loading")
    model, tok = load_model(model_name)
    base = root / model_name
    detect = DetectConfig().with_generation(max_new_tokens=BUDGET, batch_size=len(DEPTHS),
                                            prefill_chunk=CHUNK)
    grid = ProbeConfig(lengths=(LENGTH,), depths=DEPTHS)
    lit = build_probes(tok, config=grid, needles=list(BUILTIN_NEEDLES))
    nl = build_probes(tok, config=grid, needles=list(NONLITERAL_NEEDLES))
    say(f"{model_name}: {len(lit)} + {len(nl)} probes of {lit[0].n_tokens} tokens")

    fs_lit = families(model, tok, lit, base / "literal" / "families", "literal", detect=detect)
    ref_lit = families(model, tok, lit, base / "literal" / "reference", "literal", detect=detect,
                       answers="reference", families=("copy", "copy-paper", "mass", "query"))
    ref_nl = families(model, tok, nl, base / "nonliteral" / "reference", "nonliteral", detect=detect,
                      answers="reference", families=("copy", "copy-paper", "mass", "query"))
    fs_nl = families(model, tok, nl, base / "nonliteral" / "families", "nonliteral", detect=detect,
                     families=("copy", "mass"))
    rows = []
    judged = lambda probes: [p for p in probes if p.depth in JUDGED_DEPTHS]  # noqa: E731
    dmg_lit = damage(model, tok, judged(lit), {f: fs_lit[f] for f in JUDGED if f in fs_lit.defined()},
                     base / "literal" / "damage", "literal")
    rows += rows_for(model_name, "literal", fs_lit, ref_lit, dmg_lit, None)
    rows += rows_for(model_name, "literal (reference answers)", ref_lit, None, None, "see literal")

    nl_judged = [p for p in fs_nl["copy"].probes if p["depth"] in JUDGED_DEPTHS]
    baseline = 100 * sum(p["rouge_recall"] for p in nl_judged) / len(nl_judged)
    say(f"{model_name}: unmasked NIAH on the non-literal probes {baseline:.1f}")
    dmg_nl, skipped = None, None
    if baseline >= MIN_BASELINE:
        rankings = ({f: ref_nl[f] for f in ("copy", "mass", "query")} |
            {"induction": fs_lit["induction"], "copy-literal": fs_lit["copy"]})
        dmg_nl = damage(model, tok, judged(nl), rankings, base / "nonliteral" / "damage", "nonliteral")
    else:
        skipped = f"not run: unmasked NIAH {baseline:.1f} < {MIN_BASELINE:g}"
    rows += rows_for(model_name, "nonliteral (reference answers)", ref_nl, None, dmg_nl, skipped)
    for r in rows:
        if r["needles"].startswith("nonliteral"):
            r["unmasked_niah"] = baseline
            r["answered"] = f"{fs_nl['copy'].n_successful}/{fs_nl['copy'].n_probes}"
    # Copy heads scored on literal probes vs on non-literal ones (both reference answers).
    lit_nl = {f: spearman(ref_lit[f].mean.flatten(), ref_nl[f].mean.flatten())
              for f in ("copy", "mass", "query")}
    write_json(base / "summary.json", {"model": model_name, "rows": rows,
                                       "literal_vs_nonliteral_spearman": lit_nl,
                                       "layer_types": fs_lit.layer_types})
    del model
    return rows


def main() -> None:
    global LENGTH, DEPTHS, JUDGED_DEPTHS, KS, SEEDS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2-135m,gemma-3-270m")
    ap.add_argument("--out", default="runs/families")
    ap.add_argument("--length", type=int, default=LENGTH, help="a smaller grid, for a quick check")
    ap.add_argument("--depths", default=",".join(map(str, DEPTHS)))
    ap.add_argument("--judged-depths", default=",".join(map(str, JUDGED_DEPTHS)))
    ap.add_argument("--ks", default=",".join(map(str, KS)))
    ap.add_argument("--seeds", type=int, default=SEEDS)
    args = ap.parse_args()
    LENGTH, SEEDS = args.length, args.seeds
    DEPTHS = tuple(int(x) for x in args.depths.split(","))
    JUDGED_DEPTHS = tuple(int(x) for x in args.judged_depths.split(","))
    KS = tuple(int(x) for x in args.ks.split(","))
    torch.set_num_threads(1)
    root = Path(args.out)
    rows = []
    for name in args.models.split(","):
        rows += run_model(name, root)
    write_json(root / "table.json", rows)
    from rhlens.plotting import plot_damage_curves
    from rhlens.runs import save_figure

    damages = [DamageResult.load(p / "result") for name in args.models.split(",")
               for p in (root / name / "literal" / "damage", root / name / "nonliteral" / "damage")
               if (p / "result").exists()]
    if damages:
        save_figure(plot_damage_curves(damages), root / "damage.png")
    for r in rows:
        k = r.get("k_half")
        say(f"{r['model']:>14} {r['needles']:>30} {r['family']:>15}  "
            f"K/2 {('>20' if k is not None and math.isinf(k) else k)!s:>6}  "
            f"AUC {r.get('auc', float('nan')):.2f}  rho {r.get('spearman_vs_copy', float('nan')):.2f}  "
            f"top10 {r.get('top10_overlap_vs_copy', float('nan')):.1f}")


if __name__ == "__main__":
    main()
