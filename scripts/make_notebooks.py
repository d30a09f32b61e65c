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
DEPTHS = (20, 100)     # where the needle goes, in percent of the haystack (moved back to the
                       # previous sentence end, as in the paper: see "placed depth" below)
N_NEEDLES = 1          # how many of the built-in needles to use
MAX_NEW_TOKENS = 32    # answer budget per probe (the paper uses 50)
TOP = 10               # heads to list
THREADS = int(os.environ.get("RHLENS_THREADS", "2"))  # CPU threads for torch"""),
    ("code", """\
%matplotlib inline
import torch

import rhlens
from rhlens import EngineHook
from rhlens.engine import GenerationConfig, generate
from rhlens.probes import BUILTIN_NEEDLES, ProbeConfig, build_probes
from rhlens.retrieval import DetectConfig, detect_retrieval_heads
from rhlens.stats import rouge1_recall

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
pd.DataFrame([{"probe": p.key, "placed depth": round(p.placed_depth, 1), "tokens": p.n_tokens,
               "needle span": p.needle_span, "question": p.question, "expected": p.real_needle}
              for p in probes])"""),
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
scores = detect_retrieval_heads(model, probes, tokenizer=tok,
                                config=DetectConfig().with_generation(max_new_tokens=MAX_NEW_TOKENS))
scores"""),
    ("code", """\
scores.to_dataframe().head(TOP)"""),
    ("code", """\
scores.plot(top=TOP)  # every result has .plot() (a matplotlib figure) and .to_dataframe()"""),
    ("md", """\
## The heads at work, step by step

`trace_heads` answers the probe and keeps, for each chosen head and each decode step, the key it
attended to most, that key's weight, its attention on the needle and whether it copied;
displaying the trace draws it. Move the step control (or click an answer token): the needle is
underlined in yellow, the head's attention is blue, its top key is outlined. The two best heads
copy the needle token by token; the lowest-ranked one does not. On the command line:
`rhlens show RUN_DIR --heads top:2,bottom:1` writes the same view as an HTML file."""),
    ("code", """\
trace = rhlens.trace_heads(model, probe, "top:2,bottom:1", scores=scores)
trace"""),
    ("md", """\
## The best head at work, by hand

A TransformerLens hook on the head's `hook_pattern` records its attention at every decode
step. Wrapped in `EngineHook(..., phase="decode", reads_only=True)` it tells the engine that it
only watches the answer, so the engine keeps its fast paths (the prompt is prefilled without
attention patterns; a plain function works too, more slowly). Left: attention over the whole
prompt, averaged over the answer's steps, needle span shaded. Right: step by step around the
needle; a retrieval head draws a diagonal, attending at each step to the very needle token
the model is about to write."""),
    ("code", """\
(layer, head, score), = scores.top(1)
steps = []


def record(pattern, hook=None):  # pattern: [batch, head, query, key]; one query while decoding
    steps.append(pattern[0, head, -1].detach().float().cpu())


gen = generate(model, tok, probe.prompt_ids, config=GenerationConfig(max_new_tokens=MAX_NEW_TOKENS),
               hooks=[(f"blocks.{layer}.attn.hook_pattern",
                       EngineHook(record, phase="decode", reads_only=True))])
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
- Everything in one file: `rhlens report runs/mine runs/mine-sweep --out report.html`.
- Scores, patching and masking from your own `run_with_cache`: `notebooks/03_bring_your_own_cache.ipynb`."""),
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

from rhlens.retrieval.official import find_official_dir

LENGTHS = (450,)        # context lengths in tokens for detection
DEPTHS = (20, 100)      # needle depths in percent (at 450 tokens, 20-90 all land at ~19%)
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
from rhlens.retrieval.official import load_official
from rhlens.plotting import (
    plot_dynamic,
    plot_head_heatmap,
    plot_intrinsic,
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
scores = detect_retrieval_heads(model, probes, tokenizer=tok,
                                config=DetectConfig().with_generation(max_new_tokens=MAX_NEW_TOKENS))
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
repository (`rhlens.retrieval.official.fetch_official_scores(DIR)` downloads them, once, with network
access); without them these cells only say so."""),
    ("code", """\
official = load_official(OFFICIAL) if OFFICIAL is not None else {}
if official:
    table = universal([scores, *official.values()])
    display(table.to_dataframe())
    display(plot_universal(table))
else:
    from IPython.display import Markdown

    display(Markdown("**The paper's released score files are not in this checkout**, so the "
                     "universal and intrinsic comparisons below have nothing to compare. Fetch "
                     "them once, with network access: `rhlens official --fetch "
                     "../shared/data/official_head_scores` (or set `$RHLENS_OFFICIAL_SCORES`), "
                     "then rerun this notebook."))"""),
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
pd.DataFrame(rows) if rows else None  # nothing without the paper's files (see above)"""),
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
                   config=NIAHConfig().with_generation(max_new_tokens=MAX_NEW_TOKENS), tokenizer=tok)
