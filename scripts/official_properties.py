"""Compute the paper's retrieval-head properties on the official per-probe score files.

Reproduces, from the scores Wu et al. (2024) released, the claims rhlens' analyses are meant
to check: sparsity (3-6% of heads above 0.1), universality (every family has them), the
always-on heads (12 in Llama-2-7B-80K), and intrinsic-ness (base vs variant correlation
above 0.8, unrelated families near 0). Prints Markdown tables and writes figures + saved
results under ``--out``.

    python scripts/official_properties.py [--data DIR] [--out runs/official]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rhlens.official import find_official_dir, load_official
from rhlens.plotting import (
    plot_dynamic,
    plot_head_heatmap,
    plot_intrinsic,
    plot_sparsity,
    plot_stability,
    plot_universal,
)
from rhlens.properties import dynamic, intrinsic, sparse, stability, universal

MODELS = ["llama-2-7b-80k", "Mistral-7B-v0.2-hf", "Mixtral-8x7B-v0.1", "Qwen1.5-14B",
          "Qwen1.5-14B-Chat"]
PAIRS = [("Mistral-7B-v0.2-hf", "Mixtral-8x7B-v0.1", "MoE variant"),
         ("Qwen1.5-14B", "Qwen1.5-14B-Chat", "chat variant"),
         ("llama-2-7b-80k", "Mistral-7B-v0.2-hf", "unrelated")]


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=find_official_dir(),
                        help="folder with the official <model>.json files")
    parser.add_argument("--out", type=Path, default=Path("runs/official"),
                        help="folder for figures and saved results")
    parser.add_argument("--k", type=int, default=20, help="top-K for overlaps (default 20)")
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples")
    args = parser.parse_args(argv)

    if args.data is None or not args.data.is_dir():
        parser.error(f"{args.data} is not a folder (pass --data, set RHLENS_OFFICIAL_SCORES, or "
                     "fetch the files with rhlens.official.fetch_official_scores)")
    names = [m for m in MODELS if (args.data / f"{m}.json").exists()]
    scores = {m: load_official(args.data / f"{m}.json") for m in names}
    out: Path = args.out
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)

    def save_fig(fig, name: str) -> None:
        fig.savefig(fig_dir / f"{name}.png", dpi=120)

    table = universal([scores[m] for m in names])
    table.save(out / "universal")
    save_fig(plot_universal(table), "universal")
    print("## Universal\n")
    print(table.to_markdown(), "\n")

    rows = []
    for m in names:
        s = scores[m]
        sp, dy = sparse(s), dynamic(s)
        st = stability(s, k=args.k, n_boot=args.n_boot, seed=0)
        for result, kind in ((sp, "sparse"), (dy, "dynamic"), (st, "stability")):
            result.save(out / m / kind)
        save_fig(plot_sparsity(sp), f"{m}_sparse")
        save_fig(plot_dynamic(dy), f"{m}_dynamic")
        save_fig(plot_stability(st), f"{m}_stability")
        save_fig(plot_head_heatmap(s, top=args.k), f"{m}_heatmap")
        lo, hi = st.n_retrieval_ci
        rows.append([m, str(s.n_successful), f"{100 * sp.fraction(0.1):.2f}%",
                     f"{100 * sp.fraction(0.5):.2f}%", f"{st.n_retrieval} [{lo:g}, {hi:g}]",
                     str(len(dy.always_active)), str(len(dy.context_dependent)),
                     str(st.probes_needed)])
    print("## Sparse, dynamic, stability\n")
    print(markdown(["model", "probes", "% > 0.1", "% > 0.5", "n > 0.1 [95% CI]",
                    "active on every probe", "context-dependent retrieval heads",
                    f"probes for top-{args.k} Jaccard >= 0.9"], rows), "\n")

    rows = []
    for a, b, relation in PAIRS:
        if a not in scores or b not in scores:
            continue
        res = intrinsic(scores[a], scores[b], k=args.k)
        res.save(out / "intrinsic" / f"{a}__{b}")
        save_fig(plot_intrinsic(res), f"intrinsic_{a}__{b}")
        rows.append([f"{a} vs {b}", relation, f"{res.pearson:.3f}", f"{res.spearman:.3f}",
                     f"{res.overlap}/{res.k}", f"{res.jaccard:.3f}"])
    print("## Intrinsic\n")
    print(markdown(["pair", "relation", "Pearson", "Spearman", f"top-{args.k} shared",
                    f"top-{args.k} Jaccard"], rows))
    print(f"\nfigures and results in {out}")


if __name__ == "__main__":
    main()
