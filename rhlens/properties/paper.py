"""The paper's four properties of retrieval heads (Wu et al., 2024), each an analysis with a
saved result: sparse, universal, intrinsic, dynamic."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from einops import rearrange, reduce
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
    heads_in_order,
    successful,
)
from rhlens.retrieval.scores import Head, RetrievalScores
from rhlens.stats import top_k_heads
from rhlens.store.results import Config, Result, ResultError
from rhlens.store.runs import load_single_file

__all__ = [
    "DynamicResult",
    "IntrinsicResult",
    "SparsityResult",
    "UniversalRow",
    "UniversalTable",
    "dynamic",
    "intrinsic",
    "sparse",
    "universal",
]


# ---- sparse -----------------------------------------------------------------------------------
@dataclass
class SparsityResult(Result):
    """How few heads are retrieval heads: counts above thresholds, a histogram, counts per layer.

    Attributes:
        model_name: the model the scores belong to.
        thresholds: the score levels counted (0.1 is the paper's).
        mean: each head's retrieval score (mean over successful probes).
        counts: number of heads scoring above each threshold.
        fractions: the same as a fraction of all heads.
        per_layer: number of heads above each threshold in each layer.
        hist_counts: histogram of the head scores.
        hist_edges: the histogram's bin edges (one more than bins).
        n_probes: number of successful probes the means come from.
    """

    model_name: str
    thresholds: tuple[float, ...]
    mean: Float[Tensor, "layer head"]
    counts: Int[Tensor, " threshold"]
    fractions: Float[Tensor, " threshold"]
    per_layer: Int[Tensor, "threshold layer"]
    hist_counts: Int[Tensor, " bin"]
    hist_edges: Float[Tensor, " edge"]
    n_probes: int

    @property
    def n_total(self) -> int:
        return self.mean.numel()

    def fraction(self, threshold: float) -> float:
        """The fraction above one of the computed thresholds."""
        for i, t in enumerate(self.thresholds):
            if math.isclose(t, threshold):
                return float(self.fractions[i])
        raise ConfigError(f"threshold {threshold} was not computed; have {list(self.thresholds)}")

    def to_dataframe(self):
        """One row per threshold: count and fraction of heads above it."""
        import pandas as pd

        return pd.DataFrame({
            "model": self.model_name,
            "threshold": list(self.thresholds),
            "n_above": [int(c) for c in self.counts],
            "fraction_above": [float(f) for f in self.fractions],
            "n_heads": self.n_total,
        })

    def per_layer_dataframe(self):
        """One row per layer, one column per threshold: heads above it in that layer."""
        import pandas as pd

        data = {f"above_{t:g}": self.per_layer[i].tolist() for i, t in enumerate(self.thresholds)}
        return pd.DataFrame({"layer": list(range(self.mean.shape[0])), **data})

    @classmethod
    def upgrade(cls, doc: dict[str, Any], version: int, directory: Path) -> dict[str, Any]:
        """Schema 0: ``meta.json`` + ``tensors.safetensors``, fields split between them."""
        if version != 0:
            return super().upgrade(doc, version, directory)
        return bundle_doc(cls, doc, directory, ("mean", "counts", "fractions", "per_layer",
                                                  "hist_counts", "hist_edges"))


def sparse(scores: RetrievalScores, thresholds: Sequence[float] = (0.1, 0.5),
           bins: int = 40) -> SparsityResult:
    """Count the heads above each threshold: the paper's "fewer than 5% of heads" claim.

    Args:
        scores: per-probe scores of one model.
        thresholds: score levels to count heads above (strictly greater, as in the paper).
        bins: histogram bins over ``[0, max(1, highest score)]`` (scores can exceed 1
            with the paper's scoring rule, so the range stretches to hold them).
    """
    ok = successful(scores)
    if isinstance(thresholds, (str, bytes)) or len(thresholds) == 0:
        raise ConfigError(f"thresholds must be a non-empty sequence of numbers, got {thresholds!r}")
    ts = tuple(check_threshold(t, "every threshold") for t in thresholds)
    check_positive_int(bins, "bins")
    mean = ok.mean(0)
    above = torch.stack([mean > t for t in ts]).long()
    counts = reduce(above, "threshold layer head -> threshold", "sum")
    hi = max(1.0, float(mean.max()))
    hist, edges = torch.histogram(mean.flatten().float(), bins=bins, range=(0.0, hi))
    return SparsityResult(
        model_name=scores.model_name, thresholds=ts, mean=mean,
        counts=counts, fractions=counts.double() / mean.numel(),
        per_layer=reduce(above, "threshold layer head -> threshold layer", "sum"),
        hist_counts=hist.long(), hist_edges=edges,
        n_probes=ok.shape[0],
    )


# ---- universal --------------------------------------------------------------------------------
@dataclass(frozen=True)
class UniversalRow(Config):
    """One model's line of the universality table (a frozen value: it saves as a Config)."""

    model: str
    n_layers: int
    n_heads: int
    n_probes: int
    n_retrieval: int
    top: tuple[tuple[int, int, float], ...]

    @property
    def percent_retrieval(self) -> float:
        return 100.0 * self.n_retrieval / (self.n_layers * self.n_heads)


@dataclass
class UniversalTable(Result):
    """Retrieval heads exist in every model family: one row per model, comparable at a glance."""

    rows: list[UniversalRow]
    threshold: float
    top_k: int

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame([{
            "model": r.model, "layers": r.n_layers, "heads": r.n_heads, "probes": r.n_probes,
            "n_retrieval": r.n_retrieval, "percent_retrieval": r.percent_retrieval,
            "top_heads": ", ".join(f"L{la}H{h}" for la, h, _ in r.top),
            "top_scores": [s for _, _, s in r.top],
        } for r in self.rows])

    def to_markdown(self) -> str:
        """A GitHub Markdown table (written by hand: pandas needs ``tabulate`` for this)."""
        head = ["model", "layers x heads", "probes", f"retrieval heads (>{self.threshold:g})",
                "% of heads", f"top-{self.top_k} heads (score)"]
        lines = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
        for r in self.rows:
            top = ", ".join(f"L{la}H{h} ({s:.2f})" for la, h, s in r.top)
            cells = [r.model, f"{r.n_layers} x {r.n_heads}", str(r.n_probes),
                     str(r.n_retrieval), f"{r.percent_retrieval:.1f}%", top]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    @classmethod
    def load(cls, directory: str | Path) -> UniversalTable:
        """A saved table; also the ``universal.json`` of older rhlens versions (schema 0)."""
        return load_single_file(cls, directory, "universal.json") or super().load(directory)

    @classmethod
    def upgrade(cls, doc: dict[str, Any], version: int, directory: Path) -> dict[str, Any]:
        """Schema 0: ``universal.json`` with rows as plain objects."""
        if version != 0:
            return super().upgrade(doc, version, directory)
        data = doc["meta"]
        try:
            rows = [{"__config__": {"type": "UniversalRow", **r}} for r in data["rows"]]
            fields = {"rows": rows, "threshold": data["threshold"], "top_k": data["top_k"]}
        except (KeyError, TypeError) as exc:
            raise ResultError(f"{directory}/universal.json is damaged ({exc!r})") from exc
        return {"kind": cls.kind, "schema_version": cls.schema_version, "fields": fields}


def universal(score_sets: list[RetrievalScores], threshold: float = RETRIEVAL_THRESHOLD,
              top_k: int = 5) -> UniversalTable:
    """Tabulate retrieval heads across models, to show every family has a few of them."""
    if len(score_sets) == 0:
        raise ConfigError("universal() needs at least one set of scores")
    threshold = check_threshold(threshold, "threshold")
    check_positive_int(top_k, "top_k")
    rows = []
    for scores in score_sets:
        mean = successful(scores).mean(0)
        k = min(top_k, mean.numel())
        top = tuple((la, h, float(mean[la, h])) for la, h in top_k_heads(mean, k))
        rows.append(UniversalRow(model=scores.model_name, n_layers=scores.n_layers,
                                 n_heads=scores.n_heads, n_probes=scores.n_successful,
                                 n_retrieval=len(stats.heads_above(mean, threshold)), top=top))
    return UniversalTable(rows=rows, threshold=threshold, top_k=top_k)


# ---- intrinsic --------------------------------------------------------------------------------
@dataclass
class IntrinsicResult(Result):
    """Whether two models (a base and its variant) share retrieval heads.

    Attributes:
        model_a, model_b: the two models.
        mean_a, mean_b: their head scores on the same grid (the scatter plot's axes).
        pearson, spearman: correlation of the flattened score grids (NaN if one is constant).
        k: size of the top-K sets compared.
        top_a, top_b: each model's top-K heads, best first.
        overlap: heads in both top-K sets.
        jaccard: ``overlap / |top_a ∪ top_b|``.
    """

    model_a: str
    model_b: str
    mean_a: Float[Tensor, "layer head"]
    mean_b: Float[Tensor, "layer head"]
    pearson: float
    spearman: float
    k: int
    top_a: list[Head]
    top_b: list[Head]
    overlap: int
    jaccard: float

    @property
    def shared(self) -> list[Head]:
        """Heads in both top-K sets, in model A's order."""
        b = set(self.top_b)
        return [h for h in self.top_a if h in b]

    def pairs(self) -> Float[Tensor, "cell 2"]:
        """``[score_a, score_b]`` per head, row-major over (layer, head): the scatter points."""
        return rearrange(torch.stack([self.mean_a, self.mean_b]), "model layer head -> (layer head) model")

    def to_dataframe(self):
        """One row per head with both scores and top-K membership."""
        import pandas as pd

        n_layers, n_heads = self.mean_a.shape
        ta, tb = set(self.top_a), set(self.top_b)
        return pd.DataFrame([{
            "layer": la, "head": h, "score_a": float(self.mean_a[la, h]),
            "score_b": float(self.mean_b[la, h]), "top_a": (la, h) in ta, "top_b": (la, h) in tb,
        } for la in range(n_layers) for h in range(n_heads)])

    def summary(self) -> dict[str, Any]:
        return {"model_a": self.model_a, "model_b": self.model_b, "pearson": self.pearson,
                "spearman": self.spearman, "k": self.k, "overlap": self.overlap,
                "jaccard": self.jaccard}

    @classmethod
    def upgrade(cls, doc: dict[str, Any], version: int, directory: Path) -> dict[str, Any]:
        """Schema 0: ``meta.json`` (summary, top sets) + ``tensors.safetensors`` (means)."""
        if version != 0:
            return super().upgrade(doc, version, directory)
        return bundle_doc(cls, doc, directory, ("mean_a", "mean_b"))


def intrinsic(a: RetrievalScores, b: RetrievalScores, k: int = 20) -> IntrinsicResult:
    """Compare two models' head scores: the paper's "retrieval heads are intrinsic" property.

    A variant (chat tuning, MoE upcycling, long-context continued pretraining) of a base
    model keeps the base's retrieval heads, so their score grids correlate strongly, while
    unrelated families do not. Both models must have the same (layer, head) grid.
    """
    if (a.n_layers, a.n_heads) != (b.n_layers, b.n_heads):
        raise ConfigError(
            f"cannot compare head scores of different grids: {a.model_name!r} has "
            f"{a.n_layers}x{a.n_heads} heads (layers x heads), {b.model_name!r} has "
            f"{b.n_layers}x{b.n_heads}")
    mean_a, mean_b = successful(a).mean(0), successful(b).mean(0)
    k = check_k(k, mean_a.numel())
    top_a, top_b = top_k_heads(mean_a, k), top_k_heads(mean_b, k)
    cells = rearrange(torch.stack([mean_a, mean_b]), "model layer head -> model (layer head)")
    overlap = len(set(top_a) & set(top_b))
    return IntrinsicResult(
        model_a=a.model_name, model_b=b.model_name, mean_a=mean_a, mean_b=mean_b,
        pearson=stats.pearson(*cells), spearman=stats.spearman(*cells),
        k=k, top_a=top_a, top_b=top_b, overlap=overlap, jaccard=stats.jaccard(top_a, top_b),
    )


# ---- dynamic ----------------------------------------------------------------------------------
@dataclass
class DynamicResult(Result):
    """Which retrieval heads fire on every probe and which depend on the context.

    Attributes:
        model_name: the model.
        active_threshold: a head is active on a probe when its score there exceeds this.
        retrieval_threshold: mean score above which a head is a retrieval head.
        n_probes: number of successful probes.
        active_fraction: per head, fraction of successful probes it is active on.
        mean: per head, the retrieval score.
        always_active: heads active on every successful probe, best mean first.
        context_dependent: retrieval heads active on some probes but not all, best first.
    """

    model_name: str
    active_threshold: float
    retrieval_threshold: float
    n_probes: int
    active_fraction: Float[Tensor, "layer head"]
    mean: Float[Tensor, "layer head"]
    always_active: list[Head] = field(default_factory=list)
    context_dependent: list[Head] = field(default_factory=list)

    def to_dataframe(self):
        """One row per head, best mean score first."""
        import pandas as pd

        always, ctx = set(self.always_active), set(self.context_dependent)
        n_layers, n_heads = self.mean.shape
        df = pd.DataFrame([{
            "layer": la, "head": h, "score": float(self.mean[la, h]),
            "active_fraction": float(self.active_fraction[la, h]),
            "retrieval_head": float(self.mean[la, h]) > self.retrieval_threshold,
            "always_active": (la, h) in always, "context_dependent": (la, h) in ctx,
        } for la in range(n_layers) for h in range(n_heads)])
        return df.sort_values("score", ascending=False, kind="stable", ignore_index=True)

    @classmethod
    def upgrade(cls, doc: dict[str, Any], version: int, directory: Path) -> dict[str, Any]:
        """Schema 0: ``meta.json`` + ``tensors.safetensors`` (active_fraction, mean)."""
        if version != 0:
            return super().upgrade(doc, version, directory)
        return bundle_doc(cls, doc, directory, ("active_fraction", "mean"))


def dynamic(scores: RetrievalScores, active_threshold: float = 0.0,
            retrieval_threshold: float = RETRIEVAL_THRESHOLD) -> DynamicResult:
    """Split retrieval heads into always-on ones and context-dependent ones.

    The paper observes that a few heads (12 in Llama-2-7B-80K) copy on every probe whatever
    the context, while other retrieval heads only activate in some contexts. A head counts
    as active on a probe when its score there is strictly above ``active_threshold``.
    """
    ok = successful(scores)
    active_threshold = check_threshold(active_threshold, "active_threshold")
    retrieval_threshold = check_threshold(retrieval_threshold, "retrieval_threshold")
    active = ok > active_threshold
    fraction = active.double().mean(0).float()
    mean = ok.mean(0)
    always = active.all(0)
    context = (mean > retrieval_threshold) & active.any(0) & ~always
    return DynamicResult(
        model_name=scores.model_name, active_threshold=active_threshold,
        retrieval_threshold=retrieval_threshold, n_probes=ok.shape[0],
        active_fraction=fraction, mean=mean,
        always_active=heads_in_order(always, mean),
        context_dependent=heads_in_order(context, mean),
    )