sweep  # a result displays itself: the K curve's table and figure"""),
    ("code", """\
kmax = max(KS)
display(plot_mask_heatmaps(sweep.niah, ["none", f"top-{kmax}", f"random-{kmax}-s0"]))
examples = pd.DataFrame(sweep.niah.examples(f"top-{kmax}", n=SWEEP_PROBES,
                                            classes=("hallucination", "partial", "refusal",
                                                     "degenerate")))
# Whole answers, wrapped: the masked answers are what this table is for.
examples.style.hide(axis="index").set_properties(**{"white-space": "pre-wrap", "text-align": "left"})"""),
    ("md", """\
## Everything in one file

`build_report` turns run directories (what `rhlens detect` / `mask-sweep` write, or the same
results saved from Python) into one self-contained HTML file and a Markdown twin:
`rhlens report RUN_DIR ... --out report.html` on the command line."""),
    ("code", """\
from rhlens.report import build_report
from rhlens.report.runs import save_detection_run

save_detection_run(OUT / "detect", scores)
sweep.save(OUT / "sweep")
report = build_report([OUT / "detect", OUT / "sweep"], official=[OFFICIAL] if official else [],
                      title="rhlens: the paper's properties on the default model")
report.to_html(OUT / "report.html")
report.to_markdown(OUT / "report.md")
{"report": str(OUT / "report.html"), "sections": report.titles()}"""),
]

