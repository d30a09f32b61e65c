"""Write the notebooks in ``notebooks/`` from the cell sources below, outputs stripped.

Notebooks are generated rather than edited by hand so that a change to them is a readable
diff of this file, every cell has a stable id, and no output (or machine path) ever lands
in git. ``tests/test_notebooks.py`` executes what this script writes.

    python scripts/make_notebooks.py           # (re)write notebooks/*.ipynb
    python scripts/make_notebooks.py --check   # exit 1 if notebooks/ is not what this writes
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"

# Each notebook: a list of ("md" | "code", source). Keep the settings cell second: it is
# the one place a reader changes to scale a run up. ``%matplotlib inline`` comes first in the
# imports cell: rhlens' figures are built without pyplot, and a bare IPython kernel only
# renders a returned Figure as an image once the inline backend's formatter is installed.
QUICKSTART: list[tuple[str, str]] = [
    ("md", """\
# rhlens quickstart: find the retrieval heads of a small model

A *retrieval head* (Wu et al., 2024) is an attention head that copies the answer out of a
long context: while the model answers a needle-in-a-haystack question, the head's strongest
attention sits on the needle token that is being generated. This notebook

1. loads the default model (SmolLM2-135M-Instruct, on CPU),
2. builds two short needle-in-a-haystack probes and answers one,
3. scores every head on them (`detect_retrieval_heads`),
4. looks at the best head's attention while the model answers.

It runs in about a minute on a laptop CPU. For real numbers use more probes (the settings
below, or `rhlens detect` on the command line)."""),
    ("code", """\
# Settings: the only cell to edit.
import os

