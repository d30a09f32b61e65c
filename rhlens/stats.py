"""The statistics every analysis shares: one top-K rule, one bootstrap, correlations, ROUGE.

One home per rule, so that the heads a mask knocks out are the heads a report lists, and a
confidence interval means the same thing in every table:

* :func:`rank_heads` / :func:`top_k_heads` / :func:`heads_above`: heads best first, ties
  broken by (layer, head) order. ``torch.topk`` breaks ties by kernel, and most heads of a
  real model score exactly 0, so a top-K that reaches into the zeros would otherwise depend
  on the machine. NaN scores rank last.
* :func:`bootstrap_means` / :func:`percentile_interval`: resampling the first axis with
  replacement, as a weighted sum (no ``[boot, n, ...]`` gather).
* :func:`pearson`, :func:`spearman` (average ranks for ties), :func:`jaccard`.
* :func:`rouge1_recall`: the paper's metric (ROUGE-1 recall, Porter-stemmed), on a
  tokenizer that keeps every script: for ASCII text it gives exactly the tokens of
  ``rouge-score``'s default tokenizer; letters of other scripts are kept (the default drops
  everything outside a-z and 0-9, so a Chinese answer could never score), and Chinese and
  Japanese characters count one token each, as they are written without spaces; symbols
  outside ASCII (emoji, arrows, math and currency signs) count one token each too.
"""

from __future__ import annotations

import math
import random
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from functools import cache
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from rhlens.errors import ConfigError

__all__ = [
    "Head",
    "bootstrap_means",
    "heads_above",
    "interval",
    "jaccard",
    "paired_gaps",
    "pearson",
    "percentile_interval",
    "quantiles",
    "rank_heads",
    "rouge1_recall",
    "rouge_tokens",
    "spearman",
    "top_k_heads",
]

Head = tuple[int, int]  # (layer, head), 0-based query heads