BRING_YOUR_OWN_CACHE: list[tuple[str, str]] = [
    ("md", """\
# Bring your own cache: retrieval scores, patching and masking from plain TransformerLens

You already have a `TransformerBridge`, a prompt and `model.run_with_cache(...)`. This
notebook shows that rhlens' analyses start from exactly that; its own decode engine appears
only to write the model's answer and as the reference the cache-based scores are checked
against:

1. one needle-in-a-haystack probe and the model's own answer to it;
2. `model.run_with_cache(prompt + answer)`, the ordinary TransformerLens call;
3. every head's retrieval score from that cache (`retrieval_scores_from_cache`), checked
   against the engine's `detect_retrieval_heads` on the same probe;
4. the top head's attention while the answer is written;
5. patching that head's query side (*where it looks*) against its value side (*what it
   moves*) from a clean run into a corrupted one (`patch_activation`);
6. chain-of-thought against direct answers on two questions of your own, with the top
   heads masked (`cot_ablation`).

One probe, one pair and two questions keep it to about a minute on a CPU: every number
below is an illustration of the method on this model, not a measurement."""),
    ("code", """\
# Settings: the only cell to edit.
import os

LENGTH = 450          # context length in tokens (the prompt plus a 200-token answer buffer)
DEPTH = 20            # where the needle goes, in percent of the haystack (moved back to the
                      # previous sentence end: probe.placed_depth)
NEEDLE = 0            # which built-in needle
MAX_NEW_TOKENS = 32   # answer budget (the paper uses 50)
K = 10                # heads in the top-K mask of the CoT comparison
COT_TOKENS = 48       # answer budget with chain of thought (rhlens cot uses 160)
THREADS = int(os.environ.get("RHLENS_THREADS", "2"))  # CPU threads for torch"""),
    ("code", """\
%matplotlib inline
import pandas as pd
import torch
from matplotlib.figure import Figure

import rhlens
from rhlens.cot.experiment import CoTConfig, cot_ablation
from rhlens.engine import GenerationConfig, generate
from rhlens.patching import make_pairs, patch_activation
from rhlens.plotting import plot_cot_bars, plot_head_heatmap
from rhlens.probes import BUILTIN_NEEDLES, ProbeConfig, build_probes
from rhlens.retrieval import (
    DetectConfig,
    detect_retrieval_heads,
    probe_retrieval_scores,
    retrieval_scores_from_cache,
)
from rhlens.stats import rouge1_recall, top_k_heads

torch.set_num_threads(THREADS)
torch.set_grad_enabled(False)  # inference only, as in most TransformerLens notebooks
model, tok = rhlens.load_model()  # a TransformerBridge and its tokenizer
cfg = model.cfg
f"{cfg.n_layers} layers x {cfg.n_heads} query heads ({cfg.n_key_value_heads} KV heads)\""""),
    ("md", """\
## One probe and the model's own answer

A probe is a haystack with one needle sentence in it and a question only the needle answers;
`needle_span` is where the answer's tokens sit in the prompt. The answer is the model's own
greedy reply, here from rhlens' `generate` (one from your own decoding loop serves as well:
the cache below is scored on whatever answer is appended). A retrieval head is defined by
what it does while the model answers."""),
    ("code", """\
probe, = build_probes(tok, config=ProbeConfig(lengths=(LENGTH,), depths=(DEPTH,)),
                      needles=[BUILTIN_NEEDLES[NEEDLE]])
gen = generate(model, tok, probe.prompt_ids, config=GenerationConfig(max_new_tokens=MAX_NEW_TOKENS))
{"question": probe.question, "expected": probe.real_needle, "answer": gen.response,
 "ROUGE-1 recall": rouge1_recall(probe.real_needle, gen.response),
 "prompt tokens": probe.n_tokens, "answer tokens": len(gen.response_ids),
 "needle span": probe.needle_span, "placed depth (%)": round(probe.placed_depth, 1)}"""),
    ("md", """\
## `run_with_cache` over prompt + answer

Attention is causal, so one teacher-forced forward over the prompt followed by the answer
gives, at the answer's positions, exactly the attention patterns the model had while it
generated: the query at position `answer_start - 1 + s` is the one that wrote answer token
`s`. Nothing here is rhlens: it is the call you would make anyway."""),
    ("code", """\
tokens = list(probe.prompt_ids) + list(gen.response_ids)  # the stopping token included
answer_start = probe.n_tokens                             # position of the first answer token
logits, cache = model.run_with_cache(torch.tensor([tokens]))
predicted = logits[0, answer_start - 1:-1].argmax(-1)
{"cached activations": len(cache),
 "blocks.0.attn.hook_pattern": tuple(cache["blocks.0.attn.hook_pattern"].shape),
 "the forward predicts the model's own answer": predicted.tolist() == list(gen.response_ids)}"""),
    ("md", """\
## Score every head from the cache

At each answer step, a head *copies* when its strongest attention lies in the needle span on
the very token being written. Its score is the share of the needle's tokens it copied
(Wu et al., 2024). `retrieval_scores_from_cache` reads every layer's `hook_pattern` from the
cache and returns a `[layer, head]` tensor; `rhlens.stats.top_k_heads` ranks it with the rule
every rhlens table uses (ties by layer, then head)."""),
    ("code", """\
from_cache = retrieval_scores_from_cache(cache, tokens, needle_span=probe.needle_span,
                                         answer_start=answer_start)
top = top_k_heads(from_cache, 5)
pd.DataFrame([{"head": f"L{la}H{h}", "retrieval score": float(from_cache[la, h])} for la, h in top])"""),
    ("code", """\
plot_head_heatmap(from_cache, top=5)"""),
    ("md", """\
## The same numbers as the engine

`detect_retrieval_heads` gets there another way: it decodes the answer itself, prefilling
the prompt without any attention pattern and recording each head's top key at every step.
On the same probe it must give the same per-probe scores. So must `probe_retrieval_scores`,
which caches only the answer's query rows (`cache_answer_patterns`): the route for long
prompts, where a full `run_with_cache` would hold an n x n pattern per head."""),
    ("code", """\
engine = detect_retrieval_heads(model, [probe], tokenizer=tok,
                                config=DetectConfig().with_generation(max_new_tokens=MAX_NEW_TOKENS))
answer_rows = probe_retrieval_scores(model, probe, gen.response_ids)
{"same answer": engine.probes[0]["response_ids"] == list(gen.response_ids),
 "max |cache - engine|": float((from_cache - engine.per_probe[0]).abs().max()),
 "max |answer rows only - engine|": float((answer_rows - engine.per_probe[0]).abs().max()),
 "same top 5": top_k_heads(engine.per_probe[0], 5) == top}"""),
    ("md", """\
## The top head while the answer is written

Its pattern rows at the answer's positions, over the needle sentence: one row per generated
token, the answer span between the white lines. A retrieval head draws a diagonal, each
step's attention on the needle token that is being written."""),
    ("code", """\
(layer, head), = top_k_heads(from_cache, 1)
rows = cache[f"blocks.{layer}.attn.hook_pattern"][0, head, answer_start - 1:len(tokens) - 1]
r0 = probe.meta["insert_token"]
r1 = r0 + probe.meta["needle_tokens"]
lo, hi = max(0, r0 - 4), min(answer_start, r1 + 4)
s0, s1 = probe.needle_span

fig = Figure(figsize=(9, 5.5), layout="constrained")
ax = fig.subplots()
im = ax.imshow(rows[:, lo:hi].float().numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1)
for x in (s0 - lo - 0.5, s1 - lo - 0.5):
    ax.axvline(x, color="white", lw=0.8)
ax.set_xticks(range(hi - lo), [tok.decode([t]) for t in tokens[lo:hi]], rotation=90, fontsize=7)
ax.set_yticks(range(len(rows)), [repr(tok.decode([t])) for t in gen.response_ids], fontsize=6)
ax.set_xlabel("prompt token (the needle sentence; answer span between the white lines)")
ax.set_ylabel("answer token being written")
ax.set_title(f"L{layer}H{head}: attention of the answer's queries over the needle "
             f"(retrieval score {float(from_cache[layer, head]):.2f})")
fig.colorbar(im, ax=ax, shrink=0.6, label="attention")
fig"""),
    ("md", """\
## Where it looks, or what it moves? Patching its query side against its value side

`make_pairs(..., kind="swap")` builds two prompts of one length that differ only in the
needle's answer (the corrupted one names another answer of the same token length), both
followed by the needle's own words up to the answer, so the next token is where the two
answers first differ. The metric is the logit difference between the clean and the
corrupted answer's token there.

`patch_activation` runs the corrupted prompt once per patch, writing one head's activation
from the clean cache (here at every position), and reports the *effect*: 0 = still the
corrupted run, 1 = the clean logit difference fully restored. The activations:

| patched | side | what changes |
| --- | --- | --- |
| `z` | whole head | the head's output before `W_O` |
| `q` | query/key | its queries: where it looks |
| `pattern` | query/key | its attention pattern alone |
| `v` | value/output | the values of its KV head, which the other query heads of its group read too |
| `ov` | value/output | its own (corrupted) pattern times the clean values: this head alone |

Alone, `k` and `v` are indexed by KV head, as in TransformerLens (`scripts/qk_vs_ov.py` also
patches `q+k`: its queries with the keys of its KV head)."""),
    ("code", """\
pair, = make_pairs(tok, [probe], kind="swap")
clean_tokens = torch.tensor([pair.clean_ids])
corrupted_tokens = torch.tensor([pair.corrupted_ids])


def logit_diff(logits):  # [batch, pos, vocab] -> [batch]
    at = logits[:, pair.answer_pos]
    return at[:, pair.clean_token] - at[:, pair.corrupted_token]


clean_logits, clean_cache = model.run_with_cache(clean_tokens)
{"clean answer": pair.labels["clean_answer"], "corrupted answer": pair.labels["corrupted_answer"],
 "tokens compared": (tok.decode([pair.clean_token]), tok.decode([pair.corrupted_token])),
 "tokens": pair.n_tokens, "answer position": pair.answer_pos}"""),
    ("code", """\
group = cfg.n_heads // cfg.n_key_value_heads  # query heads per KV head
SIDES = {"z": "whole head", "q": "query/key", "pattern": "query/key", "v": "value/output",
         "ov": "value/output"}
patched = {}
rows_out = []
for activation, side in SIDES.items():
    h = head // group if activation == "v" else head  # v alone: the KV head
    result = patch_activation(model, corrupted_tokens, clean_cache, logit_diff,
                              activation=activation, heads=[(layer, h)], clean_logits=clean_logits)
    patched[activation] = result
    rows_out.append({"patched": activation, "side": side,
                     "head": f"L{layer}H{h}" + (" (KV head)" if activation == "v" else ""),
                     "logit diff": float(result.patched[0, layer, h]),
                     "effect": float(result.effects[0, layer, h])})
baseline = patched["z"]
display({"logit diff, clean run": float(baseline.clean[0]),
         "logit diff, corrupted run": float(baseline.corrupted[0])})
pd.DataFrame(rows_out)"""),
    ("md", """\
Reading the table: the query side's effects (`q`, `pattern`) measure how much of the head's
part is *where it looks*, the value side's (`v`, `ov`) how much is *what it moves*; `z` is
the whole head. The needle sits at the same place in both prompts, so a head that copies
whatever is written there looks at the same tokens in both runs, and only what it reads
there can bring the clean answer back. `v` also changes what the other query heads of the
KV group read; `ov` is this head alone. One head on one pair is an anecdote:
`scripts/qk_vs_ov.py` makes the table for the top 3 heads over several swap pairs, and
`rhlens patch` patches every head.

Each result converts to TransformerLens' own `PatchingResult` (`.to_transformer_lens()`),
whose statistics (`stderr`, `bootstrap_ci`, `permutation_pvalue`, `normalized`) then apply:"""),
    ("code", """\
tl = patched["ov"].to_transformer_lens()
{"TransformerLens result": type(tl).__name__, "values [layer, head, pair]": tuple(tl.values.shape),
 "TL normalized() at the head": float(tl.normalized(patched["ov"].clean)[layer, head, 0]),
 "rhlens effect": float(patched["ov"].effects[0, layer, head])}"""),
    ("md", """\
## Chain of thought against direct answers, on your own questions

The paper finds that masking retrieval heads hurts answers that reason over a context far
more than answers from the model's own knowledge. `cot_ablation` takes plain
`(prompt, answer)` pairs (or `rhlens.cot.Question` objects), asks each one with a
chain-of-thought and with a direct instruction, unmasked and under each mask, and grades the
answers (a number is compared as a number; text must contain the gold answer as whole
words). Here one question can only be answered from its context (the names are made up) and
one from the model's own knowledge. The mask is the top-K heads by the cache scores above
(labelled `heads-K`), knocked out while the model answers; a `Mask`, or `RetrievalScores`
with `k=` (which adds random-K controls), works the same way."""),
    ("code", """\
ITEMS = [  # (prompt, gold answer)
    ("Mira lives in the town of Tovel. The town of Tovel is in the country of Brask. "
     "In which country does Mira live?", "Brask"),            # from the context
    ("What is the capital of France?", "Paris"),                # from the model's knowledge
]
cot = cot_ablation(model, ITEMS, masks=top_k_heads(from_cache, K), tokenizer=tok,
                   config=CoTConfig(max_new_tokens_cot=COT_TOKENS, n_boot=200))
cot.to_dataframe()[["mask", "mode", "n", "accuracy", "low", "high"]]"""),
    ("code", """\
pd.DataFrame(cot.records)[["mask", "mode", "id", "gold", "output", "correct"]]"""),
    ("code", """\
plot_cot_bars(cot)"""),
    ("md", """\
## Next

- Scores over many probes, saved and resumable: `detect_retrieval_heads(..., out="runs/mine")`
  or `rhlens detect --out runs/mine` (`notebooks/01_quickstart.ipynb`).
- The query/key vs value/output table for the top heads: `python scripts/qk_vs_ov.py --out runs/qk_vs_ov`.
- The CoT experiment at scale, with random-K controls and bootstrap intervals:
  `rhlens cot --task arithmetic --task capitals --scores runs/mine --k 20 --seeds 3 --out runs/cot`.
- Your own hooks under the engine: wrap them in `rhlens.EngineHook(fn, phase="decode",
  reads_only=True)` and pass them to `generate(..., hooks=[...])`."""),
]

NOTEBOOK_CELLS: dict[str, list[tuple[str, str]]] = {
    "01_quickstart.ipynb": QUICKSTART,
    "02_paper_figures.ipynb": PAPER_FIGURES,
    "03_bring_your_own_cache.ipynb": BRING_YOUR_OWN_CACHE,
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
