"""``RetrievalScores``: per-probe retrieval scores of every head, and the paper's file format.

The result of :func:`rhlens.retrieval.detect_retrieval_heads`, and of importing the
per-probe scores that Wu et al. (2024) released (``{"<layer>-<head>": [score, ...]}``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from rhlens._result import atomic_write_text, load_bundle, save_bundle
from rhlens.errors import ConfigError

__all__ = ["Head", "RetrievalScores"]

Head = tuple[int, int]  # (layer, head), 0-based, query heads


@dataclass
class RetrievalScores:
    """Retrieval scores of every (layer, query head) on every probe.

    Attributes:
        per_probe: score of each head on each probe, successful or not.
        success: whether the model answered the probe (ROUGE-1 recall above the
            configured threshold); only successful probes enter :attr:`mean`.
        model_name: the model the scores belong to.
        n_kv_heads: key/value heads per layer (grouped-query attention), if known.
        probes: one metadata dict per probe (length, depth, needle_id, response, ...).
        config: the detection config used, as a dict (empty for imported files).
    """

    per_probe: Float[Tensor, "probe layer head"]
    success: Bool[Tensor, " probe"]
    model_name: str
    n_kv_heads: int | None = None
    probes: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.per_probe.ndim != 3:
            raise ConfigError(f"per_probe must be [probe, layer, head], got {tuple(self.per_probe.shape)}")
        if self.success.shape != self.per_probe.shape[:1]:
            raise ConfigError("success must have one flag per probe")
        if self.n_kv_heads is not None and self.n_heads % self.n_kv_heads:
            raise ConfigError(f"{self.n_heads} heads cannot be split into {self.n_kv_heads} KV groups")

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

    # ---- queries -------------------------------------------------------------------------
    def top(self, k: int = 10) -> list[tuple[int, int, float]]:
        """The ``k`` highest-scoring heads as ``(layer, head, score)``, best first."""
        if k < 0:
            raise ConfigError(f"k must be >= 0, got {k}")
        mean = self.mean
        k = min(k, mean.numel())
        values, flat = mean.flatten().topk(k)  # ties broken by torch's topk order
        return [(int(i) // self.n_heads, int(i) % self.n_heads, float(v)) for v, i in zip(values, flat)]

    def top_heads(self, k: int) -> list[Head]:
        return [(layer, head) for layer, head, _ in self.top(k)]

    def retrieval_heads(self, threshold: float = 0.1) -> list[Head]:
        """Heads whose mean score exceeds ``threshold`` (0.1 in the paper), best first."""
        return [(layer, head) for layer, head, s in self.top(self.n_layers * self.n_heads) if s > threshold]

    def fraction_above(self, threshold: float = 0.1) -> float:
        return float((self.mean > threshold).float().mean())

    def random_heads(self, k: int, seed: int = 0, exclude: list[Head] | None = None) -> list[Head]:
        """``k`` heads drawn uniformly from this model's real grid, never one in ``exclude``."""
        from rhlens.ablation import random_heads

        return random_heads(self.n_layers, self.n_heads, k, seed=seed, exclude=exclude)

    def kv_aggregate(self, how: Literal["max", "mean"] = "max") -> Float[Tensor, "layer kv_head"]:
        """Scores per key/value head under grouped-query attention (query heads of a group pooled)."""
        if self.n_kv_heads is None:
            raise ConfigError("n_kv_heads is unknown for these scores; pass it when creating them")
        group = self.n_heads // self.n_kv_heads
        grouped = self.mean.reshape(self.n_layers, self.n_kv_heads, group)
        if how == "max":
            return grouped.max(-1).values
        if how == "mean":
            return grouped.mean(-1)
        raise ConfigError(f"how must be 'max' or 'mean', got {how!r}")

    def to_dataframe(self):
        """One row per head: layer, head, score, fraction of successful probes it fired on."""
        import pandas as pd

        mean = self.mean
        active = (self.successful > 0).float().mean(0)
        rows = [
            {"layer": layer, "head": head, "score": float(mean[layer, head]),
             "active_fraction": float(active[layer, head])}
            for layer in range(self.n_layers) for head in range(self.n_heads)
        ]
        return pd.DataFrame(rows).sort_values("score", ascending=False, ignore_index=True)

    def subset(self, index: Tensor | list[int]) -> RetrievalScores:
        """The same scores restricted to some probes (for bootstraps and stability curves)."""
        idx = torch.as_tensor(index, dtype=torch.long)
        return RetrievalScores(
            per_probe=self.per_probe[idx], success=self.success[idx], model_name=self.model_name,
            n_kv_heads=self.n_kv_heads,
            probes=[self.probes[i] for i in idx.tolist()] if self.probes else [],
            config=self.config,
        )

    def __repr__(self) -> str:
        head = f"RetrievalScores({self.model_name!r}, {self.n_layers}x{self.n_heads} heads, "
        head += f"{self.n_successful}/{self.n_probes} probes successful"
        if self.n_successful:
            top = ", ".join(f"L{la}H{h}={s:.2f}" for la, h, s in self.top(3))
            head += f", top: {top}"
        return head + ")"

    # ---- files ---------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write ``tensors.safetensors`` + ``meta.json`` into ``directory``."""
        meta = {"model_name": self.model_name, "n_kv_heads": self.n_kv_heads,
                "probes": self.probes, "config": self.config}
        return save_bundle(directory, {"per_probe": self.per_probe.float(),
                                       "success": self.success.to(torch.uint8)}, meta,
                           kind="RetrievalScores")

    @classmethod
    def load(cls, directory: str | Path) -> RetrievalScores:
        tensors, meta = load_bundle(directory, kind="RetrievalScores")
        return cls(per_probe=tensors["per_probe"], success=tensors["success"].bool(),
                   model_name=meta["model_name"], n_kv_heads=meta.get("n_kv_heads"),
                   probes=meta.get("probes", []), config=meta.get("config", {}))

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
    def from_paper_dict(cls, data: dict[str, list], model_name: str,
                        n_kv_heads: int | None = None) -> RetrievalScores:
        """Import the paper's per-head lists. Every list must have the same length."""
        if not isinstance(data, dict) or not data:
            raise ConfigError("expected a non-empty JSON object {\"<layer>-<head>\": [scores]}")
        cells: dict[Head, list[float]] = {}
        for key, values in data.items():
            try:
                layer, head = (int(x) for x in str(key).split("-"))
            except ValueError as exc:
                raise ConfigError(f"key {key!r} is not '<layer>-<head>'") from exc
            if not isinstance(values, list):
                raise ConfigError(f"value of {key!r} must be a list of per-probe scores")
            cells[(layer, head)] = values
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
                   model_name=model_name, n_kv_heads=n_kv_heads,
                   config={"source": "paper_json"})

    @classmethod
    def from_paper_json(cls, path: str | Path, model_name: str | None = None,
                        n_kv_heads: int | None = None) -> RetrievalScores:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
        return cls.from_paper_dict(data, model_name or path.stem, n_kv_heads)

    @classmethod
    def from_any(cls, source: str | Path) -> RetrievalScores:
        """A saved result directory, a detection run directory, or a paper-format JSON file."""
        source = Path(source)
        if source.is_dir():
            if (source / "meta.json").exists():
                return cls.load(source)
            if (source / "scores" / "meta.json").exists():
                return cls.load(source / "scores")
            if (source / "head_scores.json").exists():
                return cls.from_paper_json(source / "head_scores.json", model_name=source.name)
            raise FileNotFoundError(f"{source} holds no retrieval scores")
        return cls.from_paper_json(source)

    def bootstrap(self, n: int = 1000, seed: int = 0) -> Float[Tensor, "sample layer head"]:
        """Head means over ``n`` resamples (with replacement) of the successful probes."""
        ok = self.successful
        if ok.shape[0] == 0:
            raise ConfigError("no successful probe to resample")
        g = torch.Generator().manual_seed(seed)
        P = ok.shape[0]
        idx = torch.randint(0, P, (n, P), generator=g)
        # A resample's mean is a weighted sum: counts [n, P] @ scores [P, L*H]. Indexing
        # ok[idx] instead would allocate n x P x L x H (GBs for the paper's files).
        counts = torch.zeros(n, P).scatter_add_(1, idx, torch.ones(n, P))
        return (counts @ ok.flatten(1) / P).view(n, self.n_layers, self.n_heads)