LENGTHS = (450,)       # context lengths in tokens (the prompt plus a 200-token answer buffer)
DEPTHS = (20, 80)      # where the needle sits, in percent of the haystack
N_NEEDLES = 1          # how many of the built-in needles to use
MAX_NEW_TOKENS = 32    # answer budget per probe (the paper uses 50)
TOP = 10               # heads to list
THREADS = int(os.environ.get("RHLENS_THREADS", "2"))  # CPU threads for torch"""),
    ("code", """\
%matplotlib inline
import torch

import rhlens
from rhlens.engine import GenerationConfig, current_phase, generate
from rhlens.plotting import plot_head_heatmap
from rhlens.probes import BUILTIN_NEEDLES, ProbeConfig, build_probes
from rhlens.retrieval import DetectConfig, detect_retrieval_heads, rouge1_recall

torch.set_num_threads(THREADS)
model, tok = rhlens.load_model()  # a TransformerBridge and its tokenizer
cfg = model.cfg
f"{cfg.n_layers} layers x {cfg.n_heads} query heads ({cfg.n_key_value_heads} KV heads)\""""),
    ("md", """\
## Probes

A probe is a haystack of text with one *needle* sentence inserted at a given depth, followed
by a question that only the needle answers. `needle_span` is where the answer's tokens sit
in the prompt: the positions a retrieval head copies from."""),
    ("code", """\
import pandas as pd

probes = build_probes(tok, config=ProbeConfig(lengths=LENGTHS, depths=DEPTHS),
                      needles=BUILTIN_NEEDLES[:N_NEEDLES])
pd.DataFrame([{"probe": p.key, "tokens": p.n_tokens, "needle span": p.needle_span,
               "question": p.question, "expected": p.real_needle} for p in probes])"""),
    ("code", """\
probe = probes[0]
gen = generate(model, tok, probe.prompt_ids, config=GenerationConfig(max_new_tokens=MAX_NEW_TOKENS))
{"answer": gen.response, "ROUGE-1 recall": rouge1_recall(probe.real_needle, gen.response),
 "steps": gen.n_steps, "stopped at": gen.stop_reason}"""),
    ("md", """\
## Detect retrieval heads

At every decode step each head's top-1 attention position is recorded; the head *copies* at
that step when the position lies in the needle span and holds the token being generated. A
head's score on a probe is the share of needle tokens it copied, averaged over the probes
the model answered correctly."""),
    ("code", """\
scores = detect_retrieval_heads(model, probes, config=DetectConfig(max_new_tokens=MAX_NEW_TOKENS),
                                tokenizer=tok)
scores"""),
    ("code", """\
scores.to_dataframe().head(TOP)"""),
    ("code", """\
plot_head_heatmap(scores, top=TOP)"""),
    ("md", """\
## The best head at work

A TransformerLens hook on the head's `hook_pattern` records its attention at every decode
step (the engine prefills the prompt without attention patterns, so pattern hooks fire only
while the model answers). Left: attention over the whole prompt, averaged over the answer's
steps, needle span shaded. Right: step by step around the needle; a retrieval head draws a
diagonal, attending at each step to the very needle token the model is about to write."""),
    ("code", """\
(layer, head, score), = scores.top(1)
steps = []


def record(pattern, hook):  # pattern: [batch, head, query, key]; one query while decoding
    if current_phase() == "decode":
        steps.append(pattern[0, head, -1].detach().float().cpu())


gen = generate(model, tok, probe.prompt_ids, config=GenerationConfig(max_new_tokens=MAX_NEW_TOKENS),
               hooks=[(f"blocks.{layer}.attn.hook_pattern", record)])
attention = torch.stack([a[: probe.n_tokens] for a in steps])  # [decode step, prompt position]
copied = attention.argmax(-1)
s0, s1 = probe.needle_span
{"head": f"L{layer}H{head}", "score": round(score, 3), "decode steps": len(steps),
 "steps whose top-1 position is in the needle": int(((copied >= s0) & (copied < s1)).sum())}"""),
    ("code", """\
from matplotlib.figure import Figure

fig = Figure(figsize=(12, 4), layout="constrained")
ax_all, ax_zoom = fig.subplots(1, 2, width_ratios=(3, 2))
ax_all.plot(attention.mean(0).numpy(), lw=0.8)
ax_all.axvspan(s0 - 0.5, s1 - 0.5, color="tab:red", alpha=0.25, label="needle answer span")
ax_all.set_xlabel("prompt position")
ax_all.set_ylabel("attention (mean over decode steps)")
ax_all.set_title(f"L{layer}H{head} while answering {probe.key}")
ax_all.legend()

lo, hi = max(0, s0 - 8), min(probe.n_tokens, s1 + 8)
ax_zoom.imshow(attention[:, lo:hi].numpy(), aspect="auto", cmap="viridis")
ax_zoom.axvline(s0 - lo - 0.5, color="white", lw=0.8)
ax_zoom.axvline(s1 - lo - 0.5, color="white", lw=0.8)
ax_zoom.set_xticks(range(hi - lo), [tok.decode([t]) for t in probe.prompt_ids[lo:hi]],
                   rotation=90, fontsize=7)
ax_zoom.set_yticks(range(len(steps)), [repr(tok.decode([t])) for t in gen.response_ids[: len(steps)]],
                   fontsize=6)
ax_zoom.set_xlabel("prompt token (needle between the white lines)")
ax_zoom.set_ylabel("token generated at that step")
fig"""),
    ("md", """\
## Next

- More probes and longer contexts: `rhlens detect --lengths 500,1000,2000 --depth-count 5 --out runs/mine`.
- Knock the heads out: `rhlens mask-sweep --scores runs/mine --out runs/mine-sweep`
  (or `notebooks/02_paper_figures.ipynb`).
- Everything in one file: `rhlens report runs/mine runs/mine-sweep --out report.html`."""),
]

