"""The settings of a detection run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from rhlens.engine import GenerationConfig
from rhlens.engine.holder import holds_generation
from rhlens.errors import ConfigError
from rhlens.store.results import Config

__all__ = ["DetectConfig"]


def _detect_generation() -> GenerationConfig:
    return GenerationConfig(batch_size=8)


@holds_generation("max_new_tokens", "stop_at_newline", "prefill_chunk", "reuse_prefix", "batch_size",
                  "policy")
@dataclass(frozen=True)
class DetectConfig(Config):
    """Settings of a detection run.

    Attributes:
        mode: ``"unique"`` (distinct needle tokens copied, <= 1) or ``"paper"`` (the
            authors' per-step count).
        success_threshold: ROUGE-1 recall above which a probe counts (paper: 0.5).
        generation: how the model answers (:class:`~rhlens.engine.GenerationConfig`; the
            default is the paper's harness, 50 new tokens, stop at a newline, with up to
            ``batch_size=8`` probes of equal length decoded together: fewer on a GPU when
            their KV caches would not fit). Where the lean decode step runs (Llama-family
            models, only attention hooks attached), each probe's answer and scores are
            bit-identical to those it gets alone; elsewhere they agree up to float rounding
            of batched matrix products. The resolved kernel policy is written to the run's
            ``run.json``.
    """

    mode: Literal["unique", "paper"] = "unique"
    success_threshold: float = 0.5
    generation: GenerationConfig = field(default_factory=_detect_generation)

    def __post_init__(self) -> None:
        if self.mode not in ("unique", "paper"):
            raise ConfigError(f"mode must be 'unique' or 'paper', got {self.mode!r}")
        if not 0 <= self.success_threshold < 1:
            raise ConfigError("success_threshold is a ROUGE recall in [0, 1)")
