"""Stability (beyond the paper): bootstrap intervals of the head scores, and how many probes
it takes before the top-K set stops changing."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from einops import reduce
from jaxtyping import Float, Int
from torch import Tensor

from rhlens import stats
from rhlens.errors import ConfigError
from rhlens.properties.common import (
    RETRIEVAL_THRESHOLD,
    bundle_doc,
    check_k,
    check_positive_int,
    check_threshold,
    successful,
)
from rhlens.retrieval.scores import Head, RetrievalScores
from rhlens.stats import top_k_heads
from rhlens.store.results import Result

__all__ = ["StabilityResult", "stability"]


@dataclass
class StabilityResult(Result):
    """How much the head scores and the top-K set depend on which probes were run.

    Attributes:
        model_name: the model.
        k: size of the top-K set whose stability the curve measures.
        n_boot, seed, repeats, level, threshold, target: the settings used.
        n_probes: number of successful probes.
        mean: per head, the retrieval score on all successful probes.
        ci_low, ci_high: per head, the bootstrap percentile interval of the score.
        n_retrieval: number of heads above ``threshold`` on all probes.
        n_retrieval_ci: bootstrap percentile interval of that number.
        top: the top-K heads on all probes.
        steps: probe counts of the subsampling curve.
        jaccard_mean, jaccard_std: over ``repeats`` subsamples of each size, the Jaccard
            overlap between the subsample's top-K and :attr:`top`.
        probes_needed: smallest step whose mean Jaccard reaches ``target``, or ``None``.
    """

    model_name: str
    k: int
    n_boot: int
    seed: int
    repeats: int
    level: float
    threshold: float
    target: float
    n_probes: int
    mean: Float[Tensor, "layer head"]
    ci_low: Float[Tensor, "layer head"]
    ci_high: Float[Tensor, "layer head"]
    n_retrieval: int
    n_retrieval_ci: tuple[float, float]
    top: list[Head]
    steps: Int[Tensor, " step"]
    jaccard_mean: Float[Tensor, " step"]
    jaccard_std: Float[Tensor, " step"]
    probes_needed: int | None

    def to_dataframe(self):
        """The subsampling curve: one row per probe count."""
        import pandas as pd

        return pd.DataFrame({"n_probes": self.steps.tolist(),
                             "jaccard_mean": self.jaccard_mean.tolist(),
                             "jaccard_std": self.jaccard_std.tolist()})

    def heads_dataframe(self, k: int | None = None):
        """The top heads (``k``, default :attr:`k`) with their bootstrap intervals."""
        import pandas as pd

        k = self.k if k is None else k
        return pd.DataFrame([{
            "layer": la, "head": h, "score": float(self.mean[la, h]),
            "ci_low": float(self.ci_low[la, h]), "ci_high": float(self.ci_high[la, h]),
        } for la, h in top_k_heads(self.mean, min(k, self.mean.numel()))])

    @classmethod
    def upgrade(cls, doc: dict[str, Any], version: int, directory: Path) -> dict[str, Any]:
        """Schema 0: ``meta.json`` (settings, counts, top) + ``tensors.safetensors``."""
        if version != 0:
            return super().upgrade(doc, version, directory)
        return bundle_doc(cls, doc, directory, ("mean", "ci_low", "ci_high", "steps",
                                                  "jaccard_mean", "jaccard_std"))


def _default_steps(n: int, n_points: int = 12) -> list[int]:
    """Roughly log-spaced probe counts from 1 to ``n``, always ending at ``n``."""
    if n == 1:
        return [1]
    grid = torch.logspace(0, math.log10(n), n_points, dtype=torch.float64).round().long()
    return sorted({int(x) for x in grid.clamp(1, n)} | {n})


def stability(scores: RetrievalScores, k: int = 10, n_boot: int = 1000, seed: int = 0,
              steps: Sequence[int] | None = None, repeats: int = 20,
              threshold: float = RETRIEVAL_THRESHOLD, level: float = 0.95,
              target: float = 0.9) -> StabilityResult:
    """Bootstrap intervals on the scores, and how many probes it takes to fix the top-K.

    The paper reports point estimates. Before trusting a head list from a few hundred
    probes (or from the few dozen a laptop run affords), it helps to know how wide each
    score's interval is, how uncertain the count of retrieval heads is, and from how many
    probes on the top-K set stops changing.

    Args:
        scores: per-probe scores of one model.
        k: size of the top-K set followed by the subsampling curve.
        n_boot: bootstrap resamples of the successful probes (with replacement). The draws
            are the same as :meth:`RetrievalScores.bootstrap` with the same ``seed``, but
            the means are computed as a (resample x probe) count matrix times the scores,
            which never holds ``n_boot`` copies of the per-probe tensor in memory.
        seed: seeds both the bootstrap and the subsampling (each on its own generator).
        steps: probe counts for the curve (each in ``1..n_successful``); by default about
            a dozen log-spaced counts ending at all successful probes.
        repeats: random subsets (without replacement) drawn per step.
        threshold: score above which a head is a retrieval head.
        level: coverage of the percentile intervals.
        target: Jaccard overlap that counts as "stable" for :attr:`probes_needed`.
    """
    ok = successful(scores)
    n, n_layers, n_heads = ok.shape
    k = check_k(k, n_layers * n_heads)
    check_positive_int(n_boot, "n_boot")
    check_positive_int(repeats, "repeats")
    threshold = check_threshold(threshold, "threshold")
    if not 0.0 < level < 1.0:
        raise ConfigError(f"level must be in (0, 1), got {level!r}")
    if not 0.0 < target <= 1.0:
        raise ConfigError(f"target must be in (0, 1], got {target!r}")
    if steps is None:
        step_list = _default_steps(n)
    else:
        step_list = sorted({int(s) for s in steps})
        if not step_list or step_list[0] < 1 or step_list[-1] > n:
            raise ConfigError(f"steps must be probe counts between 1 and the {n} successful "
                              f"probes, got {list(steps)!r}")

    mean = ok.mean(0)  # as RetrievalScores.mean: the same top-K, the same ties
    top = top_k_heads(mean, k)

    # bootstrap of the successful probes: each head's interval, and that of the count
    boot = stats.bootstrap_means(ok.double(), n_boot, seed)  # [boot, layer, head]
    lo, hi = stats.percentile_interval(boot, level)
    n_ret = reduce((boot > threshold).double(), "boot layer head -> boot", "sum")
    n_lo, n_hi = stats.percentile_interval(n_ret, level)

    # subsampling curve: top-K on m probes (drawn without replacement) vs top-K on all
    g_sub = torch.Generator().manual_seed(seed + 1)
    j_mean, j_std = [], []
    for m in step_list:
        values = []
        for _ in range(repeats):
            pick = torch.randperm(n, generator=g_sub)[:m].sort().values
            values.append(stats.jaccard(top_k_heads(ok[pick].mean(0), k), top))
        v = torch.tensor(values, dtype=torch.float64)
        j_mean.append(float(v.mean()))
        j_std.append(float(v.std(correction=0)))
    needed = next((m for m, j in zip(step_list, j_mean) if j >= target - 1e-12), None)

    return StabilityResult(
        model_name=scores.model_name, k=k, n_boot=n_boot, seed=seed, repeats=repeats,
        level=level, threshold=threshold, target=target, n_probes=n,
        mean=mean.float(), ci_low=lo.float(), ci_high=hi.float(),
        n_retrieval=len(stats.heads_above(mean, threshold)),
        n_retrieval_ci=(float(n_lo), float(n_hi)),
        top=top, steps=torch.tensor(step_list, dtype=torch.long),
        jaccard_mean=torch.tensor(j_mean, dtype=torch.float32),
        jaccard_std=torch.tensor(j_std, dtype=torch.float32), probes_needed=needed,
    )