PAPER_FIGURES: list[tuple[str, str]] = [
    ("md", """\
# The paper's properties of retrieval heads, and the masking curve

Wu et al. (2024) describe retrieval heads by a few properties: they are **sparse** (a few
percent of heads), **universal** (every model family has them), **intrinsic** (a chat or MoE
variant keeps its base model's heads), and **dynamic** (some fire on every probe, others
only in some contexts). rhlens adds **stability**: how sure a head list from few probes is.
Masking the top-K retrieval heads breaks needle-in-a-haystack answers while masking K random
heads does not (the paper's Figure 7).

This notebook computes each property on the default model (a tiny probe set, so the numbers
are rough) and, when the paper's released score files are present, on the paper's models.
It ends with a small masking curve and the one-file report. A few minutes on a CPU."""),
    ("code", """\
# Settings: the only cell to edit.
import os
from pathlib import Path

from rhlens.official import find_official_dir

LENGTHS = (450,)        # context lengths in tokens for detection
DEPTHS = (20, 80)       # needle depths in percent
N_NEEDLES = 2           # built-in needles (probes = lengths x depths x needles)
MAX_NEW_TOKENS = 32     # answer budget per probe
SWEEP_PROBES = 2        # probes for the masking curve
KS = (0, 5, 10)         # numbers of heads masked
SEEDS = 1               # random masks per K
N_BOOT = 200            # bootstrap resamples for stability
THREADS = int(os.environ.get("RHLENS_THREADS", "2"))
# The scores released with the paper, if this checkout has them (skipped otherwise).
ROOT = Path.cwd().parent if Path.cwd().name == "notebooks" else Path.cwd()
OFFICIAL = find_official_dir(ROOT)  # None when this checkout has none
OUT = ROOT / "runs" / "notebook-paper-figures"  # run files and the report (runs/ is not in git)"""),
    ("code", """\
%matplotlib inline
import pandas as pd
import torch

import rhlens
from rhlens.niah import NIAHConfig, mask_sweep
from rhlens.official import load_official
from rhlens.plotting import (
    plot_dynamic,
    plot_head_heatmap,
    plot_intrinsic,
    plot_k_curve,
    plot_mask_heatmaps,
    plot_sparsity,
    plot_stability,
    plot_universal,
)
from rhlens.probes import BUILTIN_NEEDLES, ProbeConfig, build_probes
from rhlens.properties import dynamic, intrinsic, sparse, stability, universal
from rhlens.retrieval import DetectConfig, detect_retrieval_heads

torch.set_num_threads(THREADS)
model, tok = rhlens.load_model()
probes = build_probes(tok, config=ProbeConfig(lengths=LENGTHS, depths=DEPTHS),
                      needles=BUILTIN_NEEDLES[:N_NEEDLES])
scores = detect_retrieval_heads(model, probes, config=DetectConfig(max_new_tokens=MAX_NEW_TOKENS),
                                tokenizer=tok)
scores"""),
    ("code", """\
plot_head_heatmap(scores)"""),
    ("md", """\
## Sparse

Few heads score above 0.1: the paper finds 3-6% in every model."""),
    ("code", """\
sp = sparse(scores)
display(sp.to_dataframe())
plot_sparsity(sp)"""),
    ("md", """\
## Dynamic

Heads active on every probe whatever the context, and retrieval heads that fire only on
some probes."""),
    ("code", """\
dyn = dynamic(scores)
display({"always active": [f"L{la}H{h}" for la, h in dyn.always_active],
         "context dependent": [f"L{la}H{h}" for la, h in dyn.context_dependent]})
plot_dynamic(dyn)"""),
    ("md", """\
## Stability

Bootstrap intervals of the scores, and how many probes it takes before the top-K set stops
changing. With a handful of probes the intervals are wide: that is the point of looking."""),
    ("code", """\
stab = stability(scores, k=10, n_boot=N_BOOT, repeats=10)
display(stab.heads_dataframe())
plot_stability(stab)"""),
    ("md", """\
## Universal and intrinsic, on the paper's released scores

The per-probe scores Wu et al. released (`{"<layer>-<head>": [score, ...]}` per model) are
read from `$RHLENS_OFFICIAL_SCORES` or `../shared/data/official_head_scores` next to this
repository (`rhlens.official.fetch_official_scores(DIR)` downloads them, once, with network
access); without them these cells only say so."""),
    ("code", """\
official = load_official(OFFICIAL) if OFFICIAL is not None else {}
if official:
    table = universal([scores, *official.values()])
    display(table.to_dataframe())
    display(plot_universal(table))
else:
    display("no official scores found (rhlens.official.fetch_official_scores(DIR) fetches "
            "them): universal and intrinsic skipped")"""),
    ("code", """\
PAIRS = [("Mistral-7B-v0.2-hf", "Mixtral-8x7B-v0.1"),   # base vs MoE variant
         ("Qwen1.5-14B", "Qwen1.5-14B-Chat"),           # base vs chat variant
         ("llama-2-7b-80k", "Mistral-7B-v0.2-hf")]      # unrelated families
rows = []
for a, b in PAIRS:
    if a in official and b in official:
        res = intrinsic(official[a], official[b], k=20)
        rows.append(res.summary())
        display(plot_intrinsic(res))
pd.DataFrame(rows) if rows else "no pair of official files found: intrinsic skipped\""""),
    ("code", """\
if "llama-2-7b-80k" in official:  # the paper's main model: 12 heads active on every probe
    llama_dyn = dynamic(official["llama-2-7b-80k"])
    display(f"{len(llama_dyn.always_active)} always-active heads in llama-2-7b-80k")
    display(plot_dynamic(llama_dyn))"""),
    ("md", """\
## Masking curve (Figure 7)

NIAH score (ROUGE-1 recall x 100) with the top-K retrieval heads masked, against K random
heads that are not retrieval heads. The paper's mask zeroes the heads' queries while the
model answers."""),
    ("code", """\
sweep = mask_sweep(model, probes[:SWEEP_PROBES], scores, ks=KS, seeds=SEEDS,
                   config=NIAHConfig(max_new_tokens=MAX_NEW_TOKENS), tokenizer=tok)
curve = sweep.curve()
pd.DataFrame({"K": curve["k"], "top-K masked": curve["top"],
              "random-K masked": curve["random_mean"]})"""),
    ("code", """\
plot_k_curve(sweep)"""),
    ("code", """\
kmax = max(KS)
display(plot_mask_heatmaps(sweep.niah, ["none", f"top-{kmax}", f"random-{kmax}-s0"]))
pd.DataFrame(sweep.niah.examples(f"top-{kmax}", n=SWEEP_PROBES,
                                 classes=("hallucination", "partial", "refusal", "degenerate")))"""),
    ("md", """\
## Everything in one file

`build_report` turns run directories (what `rhlens detect` / `mask-sweep` write, or the same
results saved from Python) into one self-contained HTML file and a Markdown twin:
`rhlens report RUN_DIR ... --out report.html` on the command line."""),
    ("code", """\
from rhlens.report import build_report
from rhlens.runs import save_detection_run

save_detection_run(OUT / "detect", scores)
sweep.save(OUT / "sweep")
report = build_report([OUT / "detect", OUT / "sweep"], official=[OFFICIAL] if official else [],
                      title="rhlens: the paper's properties on the default model")
report.to_html(OUT / "report.html")
report.to_markdown(OUT / "report.md")
{"report": str(OUT / "report.html"), "sections": report.titles()}"""),
]

NOTEBOOK_CELLS: dict[str, list[tuple[str, str]]] = {
    "01_quickstart.ipynb": QUICKSTART,
    "02_paper_figures.ipynb": PAPER_FIGURES,
}


def build(cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
    """A notebook with stable cell ids, no outputs, and the venv's ``python3`` kernel."""
    nb = new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)",
                                 "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    for i, (kind, source) in enumerate(cells):
        cell = new_markdown_cell(source) if kind == "md" else new_code_cell(source)
        cell["id"] = f"cell-{i:02d}"
        nb.cells.append(cell)
    nbformat.validate(nb)
    return nb


def render(cells: list[tuple[str, str]]) -> str:
    return nbformat.writes(build(cells)) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 when a notebook differs from its source here")
    parser.add_argument("--out", type=Path, default=NOTEBOOKS, help="folder (default notebooks/)")
    args = parser.parse_args(argv)
    stale = []
    for name, cells in NOTEBOOK_CELLS.items():
        path = args.out / name
        text = render(cells)
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(name)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path}")
    if stale:
        print(f"out of date: {', '.join(stale)}; run python scripts/make_notebooks.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
