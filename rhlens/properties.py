"""The paper's properties of retrieval heads, each as one analysis with a typed, saveable result.

Wu et al. (2024) characterise retrieval heads by a handful of properties, and each function
here turns :class:`~rhlens.scores.RetrievalScores` into the numbers behind one of them:

- :func:`sparse` - only a few percent of heads score above 0.1;
- :func:`universal` - every model family has them (one table row per model);
- :func:`intrinsic` - a chat or MoE variant inherits its base model's retrieval heads;
- :func:`dynamic` - some heads fire on every probe, others only in some contexts;
- :func:`stability` - (beyond the paper) how much the scores and the top-K set move when
  the probes are resampled, and how many probes it takes to pin the top-K down.

Only successful probes count, as in the paper (:attr:`RetrievalScores.successful`).
Analyses never print or plot; figures live in :mod:`rhlens.plotting.properties`.
"""

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
from rhlens.results import Config, Result, ResultError, read_json
from rhlens.scores import Head, RetrievalScores

__all__ = [
    "DynamicResult",
    "IntrinsicResult",
    "PropertySettings",
    "SparsityResult",
    "StabilityResult",
    "UniversalRow",
    "UniversalTable",
    "detection_properties",
    "dynamic",
    "intrinsic",
    "jaccard",
    "pearson",
    "sparse",
    "spearman",
    "stability",
    "top_k_heads",
    "universal",
]

RETRIEVAL_THRESHOLD = 0.1  # the paper's cut between retrieval heads and the rest

# The one home of each rule is rhlens.stats; these names stay importable from here.
top_k_heads = stats.top_k_heads
jaccard = stats.jaccard
pearson = stats.pearson
spearman = stats.spearman


# ---- shared helpers ---------------------------------------------------------------------------
def _successful(scores: RetrievalScores) -> Float[Tensor, "success layer head"]:
    """The successful probes, refusing score sets where no retrieval score is defined."""
    if scores.n_layers == 0 or scores.n_heads == 0:
        raise ConfigError(f"scores of {scores.model_name!r} have an empty "
                          f"{scores.n_layers}x{scores.n_heads} head grid")
    if scores.n_successful == 0:
        raise ConfigError(f"scores of {scores.model_name!r} have no successful probe "
                          f"(0 of {scores.n_probes}); the properties are defined on answered "
                          "probes only")
    return scores.successful


