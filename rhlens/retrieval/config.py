"""The settings of a detection run."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal

from rhlens.engine import GenerationConfig, KernelPolicy
from rhlens.errors import ConfigError
from rhlens.store.results import Config

__all__ = ["DetectConfig"]


@dataclass(frozen=True)
class DetectConfig(Config):
    """Settings of a detection run.

    Attributes:
        mode: ``"unique"`` (distinct needle tokens copied, <= 1) or ``"paper"`` (the
            authors' per-step count).
        success_threshold: ROUGE-1 recall above which a probe counts (paper: 0.5).
        max_new_tokens: decode steps at most (paper: 50).
        stop_at_newline: stop answering at a newline (paper: yes).
        prefill_chunk: prefill this many tokens at a time (None: the device's default, 16384
            on a GPU, 32768 elsewhere); a reused haystack prefix is cut back to a multiple of
            it, so reuse changes no result.
        reuse_prefix: reuse the KV cache of the haystack shared by consecutive probes.
        batch_size: decode up to this many probes of equal length together (fewer on a GPU
            when their KV caches would not fit; 1: one at a time). Where the lean decode
            step runs (Llama-family models, only attention hooks attached), each probe's
            answer and scores are bit-identical to those it gets alone; elsewhere they agree up
            to float rounding of batched matrix products.
        policy: the decode step's kernels (:class:`~rhlens.engine.KernelPolicy`; ``None``: the
            device's defaults). The resolved policy is written to the run's ``run.json``.
    """

    mode: Literal["unique", "paper"] = "unique"
    success_threshold: float = 0.5
    max_new_tokens: int = 50
    stop_at_newline: bool = True
    prefill_chunk: int | None = None
    reuse_prefix: bool = True
    batch_size: int = 8
    policy: KernelPolicy | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("unique", "paper"):
            raise ConfigError(f"mode must be 'unique' or 'paper', got {self.mode!r}")
        if not 0 <= self.success_threshold < 1:
            raise ConfigError("success_threshold is a ROUGE recall in [0, 1)")
        GenerationConfig(max_new_tokens=self.max_new_tokens, prefill_chunk=self.prefill_chunk,
                         batch_size=self.batch_size, policy=self.policy)

    def generation(self) -> GenerationConfig:
        return GenerationConfig(max_new_tokens=self.max_new_tokens,
                                stop_at_newline=self.stop_at_newline,
                                prefill_chunk=self.prefill_chunk, reuse_prefix=self.reuse_prefix,
                                batch_size=self.batch_size, policy=self.policy)

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> DetectConfig | None:
        """The config a settings dict of an older file describes (settings this version
        dropped are ignored); ``None`` when it holds none (e.g. an imported paper file)."""
        names = {f.name for f in fields(cls)}
        known = {k: v for k, v in settings.items() if k in names}
        return cls(**known) if known else None