# ---- heads, best first -----------------------------------------------------------------------
def rank_heads(grid: Float[Tensor, "layer head"]) -> list[Head]:
    """Every head of ``grid``, highest score first; ties in (layer, head) order; NaN last."""
    if grid.ndim != 2:
        raise ConfigError(f"expected a [layer, head] score grid, got shape {tuple(grid.shape)}")
    n_heads = grid.shape[1]
    flat = grid.detach().flatten().double().cpu()
    flat = torch.where(torch.isnan(flat), torch.full_like(flat, -math.inf), flat)
    # A stable descending sort keeps equal scores in index order, i.e. (layer, head) order.
    order = torch.sort(flat, descending=True, stable=True).indices
    return [(int(i) // n_heads, int(i) % n_heads) for i in order]


def top_k_heads(grid: Float[Tensor, "layer head"], k: int) -> list[Head]:
    """The ``k`` best heads of ``grid`` (see :func:`rank_heads`); ``k`` in [0, heads]."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ConfigError(f"k must be a whole number >= 0, got {k!r}")
    if k > grid.numel():
        raise ConfigError(f"k={k} is larger than the number of heads ({grid.numel()})")
    return rank_heads(grid)[:k]


def heads_above(grid: Float[Tensor, "layer head"], threshold: float) -> list[Head]:
    """Heads scoring strictly above ``threshold``, best first (the paper: 0.1).

    The comparison is made in the grid's own dtype, as ``grid > threshold`` is: a float32
    score of 0.1 is not above 0.1.
    """
    above = grid > threshold
    return [(la, h) for la, h in rank_heads(grid) if bool(above[la, h])]


# ---- resampling -------------------------------------------------------------------------------
def bootstrap_means(values: Float[Tensor, "n ..."], n_boot: int = 1000,
                    seed: int = 0) -> Float[Tensor, "boot ..."]:
    """Means over ``n_boot`` resamples (with replacement) of the first axis of ``values``.

    A resample's mean is a weighted sum: counts ``[boot, n]`` @ values ``[n, rest]``, so the
    memory is that of the counts, not ``boot x n x rest``. Deterministic for a seed.
    """
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise ConfigError(f"n_boot must be a positive whole number, got {n_boot!r}")
    n = values.shape[0]
    if n == 0:
        raise ConfigError("nothing to resample: no values")
    g = torch.Generator().manual_seed(int(seed))
    idx = torch.randint(0, n, (n_boot, n), generator=g)
    counts = torch.zeros(n_boot, n, dtype=torch.float64).scatter_add_(
        1, idx, torch.ones(n_boot, n, dtype=torch.float64))
    flat = values.detach().cpu().double().reshape(n, -1)
    out = counts @ flat / n
    return out.reshape(n_boot, *values.shape[1:]).to(values.dtype if values.is_floating_point()
                                                      else torch.float64)


def quantiles(x: Float[Tensor, "sample ..."], qs: Sequence[float]) -> Float[Tensor, "q ..."]:
    """Linear-interpolation quantiles along dim 0 (by sorting: no size limit)."""
    ordered = torch.sort(x, dim=0).values
    n = ordered.shape[0]
    out = []
    for q in qs:
        if not 0 <= q <= 1:
            raise ConfigError(f"quantiles lie in [0, 1], got {q}")
        pos = q * (n - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        frac = pos - lo
        out.append(ordered[lo] * (1 - frac) + ordered[hi] * frac)
    return torch.stack(out)


def percentile_interval(samples: Float[Tensor, "sample ..."],
                        level: float = 0.95) -> tuple[Tensor, Tensor]:
    """The central ``level`` interval of bootstrap ``samples`` (percentile method)."""
    if not 0 < level < 1:
        raise ConfigError(f"level must be in (0, 1), got {level}")
    a = (1 - level) / 2
    lo, hi = quantiles(samples, (a, 1 - a))
    return lo, hi


def interval(samples: Float[Tensor, " sample"], level: float = 0.95, digits: int = 3) -> list[float]:
    """:func:`percentile_interval` of one quantity as ``[lo, hi]``, rounded to ``digits``."""
    lo, hi = percentile_interval(samples, level)
    return [round(float(lo), digits), round(float(hi), digits)]


def paired_gaps(scores: Float[Tensor, "item policy"], policy: int, *, full: int = 0,
                streaming: int | None = None, random: Sequence[int] = (), n_boot: int = 1000,
                seed: int = 0, level: float = 0.95) -> dict[str, Any]:
    """A policy's mean score against the full cache's, StreamingLLM's and random heads', with
    paired bootstrap intervals: every column resampled with the same items (the rows).

    ``scores``: one row per item (probe), one column per policy; ``policy``, ``full``,
    ``streaming`` and ``random`` (the random seeds' columns, averaged) index its columns.
    Returns ``score``, ``full``, ``vs_full`` (ratio of the means) and ``vs_full_ci``; with
    ``streaming``, ``streaming``, ``gap_streaming`` and its ``_ci``; with ``random``,
    ``random_mean``, ``gap_random`` and its ``_ci``, and ``random_seeds``. The resamples
    depend only on the number of rows, ``n_boot`` and ``seed``: calls on other columns of the
    same items resample alike.
    """
    if scores.ndim != 2:
        raise ConfigError(f"scores are [item, policy], got shape {tuple(scores.shape)}")
    boot = bootstrap_means(scores, n_boot=n_boot, seed=seed)  # [boot, policy]
    mean = scores.double().mean(0)
    x = boot[:, policy]
    out: dict[str, Any] = {"score": float(mean[policy]), "full": float(mean[full]),
                           "vs_full": float(mean[policy] / mean[full]),
                           "vs_full_ci": interval(x / boot[:, full], level)}
    if streaming is not None:
        out["streaming"] = float(mean[streaming])
        out["gap_streaming"] = float(mean[policy] - mean[streaming])
        out["gap_streaming_ci"] = interval(x - boot[:, streaming], level)
    if len(random):
        cols = list(random)
        out["random_mean"] = float(mean[cols].mean())
        out["gap_random"] = float(mean[policy] - mean[cols].mean())
        out["gap_random_ci"] = interval(x - boot[:, cols].mean(1), level)
        out["random_seeds"] = len(cols)
    return out


# ---- agreement --------------------------------------------------------------------------------
def pearson(x: Float[Tensor, " n"], y: Float[Tensor, " n"]) -> float:
    """Pearson correlation; NaN when either vector is constant (correlation undefined)."""
    x, y = x.double(), y.double()
    x, y = x - x.mean(), y - y.mean()
    denom = float(x.norm() * y.norm())
    if denom == 0.0 or not math.isfinite(denom):
        return float("nan")
    return float((x * y).sum()) / denom


def average_ranks(x: Float[Tensor, " n"]) -> Float[Tensor, " n"]:
    """1-based ranks, tied values sharing the average of their ranks (as Spearman needs)."""
    n = x.shape[0]
    order = torch.sort(x, stable=True).indices
    ordered = x[order]
    starts = torch.ones(n, dtype=torch.bool)
    starts[1:] = ordered[1:] != ordered[:-1]
    group = torch.cumsum(starts.long(), 0) - 1
    n_groups = int(group[-1]) + 1 if n else 0
    position = torch.arange(1, n + 1, dtype=torch.float64)
    sums = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, group, position)
    sizes = torch.bincount(group, minlength=n_groups).double()
    ranks = torch.empty(n, dtype=torch.float64)
    ranks[order] = (sums / sizes)[group]
    return ranks


def spearman(x: Float[Tensor, " n"], y: Float[Tensor, " n"]) -> float:
    """Spearman rank correlation with average ranks for ties (no scipy needed).

    Ties matter for retrieval scores: most heads score exactly 0 on every probe.
    """
    return pearson(average_ranks(x.double()), average_ranks(y.double()))


def jaccard(a: Sequence[Head], b: Sequence[Head]) -> float:
    """|A ∩ B| / |A ∪ B| of two head sets (1.0 for two empty sets)."""
    sa, sb = {tuple(h) for h in a}, {tuple(h) for h in b}
    union = sa | sb
    return 1.0 if not union else len(sa & sb) / len(union)


# ---- ROUGE -----------------------------------------------------------------------------------
# Scripts written without spaces between words: one token per character.
_UNSPACED = re.compile(r"([\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f])")
_WORD = re.compile(r"[^\W_]+|[^\w\s]")  # words, and single characters that are not words


def _kept(tok: str) -> bool:
    """A word, or a symbol outside ASCII (an emoji, an arrow, a currency sign): its own token.
    ASCII punctuation is dropped, as rouge-score drops it."""
    if len(tok) > 1 or tok.isalnum():
        return True
    return not tok.isascii() and unicodedata.category(tok).startswith("S")


@cache
def _stemmer():
    from nltk.stem import porter  # what rouge-score's default tokenizer stems with

    return porter.PorterStemmer()


def rouge_tokens(text: str) -> list[str]:
    """ROUGE tokens of ``text``: lower-cased words of any script, Porter-stemmed when they
    are ASCII and longer than 3 letters (exactly rouge-score's tokens for ASCII text), and
    each symbol outside ASCII (emoji, arrows, math and currency signs) as a token of its own,
    so that an answer made only of symbols can match."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = _UNSPACED.sub(r" \1 ", text)
    out = []
    for tok in _WORD.findall(text):
        if not _kept(tok):
            continue
        if tok.isascii() and len(tok) > 3:
            tok = _stemmer().stem(tok)
        out.append(tok)
    return out


def rouge1_recall(reference: str, response: str) -> float:
    """ROUGE-1 recall of ``response`` against ``reference``: the share of the reference's
    tokens (with multiplicity) that the response contains (the paper's success metric)."""
    ref = Counter(rouge_tokens(reference))
    if not ref:
        return 0.0
    got = Counter(rouge_tokens(response))
    return sum(min(c, got[t]) for t, c in ref.items()) / sum(ref.values())


def random_heads(n_layers: int, n_heads: int, k: int, *, seed: int = 0,
                 exclude: Sequence[Head] | None = None) -> list[Head]:
    """``k`` distinct (layer, head) pairs drawn uniformly from the model's real grid.

    Heads in ``exclude`` (typically the top retrieval heads) are never drawn. The same seed
    gives the same heads. (The paper's code drew from a hard-coded 32 x 32 grid.)
    """
    banned = {tuple(h) for h in (exclude or [])}
    pool = [(la, h) for la in range(n_layers) for h in range(n_heads) if (la, h) not in banned]
    if not 0 <= k <= len(pool):
        raise ConfigError(f"cannot draw {k} random heads: {len(pool)} heads are available "
                          f"({n_layers}x{n_heads} grid, {len(banned)} excluded)")
    return sorted(random.Random(seed).sample(pool, k))
