"""Head patching on the default model: which heads carry the needle, and how good is the fast mode.

Builds clean/corrupted pairs from short NIAH probes (the built-in needles, their answer swapped
for another of the same token length), then measures

* exact patching (denoise and noise) at the answer positions: the top heads, time per pair;
* attribution patching at the answer positions and at every position, against exact patching
  (Spearman over heads, sign agreement, top-10 overlap), time per pair;
* exact patching at every position on the first ``--all-pairs`` pairs (slow on CPU);
* with ``--scores``: Spearman/Pearson of the patching effect with the retrieval score, and the
  heads where they disagree.

    .venv/bin/python scripts/patching_demo.py --scores runs/detect --out runs/patching_demo
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from rhlens.models import load_model
from rhlens.patching import (
    PatchConfig,
    compare_patching,
    make_pairs,
    patch_heads,
    patching_vs_retrieval,
)
from rhlens.probes import BUILTIN_NEEDLES, ProbeConfig, build_probes
from rhlens.scores import RetrievalScores


def ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def heads(result, k: int = 10) -> str:
    return ", ".join(f"L{la}H{h} {e:.3f}" for la, h, e in result.top(k))


def per_pair(result) -> float:
    return sum(result.seconds) / max(1, len(result.seconds))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--lengths", type=ints, default=(500,), help="probe lengths (default 500)")
    ap.add_argument("--depths", type=floats, default=(50.0,), help="needle depths (default 50)")
    ap.add_argument("--answer-buffer", type=int, default=100)
    ap.add_argument("--n-needles", type=int, default=4)
    ap.add_argument("--all-pairs", type=int, default=1,
                    help="pairs to patch exactly at every position (slow on CPU; 0 skips)")
    ap.add_argument("--scores", default=None, help="retrieval scores (run dir or paper JSON)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads")
    ap.add_argument("--out", default=None, help="save results, figures and summary.json here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    t = time.perf_counter()
    model, tok = load_model(args.model)
    print(f"model {model.cfg.n_layers}x{model.cfg.n_heads} loaded in {time.perf_counter() - t:.1f} s, "
          f"{torch.get_num_threads()} threads")
    probes = build_probes(tok, config=ProbeConfig(lengths=args.lengths, depths=args.depths,
                                                  answer_buffer=args.answer_buffer),
                          needles=list(BUILTIN_NEEDLES)[: args.n_needles])
    pairs = make_pairs(tok, probes)
    print(f"{len(pairs)} pairs of {min(p.n_tokens for p in pairs)}-{max(p.n_tokens for p in pairs)} tokens")
    for p in pairs:
        print(f"  {p.labels['key']}: {p.labels['clean_answer']!r} -> {p.labels['corrupted_answer']!r}; "
              f"first differing token {tok.decode([p.clean_token])!r} vs {tok.decode([p.corrupted_token])!r}")

    runs = {}
    summary: dict = {"pairs": [p.labels for p in pairs], "threads": torch.get_num_threads()}

    def run(name: str, config: PatchConfig, subset=None):
        chosen = pairs if subset is None else [pairs[i] for i in subset]
        result = patch_heads(model, chosen, config=config)
        runs[name] = result
        print(f"\n[{name}] {per_pair(result):.1f} s/pair over {len(chosen)} pairs; "
              f"clean {result.clean.mean():.2f}, corrupted {result.corrupted.mean():.2f} "
              f"({config.metric})\n  top-10: {heads(result)}")
        summary[name] = {"seconds_per_pair": per_pair(result), "top10": result.top(10),
                         "clean_mean": float(result.clean.mean()),
                         "corrupted_mean": float(result.corrupted.mean())}
        return result

    exact = run("exact-answer-denoise", PatchConfig(positions="answer"))
    run("exact-answer-noise", PatchConfig(positions="answer", direction="noise"))
    attr = run("attribution-answer-denoise", PatchConfig(mode="attribution", positions="answer"))
    attr_all = run("attribution-all-denoise", PatchConfig(mode="attribution", positions="all"))
    agreement = {"answer": compare_patching(exact, attr)}
    if args.all_pairs > 0:
        subset = list(range(min(args.all_pairs, len(pairs))))
        exact_all = run("exact-all-denoise", PatchConfig(positions="all"), subset)
        agreement["all"] = compare_patching(exact_all, attr_all.subset(subset))
        agreement["all_vs_answer_exact"] = compare_patching(exact_all, exact.subset(subset))
    summary["agreement"] = agreement
    print("\nexact vs attribution:")
    for name, stats in agreement.items():
        print(f"  {name}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                        for k, v in stats.items()))

    if args.scores:
        scores = RetrievalScores.from_any(args.scores)
        summary["retrieval"] = {}
        print(f"\nretrieval scores: {scores}")
        for name in ("exact-answer-denoise", "exact-answer-noise", "attribution-all-denoise"):
            cmp = patching_vs_retrieval(runs[name], scores)
            summary["retrieval"][name] = {
                "spearman": cmp.spearman, "pearson": cmp.pearson,
                "causal_not_retrieval": cmp.causal_not_retrieval[:10],
                "retrieval_not_causal": cmp.retrieval_not_causal[:10], "both": cmp.both[:10]}
            print(f"  [{name}] Spearman {cmp.spearman:.3f}, Pearson {cmp.pearson:.3f}")
            for title, rows in (("causal, low retrieval score", cmp.causal_not_retrieval),
                                ("retrieval, low causal effect", cmp.retrieval_not_causal),
                                ("both", cmp.both)):
                shown = ", ".join(f"L{la}H{h} ({e:.2f}, {s:.2f})" for la, h, e, s in rows[:6])
                print(f"    {title} (effect, score): {shown or 'none'}")
            if args.out and name == "exact-answer-denoise":
                from rhlens.plotting.patching import plot_patching_vs_retrieval
                from rhlens.runs import save_figure

                save_figure(plot_patching_vs_retrieval(cmp), Path(args.out) / "patching_vs_retrieval.png")
                cmp.save(Path(args.out) / "patching_vs_retrieval.json")

    if args.out:
        from rhlens.plotting.patching import plot_patching_agreement, plot_patching_heatmap
        from rhlens.runs import save_figure

        out = Path(args.out)
        for name, result in runs.items():
            result.save(out / name)
        save_figure(plot_patching_heatmap(exact), out / "heatmap_exact_answer.png")
        save_figure(plot_patching_agreement(exact, attr), out / "exact_vs_attribution_answer.png")
        (out / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
        print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
