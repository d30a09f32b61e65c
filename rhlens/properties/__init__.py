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

Modules: :mod:`~rhlens.properties.paper` (the paper's four), :mod:`~rhlens.properties.resampling`
(stability), :mod:`~rhlens.properties.common` (checks shared by all); here, the settings of
the properties a detection run saves (:func:`detection_properties`).
"""

from __future__ import annotations

from dataclasses import dataclass

from rhlens import stats
from rhlens.errors import ConfigError
from rhlens.properties.common import (
    RETRIEVAL_THRESHOLD,
    check_positive_int,
    check_threshold,
)
from rhlens.properties.paper import (
    DynamicResult,
    IntrinsicResult,
    SparsityResult,
    UniversalRow,
    UniversalTable,
    dynamic,
    intrinsic,
    sparse,
    universal,
)
from rhlens.properties.resampling import StabilityResult, stability
from rhlens.retrieval.scores import RetrievalScores
from rhlens.store.results import Config, Result

__all__ = [
    "RETRIEVAL_THRESHOLD",
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

# The one home of each rule is rhlens.stats; these names stay importable from here.
top_k_heads = stats.top_k_heads
jaccard = stats.jaccard
pearson = stats.pearson
spearman = stats.spearman


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
            check_threshold(t, "every threshold")
        for name in ("bins", "k", "n_boot", "repeats"):
            check_positive_int(getattr(self, name), name)
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
