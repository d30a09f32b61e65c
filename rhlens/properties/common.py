"""What every property shares: refusing score sets that define no property, checking
thresholds and counts, ordering heads by the one rule, reading schema-0 bundles."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jaxtyping import Float
from torch import Tensor

from rhlens import stats
from rhlens.errors import ConfigError
from rhlens.retrieval.scores import Head, RetrievalScores
from rhlens.store.results import Result, ResultError

RETRIEVAL_THRESHOLD = 0.1  # the paper's cut between retrieval heads and the rest


def successful(scores: RetrievalScores) -> Float[Tensor, "success layer head"]:
    """The successful probes, refusing score sets where no retrieval score is defined."""
    if scores.n_layers == 0 or scores.n_heads == 0:
        raise ConfigError(f"scores of {scores.model_name!r} have an empty "
                          f"{scores.n_layers}x{scores.n_heads} head grid")
    if scores.n_successful == 0:
        raise ConfigError(f"scores of {scores.model_name!r} have no successful probe "
                          f"(0 of {scores.n_probes}); the properties are defined on answered "
                          "probes only")
    return scores.successful


def check_threshold(value: float, name: str) -> float:
    """Thresholds are score levels: finite and non-negative (scores are never below 0)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_k(k: int, n_cells: int, name: str = "k") -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"{name} must be a positive integer, got {k!r}")
    if k > n_cells:
        raise ConfigError(f"{name}={k} is larger than the number of heads ({n_cells})")
    return k


def check_positive_int(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return value


def heads_in_order(mask: Tensor, mean: Float[Tensor, "layer head"]) -> list[Head]:
    """Heads where ``mask`` holds, best mean score first (the one ranking rule)."""
    return [(la, h) for la, h in stats.rank_heads(mean) if bool(mask[la, h])]


def bundle_doc(cls: type[Result], doc: dict[str, Any], directory: Path,
                tensors: Sequence[str]) -> dict[str, Any]:
    """A schema-0 result (``meta.json`` + ``tensors.safetensors``, each field in one of
    them under its own name) as a current document."""
    meta = {k: v for k, v in doc["meta"].items() if k != "kind"}
    missing = [f for f in cls.__dataclass_fields__ if f not in meta and f not in tensors]
    if missing:
        raise ResultError(f"{directory}/meta.json lacks {', '.join(missing)} (damaged?)")
    return {"kind": cls.kind, "schema_version": cls.schema_version,
            "fields": {**meta, **{name: {"__tensor__": name} for name in tensors}}}
