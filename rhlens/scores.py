"""``RetrievalScores``: per-probe retrieval scores of every head, and the paper's file format.

The result of :func:`rhlens.retrieval.detect_retrieval_heads`, and of importing the
per-probe scores that Wu et al. (2024) released (``{"<layer>-<head>": [score, ...]}``).
Which heads are "the best" is decided by :mod:`rhlens.stats` (ties by layer, head), so the
heads a mask knocks out are the heads every table lists.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from einops import reduce
from jaxtyping import Bool, Float, UInt8
from torch import Tensor

from rhlens.errors import ConfigError
from rhlens.results import Config, Result, ResultError, atomic_write_text
from rhlens.stats import Head, bootstrap_means, heads_above, rank_heads, top_k_heads
from rhlens.views.results import Displayed

__all__ = ["Head", "RetrievalScores"]


@dataclass
class RetrievalScores(Displayed, Result):
    """Retrieval scores of every (layer, query head) on every probe.

    Attributes:
        per_probe: score of each head on each probe, successful or not.
        success: whether the model answered the probe (ROUGE-1 recall above the
            configured threshold); only successful probes enter :attr:`mean`. (Files
            written before rhlens saved results one way hold it as uint8; it is made bool.)
        model_name: the model the scores belong to.
        n_kv_heads: key/value heads per layer (grouped-query attention), if known.
        probes: one metadata dict per probe (length, depth, needle_id, response, ...).
        config: the :class:`~rhlens.retrieval.DetectConfig` of the run (``None`` for
            imported files). A dict of its settings (the older form) is turned into one.
    """

    per_probe: Float[Tensor, "probe layer head"]
    success: Bool[Tensor, " probe"] | UInt8[Tensor, " probe"]
    model_name: str
    n_kv_heads: int | None = None
    probes: list[dict[str, Any]] = field(default_factory=list)
    config: Config | dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.per_probe.ndim != 3:
            raise ConfigError(f"per_probe must be [probe, layer, head], got {tuple(self.per_probe.shape)}")
        from rhlens.validate import check_finite

        check_finite(self.per_probe, "per_probe")  # NaN or inf: refused on load, never ranked
        self.success = self.success.bool()
        if self.success.shape != self.per_probe.shape[:1]:
            raise ConfigError("success must have one flag per probe")
        if self.n_kv_heads is not None and self.n_heads % self.n_kv_heads:
            raise ConfigError(f"{self.n_heads} heads cannot be split into {self.n_kv_heads} KV groups")
        if isinstance(self.config, dict):
            from rhlens.retrieval import DetectConfig

            self.config = DetectConfig.from_settings(self.config)

    # ---- shape ---------------------------------------------------------------------------
    @property
    def n_probes(self) -> int:
        return self.per_probe.shape[0]

    @property
    def n_layers(self) -> int:
        return self.per_probe.shape[1]

    @property
    def n_heads(self) -> int:
        return self.per_probe.shape[2]

    @property
    def n_successful(self) -> int:
        return int(self.success.sum())

    @property
    def successful(self) -> Float[Tensor, "success layer head"]:
        """Per-probe scores of the successful probes only (what the paper averages)."""
        return self.per_probe[self.success]

    @property
    def mean(self) -> Float[Tensor, "layer head"]:
        """Each head's retrieval score: the mean over successful probes.

        Raises:
            ConfigError: when no probe succeeded, since a mean of nothing is not a zero.
        """
        if self.n_successful == 0:
            raise ConfigError(
                f"none of the {self.n_probes} probes was answered correctly, so no retrieval "
                "score is defined; use shorter contexts, other needles, or a lower "
                "success threshold"
            )
        return self.successful.mean(0)

    # ---- queries (every ranking through rhlens.stats) ------------------------------------
    def top(self, k: int = 10) -> list[tuple[int, int, float]]:
        """The ``k`` highest-scoring heads (all of them when there are fewer) as ``(layer,
        head, score)``, best first; equal scores in (layer, head) order (:mod:`rhlens.stats`).
        Scores are rounded to 6 decimals (the precision of the per-probe records), so a float32
        mean prints as 0.8 rather than 0.800000011920929."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ConfigError(f"k must be a whole number >= 0, got {k!r}")
        mean = self.mean
        return [(la, h, round(float(mean[la, h]), 6))
                for la, h in top_k_heads(mean, min(k, mean.numel()))]

    def top_heads(self, k: int) -> list[Head]:
        """The ``k`` best heads, best first: the heads a top-K mask knocks out (``k`` more
        than the model has is an error, not a mask of every head)."""
        return top_k_heads(self.mean, k)

    def ranked(self) -> list[Head]:
        """Every head, best first (ties by layer, head)."""
        return rank_heads(self.mean)

    def retrieval_heads(self, threshold: float = 0.1) -> list[Head]:
        """Heads whose mean score exceeds ``threshold`` (0.1 in the paper), best first."""
        return heads_above(self.mean, threshold)

    def fraction_above(self, threshold: float = 0.1) -> float:
        """Share of all heads that are :meth:`retrieval_heads` at ``threshold``."""
        return len(self.retrieval_heads(threshold)) / (self.n_layers * self.n_heads)

    def random_heads(self, k: int, seed: int = 0, exclude: list[Head] | None = None) -> list[Head]:
        """``k`` heads drawn uniformly from this model's real grid, never one in ``exclude``."""
        from rhlens.ablation import random_heads

        return random_heads(self.n_layers, self.n_heads, k, seed=seed, exclude=exclude)

    def kv_aggregate(self, how: Literal["max", "mean"] = "max") -> Float[Tensor, "layer kv_head"]:
        """Scores per key/value head under grouped-query attention (query heads of a group pooled)."""
        if self.n_kv_heads is None:
            raise ConfigError("n_kv_heads is unknown for these scores; pass it when creating them")
        if how not in ("max", "mean"):
            raise ConfigError(f"how must be 'max' or 'mean', got {how!r}")
        # Query heads are numbered group-major: head h belongs to KV head h // group.
        return reduce(self.mean, "layer (kv group) -> layer kv", how, kv=self.n_kv_heads)

    def to_dataframe(self):
        """One row per head, best first: layer, head, score, share of successful probes it
        copied on."""
        import pandas as pd

        mean = self.mean
        active = (self.successful > 0).float().mean(0)
        return pd.DataFrame([
            {"layer": layer, "head": head, "score": float(mean[layer, head]),
             "active_fraction": float(active[layer, head])}
            for layer, head in self.ranked()
        ])

    def subset(self, index: Tensor | list[int]) -> RetrievalScores:
        """The same scores restricted to some probes (for bootstraps and stability curves)."""
        idx = torch.as_tensor(index, dtype=torch.long)
        return RetrievalScores(
            per_probe=self.per_probe[idx], success=self.success[idx], model_name=self.model_name,
            n_kv_heads=self.n_kv_heads,
            probes=[self.probes[i] for i in idx.tolist()] if self.probes else [],
            config=self.config,
        )

    def bootstrap(self, n: int = 1000, seed: int = 0) -> Float[Tensor, "sample layer head"]:
        """Head means over ``n`` resamples (with replacement) of the successful probes
        (:func:`rhlens.stats.bootstrap_means`)."""
        ok = self.successful
        if ok.shape[0] == 0:
            raise ConfigError("no successful probe to resample")
        return bootstrap_means(ok, n, seed)

    def __repr__(self) -> str:
        head = f"RetrievalScores({self.model_name!r}, {self.n_layers}x{self.n_heads} heads, "
        head += f"{self.n_successful}/{self.n_probes} probes successful"
        if self.n_successful:
            best = ", ".join(f"L{la}H{h}={s:.2f}" for la, h, s in self.top(3))
            head += f", top: {best}"
        return head + ")"

    # ---- files ---------------------------------------------------------------------------
    @classmethod
    def _from_doc(cls, doc: dict[str, Any], directory: Path) -> RetrievalScores:
        import rhlens.retrieval  # noqa: F401  (registers DetectConfig, the config saved here)

        return super()._from_doc(doc, directory)

    @classmethod
    def upgrade(cls, doc: dict[str, Any], version: int, directory: Path) -> dict[str, Any]:
        """Schema 0: ``meta.json`` (model_name, n_kv_heads, probes, config as a dict) next
        to ``tensors.safetensors`` (per_probe, success as uint8)."""
        if version != 0:
            return super().upgrade(doc, version, directory)
        meta = doc["meta"]
        if "model_name" not in meta:
            raise ResultError(f"{directory}/meta.json lacks model_name (damaged?)")
        return {"kind": cls.kind, "schema_version": cls.schema_version, "fields": {
            "per_probe": {"__tensor__": "per_probe"}, "success": {"__tensor__": "success"},
            "model_name": meta["model_name"], "n_kv_heads": meta.get("n_kv_heads"),
            "probes": meta.get("probes") or [], "config": meta.get("config") or None}}

    def to_paper_dict(self) -> dict[str, list[float]]:
        """The paper's format: ``{"<layer>-<head>": [score on each successful probe]}``."""
        ok = self.successful
        return {f"{layer}-{head}": [round(float(x), 6) for x in ok[:, layer, head]]
                for layer in range(self.n_layers) for head in range(self.n_heads)}

    def to_paper_json(self, path: str | Path) -> Path:
        path = Path(path)
        atomic_write_text(path, json.dumps(self.to_paper_dict()))
        return path

    @classmethod
    def from_paper_dict(cls, data: Any, model_name: str,
                        n_kv_heads: int | None = None) -> RetrievalScores:
        """Import the paper's per-head lists. Every list must have the same length."""
        if not isinstance(data, dict) or not data:
            raise ConfigError("expected a non-empty JSON object {\"<layer>-<head>\": [scores]}")
        cells: dict[Head, list[float]] = {}
        for key, values in data.items():
            try:
                parts = str(key).split("-")
                if len(parts) != 2 or not all(p.isdecimal() and p.isascii() for p in parts):
                    raise ValueError(key)
                layer, head = (int(x) for x in parts)
            except ValueError as exc:
                raise ConfigError(f"key {key!r} is not '<layer>-<head>'") from exc
            if not isinstance(values, list):
                raise ConfigError(f"value of {key!r} must be a list of per-probe scores")
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                raise ConfigError(f"the scores of {key!r} must all be numbers")
            if not all(math.isfinite(v) for v in values):
                raise ConfigError(f"the scores of {key!r} hold NaN or infinity; scores must be "
                                  "finite numbers")
            cells[(layer, head)] = values
        if min(min(k) for k in cells) < 0:
            raise ConfigError("layer and head numbers must be >= 0")
        n_layers = 1 + max(la for la, _ in cells)
        n_heads = 1 + max(h for _, h in cells)
        lengths = {len(v) for v in cells.values()}
        if len(lengths) != 1:
            raise ConfigError(f"per-head lists have different lengths {sorted(lengths)[:5]}")
        missing = n_layers * n_heads - len(cells)
        if missing:
            raise ConfigError(f"{missing} (layer, head) keys of the {n_layers}x{n_heads} grid are missing")
        (n_probes,) = lengths
        per_probe = torch.zeros(n_probes, n_layers, n_heads)
        for (layer, head), values in cells.items():
            per_probe[:, layer, head] = torch.tensor(values, dtype=torch.float32)
        return cls(per_probe=per_probe, success=torch.ones(n_probes, dtype=torch.bool),
                   model_name=model_name, n_kv_heads=n_kv_heads)

    @classmethod
    def from_paper_json(cls, path: str | Path, model_name: str | None = None,
                        n_kv_heads: int | None = None) -> RetrievalScores:
        """A paper-format file (``{"<layer>-<head>": [scores]}``); the model is named after
        the file unless ``model_name`` is given."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist")
        if not path.is_file():
            raise ConfigError(f"{path} is not a file of paper-format scores")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
        try:
            return cls.from_paper_dict(data, model_name or path.stem, n_kv_heads)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from exc

    @classmethod
    def from_any(cls, source: str | Path) -> RetrievalScores:
        """Saved scores, a run directory holding them (or only ``head_scores.json``), or a
        paper-format JSON file (:func:`rhlens.runs.find_scores` says which is which)."""
        from rhlens.runs import find_scores

        return find_scores(source)
