"""Score families' results: ``FamilyScores`` (one, a ``RetrievalScores``) and ``FamilySet`` (several).

Every family's result *is* a :class:`~rhlens.scores.RetrievalScores` (a subclass that adds
the family's name): per-probe scores ``[probe, layer, head]``, success flags, the mean over
successful probes, ``top_heads`` through :mod:`rhlens.stats`, the paper's JSON export, save
and load. So anything that takes retrieval scores (``mask_sweep``, ``cot_ablation``,
``patching_vs_retrieval``, ``--scores`` of the CLI) takes any family's, and a report or a
notebook tells them apart by ``family``. Subclassing rather than tagging plain
``RetrievalScores``: a run folder's detection scores stay the only ``RetrievalScores`` in
it (:func:`rhlens.store.runs.read_run` finds results by kind), and a family's scores cannot be
mistaken for the paper's when loaded back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from rhlens.errors import ConfigError
from rhlens.retrieval import DetectConfig
from rhlens.retrieval.scores import RetrievalScores
from rhlens.stats import Head, spearman, top_k_heads
from rhlens.store.results import Config, Result
from rhlens.validate import DRAWS_WHY, MAX_DRAWS, check_count

__all__ = [
    "DETECTOR_FAMILIES",
    "FAMILIES",
    "PROBE_FAMILIES",
    "FamiliesConfig",
    "FamilyScores",
    "FamilySet",
    "check_families",
]

# What each family measures (the report and --help say it in these words).
FAMILIES: dict[str, str] = {
    "copy": "the paper's retrieval score: needle tokens a head's top-1 attention copies while the "
            "model answers, distinct tokens / needle length",
    "copy-paper": "the same, as the authors' code counts it (+1/length at every copying step)",
    "mass": "attention weight on the needle's answer span at the answer's decode steps, averaged "
            "over steps (HeadKV's retrieval-reasoning flavour)",
    "query": "attention weight on the needle sentence from the question's tokens at the end of "
             "the prompt, averaged over them (QRHead-style, query-focused)",
    "induction": "TransformerLens' induction-head detector on repeated random tokens",
    "previous-token": "TransformerLens' previous-token-head detector on repeated random tokens",
    "duplicate-token": "TransformerLens' duplicate-token-head detector on repeated random tokens",
}
PROBE_FAMILIES = ("copy", "copy-paper", "mass", "query")
DETECTOR_FAMILIES = ("induction", "previous-token", "duplicate-token")


def check_families(families: Sequence[str]) -> tuple[str, ...]:
    """``families`` as a tuple of known, distinct names (a one-line error otherwise)."""
    if isinstance(families, str):
        families = [f.strip() for f in families.split(",")]
    out = tuple(families)
    if not out:
        raise ConfigError(f"no score family given; known: {', '.join(FAMILIES)}")
    unknown = [f for f in out if f not in FAMILIES]
    if unknown:
        raise ConfigError(f"unknown score family {', '.join(map(repr, unknown))}; known: "
                          f"{', '.join(FAMILIES)}")
    twice = sorted({f for f in out if out.count(f) > 1})
    if twice:
        raise ConfigError(f"score family given twice: {', '.join(twice)}")
    return out


@dataclass(frozen=True)
class FamiliesConfig(Config):
    """Settings of :func:`rhlens.families.score_families`.

    Attributes:
        families: which families (names of :data:`FAMILIES`).
        detect: the decode pass (answers, success threshold, batching); its ``mode`` is not
            used: both copy counts are kept (``copy`` and ``copy-paper``).
        answers: ``"model"`` (the paper's): copy and mass at the model's own greedy answer,
            means over the probes it answers correctly; ``"reference"``: the needle's answer
            tokens teacher-forced after the prompt, every probe counted (scores exist where
            the model fails, e.g. on non-literal questions).
        mass_span: where ``mass`` looks: the answer's tokens or the whole needle sentence.
        query_span: where ``query`` looks (default the needle sentence, the question's topic).
        n_sequences, sequence_length, sequence_seed: the detectors' synthetic input (random
            words repeated once).
    """

    families: tuple[str, ...] = tuple(FAMILIES)
    detect: DetectConfig = field(default_factory=DetectConfig)
    answers: Literal["model", "reference"] = "model"
    mass_span: Literal["answer", "needle"] = "answer"
    query_span: Literal["answer", "needle"] = "needle"
    n_sequences: int = 8
    sequence_length: int = 40
    sequence_seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "families", check_families(self.families))
        if not isinstance(self.detect, DetectConfig):
            raise ConfigError(f"detect must be a DetectConfig, got {type(self.detect).__name__}")
        if self.answers not in ("model", "reference"):
            raise ConfigError(f"answers must be 'model' or 'reference', got {self.answers!r}")
        for name in ("mass_span", "query_span"):
            if getattr(self, name) not in ("answer", "needle"):
                raise ConfigError(f"{name} must be 'answer' or 'needle', got {getattr(self, name)!r}")
        for name, low in (("n_sequences", 1), ("sequence_length", 2), ("sequence_seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{name} must be a whole number >= {low}, got {value!r}")
        check_count(self.n_sequences, "n_sequences", maximum=MAX_DRAWS, why=DRAWS_WHY)

    @property
    def probe_families(self) -> tuple[str, ...]:
        return tuple(f for f in self.families if f in PROBE_FAMILIES)

    @property
    def detector_families(self) -> tuple[str, ...]:
        return tuple(f for f in self.families if f in DETECTOR_FAMILIES)


@dataclass
class FamilyScores(RetrievalScores):
    """One score family's per-probe scores of every head: a :class:`RetrievalScores` with
    its ``family`` named (``probes`` are NIAH probes, or the detectors' sequences)."""

    family: str = "copy"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.family not in FAMILIES:
            raise ConfigError(f"unknown score family {self.family!r}; known: {', '.join(FAMILIES)}")

    def subset(self, index: Tensor | list[int]) -> FamilyScores:
        base = super().subset(index)
        return FamilyScores(per_probe=base.per_probe, success=base.success,
                            model_name=base.model_name, n_kv_heads=base.n_kv_heads,
                            probes=base.probes, config=base.config, family=self.family)

    def __repr__(self) -> str:
        return f"FamilyScores[{self.family}]" + super().__repr__().removeprefix("RetrievalScores")


@dataclass
class FamilySet(Result):
    """Several families' scores of one model on one probe set, and how they agree.

    ``layer_types`` is ``"sliding"`` or ``"global"`` per layer for models that mix them
    (Gemma 3), else ``None``; ``needle_set`` names the probes (``"literal"``, ...).
    """

    families: list[FamilyScores]
    model_name: str
    needle_set: str = ""
    layer_types: list[str] | None = None
    config: Config | None = None

    def __post_init__(self) -> None:
        names = [f.family for f in self.families]
        if len(set(names)) != len(names):
            raise ConfigError(f"a family appears twice in {names}")
        grids = {(f.n_layers, f.n_heads) for f in self.families}
        if len(grids) > 1:
            raise ConfigError(f"the families cover different head grids: {sorted(grids)}")

    @property
    def names(self) -> list[str]:
        return [f.family for f in self.families]

    def __getitem__(self, family: str) -> FamilyScores:
        for f in self.families:
            if f.family == family:
                return f
        raise ConfigError(f"no family {family!r} here; families: {', '.join(self.names)}")

    def __contains__(self, family: object) -> bool:
        return family in self.names

    def defined(self) -> list[str]:
        """The families with a mean (at least one successful probe)."""
        return [f.family for f in self.families if f.n_successful]

    def spearman(self, a: str, b: str) -> float:
        """Rank correlation of two families' mean scores over every head (ties averaged)."""
        return spearman(self[a].mean.flatten(), self[b].mean.flatten())

    def correlations(self) -> dict[str, dict[str, float]]:
        """Spearman between every two defined families."""
        names = self.defined()
        return {a: {b: self.spearman(a, b) for b in names} for a in names}

    def top_overlap(self, a: str, b: str, k: int = 10) -> float:
        """Share of family ``a``'s top-``k`` heads that are in ``b``'s top-``k``."""
        ta, tb = set(self[a].top_heads(k)), set(self[b].top_heads(k))
        return len(ta & tb) / k if k else float("nan")

    def layer_share(self, family: str, k: int = 10) -> dict[str, float] | None:
        """Share of the family's top-``k`` heads in each kind of layer (``None`` without
        ``layer_types``), next to each kind's share of all layers (``"<kind>_layers"``)."""
        if not self.layer_types:
            return None
        top: list[Head] = top_k_heads(self[family].mean, k)
        kinds = sorted(set(self.layer_types))
        out = {kind: sum(self.layer_types[la] == kind for la, _ in top) / k for kind in kinds}
        out.update({f"{kind}_layers": self.layer_types.count(kind) / len(self.layer_types)
                    for kind in kinds})
        return out

    def table(self, reference: str = "copy", k: int = 10) -> list[dict[str, Any]]:
        """One row per defined family: probes counted, top heads, Spearman with and top-``k``
        overlap with ``reference`` (when it is defined)."""
        rows = []
        ref_ok = reference in self and self[reference].n_successful > 0
        for name in self.defined():
            f = self[name]
            row: dict[str, Any] = {"family": name, "probes": f.n_probes, "counted": f.n_successful,
                                   "top": [(la, h, round(s, 4)) for la, h, s in f.top(5)]}
            if ref_ok:
                row["spearman_vs_" + reference] = self.spearman(name, reference)
                row[f"top{k}_overlap_vs_{reference}"] = self.top_overlap(name, reference, k)
            share = self.layer_share(name, k)
            if share is not None:
                row[f"top{k}_layer_share"] = share
            rows.append(row)
        return rows

    def grids(self) -> dict[str, torch.Tensor]:
        """Each defined family's mean ``[layer, head]`` grid."""
        return {name: self[name].mean for name in self.defined()}