def _check_threshold(value: float, name: str) -> float:
    """Thresholds are score levels: finite and non-negative (scores are never below 0)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _check_k(k: int, n_cells: int, name: str = "k") -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"{name} must be a positive integer, got {k!r}")
    if k > n_cells:
        raise ConfigError(f"{name}={k} is larger than the number of heads ({n_cells})")
    return k


def _check_positive_int(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return value


def _heads_in_order(mask: Tensor, mean: Float[Tensor, "layer head"]) -> list[Head]:
    """Heads where ``mask`` holds, best mean score first (the one ranking rule)."""
    return [(la, h) for la, h in stats.rank_heads(mean) if bool(mask[la, h])]


def _bundle_doc(cls: type[Result], doc: dict[str, Any], directory: Path,
                tensors: Sequence[str]) -> dict[str, Any]:
    """A schema-0 result (``meta.json`` + ``tensors.safetensors``, each field in one of
    them under its own name) as a current document."""
    meta = {k: v for k, v in doc["meta"].items() if k != "kind"}
    missing = [f for f in cls.__dataclass_fields__ if f not in meta and f not in tensors]
    if missing:
        raise ResultError(f"{directory}/meta.json lacks {', '.join(missing)} (damaged?)")
    return {"kind": cls.kind, "schema_version": cls.schema_version,
            "fields": {**meta, **{name: {"__tensor__": name} for name in tensors}}}


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
        return _bundle_doc(cls, doc, directory, ("mean", "counts", "fractions", "per_layer",
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
    ok = _successful(scores)
    if isinstance(thresholds, (str, bytes)) or len(thresholds) == 0:
        raise ConfigError(f"thresholds must be a non-empty sequence of numbers, got {thresholds!r}")
    ts = tuple(_check_threshold(t, "every threshold") for t in thresholds)
    _check_positive_int(bins, "bins")
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
        directory = Path(directory)
        legacy = directory / "universal.json"
        if not (directory / "result.json").exists() and legacy.is_file():
            data = read_json(legacy, "universal.json")
            if not isinstance(data, dict) or data.get("kind") != "UniversalTable":
                raise ResultError(f"{legacy} holds no UniversalTable")
            return cls._from_doc(cls.upgrade({"meta": data}, 0, directory), directory)
        return super().load(directory)

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
    threshold = _check_threshold(threshold, "threshold")
    _check_positive_int(top_k, "top_k")
    rows = []
    for scores in score_sets:
        mean = _successful(scores).mean(0)
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
        return _bundle_doc(cls, doc, directory, ("mean_a", "mean_b"))


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
    mean_a, mean_b = _successful(a).mean(0), _successful(b).mean(0)
    k = _check_k(k, mean_a.numel())
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
        return _bundle_doc(cls, doc, directory, ("active_fraction", "mean"))


def dynamic(scores: RetrievalScores, active_threshold: float = 0.0,
            retrieval_threshold: float = RETRIEVAL_THRESHOLD) -> DynamicResult:
    """Split retrieval heads into always-on ones and context-dependent ones.

    The paper observes that a few heads (12 in Llama-2-7B-80K) copy on every probe whatever
    the context, while other retrieval heads only activate in some contexts. A head counts
    as active on a probe when its score there is strictly above ``active_threshold``.
    """
    ok = _successful(scores)
    active_threshold = _check_threshold(active_threshold, "active_threshold")
    retrieval_threshold = _check_threshold(retrieval_threshold, "retrieval_threshold")
    active = ok > active_threshold
    fraction = active.double().mean(0).float()
    mean = ok.mean(0)
    always = active.all(0)
    context = (mean > retrieval_threshold) & active.any(0) & ~always
    return DynamicResult(
        model_name=scores.model_name, active_threshold=active_threshold,
        retrieval_threshold=retrieval_threshold, n_probes=ok.shape[0],
        active_fraction=fraction, mean=mean,
        always_active=_heads_in_order(always, mean),
        context_dependent=_heads_in_order(context, mean),
    )


# ---- stability (beyond the paper) ---------------------------------------------------------------
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
        return _bundle_doc(cls, doc, directory, ("mean", "ci_low", "ci_high", "steps",
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
    ok = _successful(scores)
    n, n_layers, n_heads = ok.shape
    k = _check_k(k, n_layers * n_heads)
    _check_positive_int(n_boot, "n_boot")
    _check_positive_int(repeats, "repeats")
    threshold = _check_threshold(threshold, "threshold")
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


# ---- what a detection run saves ---------------------------------------------------------------
@dataclass(frozen=True)
class PropertySettings(Config):
    """Settings of the properties saved next to a detection run's scores (each saved result
    records its own settings as well)."""

    thresholds: tuple[float, ...] = (0.1, 0.5)
    bins: int = 40
    active_threshold: float = 0.0
    retrieval_threshold: float = RETRIEVAL_THRESHOLD
    k: int = 10
    n_boot: int = 1000
    repeats: int = 20
    seed: int = 0
    level: float = 0.95
    target: float = 0.9

    def __post_init__(self) -> None:
        object.__setattr__(self, "thresholds", tuple(self.thresholds))
        if not self.thresholds:
            raise ConfigError("thresholds must not be empty")
        for t in (*self.thresholds, self.active_threshold, self.retrieval_threshold):
            _check_threshold(t, "every threshold")
        for name in ("bins", "k", "n_boot", "repeats"):
            _check_positive_int(getattr(self, name), name)
        if not 0.0 < self.level < 1.0 or not 0.0 < self.target <= 1.0:
            raise ConfigError(f"level must be in (0, 1) and target in (0, 1], got "
                              f"{self.level}, {self.target}")


def detection_properties(scores: RetrievalScores,
                         settings: PropertySettings | None = None) -> dict[str, Result]:
    """Sparse, dynamic and stability of one score set: what a run's report shows.

    Empty when no probe succeeded (no property is defined); stability needs two successful
    probes to resample; ``k`` is capped at the number of heads.
    """
    settings = settings or PropertySettings()
    if scores.n_successful == 0:
        return {}
    out: dict[str, Result] = {
        "sparse": sparse(scores, settings.thresholds, settings.bins),
        "dynamic": dynamic(scores, settings.active_threshold, settings.retrieval_threshold),
    }
    if scores.n_successful >= 2:
        out["stability"] = stability(
            scores, k=min(settings.k, scores.n_layers * scores.n_heads), n_boot=settings.n_boot,
            seed=settings.seed, repeats=settings.repeats, threshold=settings.retrieval_threshold,
            level=settings.level, target=settings.target)
    return out
