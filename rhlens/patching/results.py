"""Patching results (per pair, layer, head) and how they compare: with each other and with retrieval scores.

Both result classes save and load through :mod:`rhlens.results` (a directory with
``result.json`` and ``tensors.safetensors``) and still read what older rhlens wrote: a
``HeadPatchingResult`` directory with ``meta.json``, a ``PatchingVsRetrieval`` JSON file.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import einops
import torch
from jaxtyping import Float
from torch import Tensor

from rhlens.errors import ConfigError
from rhlens.patching.config import PatchConfig, kv_indexed
from rhlens.results import Result, ResultError, read_json
from rhlens.scores import RetrievalScores
from rhlens.stats import pearson, rank_heads, spearman
from rhlens.views.results import Displayed

__all__ = ["HeadPatchingResult", "PatchingVsRetrieval", "compare_patching", "patching_vs_retrieval"]

Head = tuple[int, int]
_TENSORS = ("effects", "patched", "clean", "corrupted")


def _as_config(config: PatchConfig | dict[str, Any]) -> PatchConfig:
    if isinstance(config, PatchConfig):
        return config
    if not isinstance(config, dict):
        raise ConfigError(f"config must be a PatchConfig, got {type(config).__name__}")
    data = {k: v for k, v in config.items() if k != "type"}
    return PatchConfig.from_dict({"type": "PatchConfig", **data})


@dataclass
class HeadPatchingResult(Displayed, Result):
    """Per-pair, per-head causal effects, and the raw metric values they come from.

    Attributes:
        effects: normalised effect; 1 = the head alone carries the clean-vs-corrupted
            difference (denoise: restores it, noise: destroys it), 0 = nothing; NaN for
            heads not patched and for pairs whose two runs do not differ.
        patched: the metric of each patched run (attribution: its linear estimate).
        clean, corrupted: the metric of the unpatched clean and corrupted runs.
        model_name: the model.
        config: the :class:`PatchConfig` used (a dict is accepted and converted).
        pairs: one metadata dict per pair (its labels, length, answer position, tokens).
        seconds: wall time per pair.

    The head axis counts KV heads when ``config.activation`` is ``k`` or ``v`` alone.
    """

    schema_version = 1

    effects: Float[Tensor, "pair layer head"]
    patched: Float[Tensor, "pair layer head"]
    clean: Float[Tensor, " pair"]
    corrupted: Float[Tensor, " pair"]
    model_name: str
    config: PatchConfig | dict[str, Any] = field(default_factory=PatchConfig)
    pairs: list[dict[str, Any]] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.config = _as_config(self.config)

    @classmethod
    def upgrade(cls, doc: dict[str, Any], version: int, directory: Path) -> dict[str, Any]:
        """Schema 0: ``meta.json`` (model_name, config as a dict, pairs, seconds) beside the
        same ``tensors.safetensors``."""
        if version != 0:
            return super().upgrade(doc, version, directory)
        meta = doc["meta"]
        fields: dict[str, Any] = {name: {"__tensor__": name} for name in _TENSORS}
        config = {k: v for k, v in (meta.get("config") or {}).items() if k != "type"}
        fields.update(model_name=meta.get("model_name", ""),
                      config={"__config__": {"type": "PatchConfig", **config}},
                      pairs=meta.get("pairs", []), seconds=meta.get("seconds", []))
        return {"kind": cls.kind, "schema_version": cls.schema_version, "fields": fields}

    @property
    def n_pairs(self) -> int:
        return self.effects.shape[0]

    @property
    def n_layers(self) -> int:
        return self.effects.shape[1]

    @property
    def n_heads(self) -> int:
        return self.effects.shape[2]

    @property
    def mean(self) -> Float[Tensor, "layer head"]:
        """Each head's effect averaged over the pairs that have one (NaN: never patched)."""
        ok = torch.isfinite(self.effects)
        total = torch.where(ok, self.effects, torch.zeros_like(self.effects)).sum(0)
        count = ok.sum(0)
        return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, math.nan))

    def top(self, k: int = 10) -> list[tuple[int, int, float]]:
        """The ``k`` heads of largest mean effect as ``(layer, head, effect)``, largest first
        (ties in (layer, head) order, :func:`rhlens.stats.rank_heads`); unpatched heads never."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ConfigError(f"k must be a whole number >= 0, got {k!r}")
        mean = self.mean
        ranked = [(la, h, float(mean[la, h])) for la, h in rank_heads(mean)]
        return [row for row in ranked if math.isfinite(row[2])][:k]

    def top_heads(self, k: int = 10) -> list[Head]:
        return [(layer, head) for layer, head, _ in self.top(k)]

    def to_dataframe(self):
        """One row per patched head, largest mean effect first: layer, head, mean effect,
        its std over pairs, pairs used."""
        import pandas as pd

        rows = []
        for layer, head, _ in self.top(self.n_layers * self.n_heads):
            vals = self.effects[:, layer, head]
            vals = vals[torch.isfinite(vals)]
            rows.append({"layer": layer, "head": head, "effect": float(vals.mean()),
                         "std": float(vals.std()) if len(vals) > 1 else 0.0,
                         "n_pairs": len(vals)})
        return pd.DataFrame(rows, columns=["layer", "head", "effect", "std", "n_pairs"])

    def subset(self, index: Sequence[int]) -> HeadPatchingResult:
        """The same result restricted to some pairs (e.g. to compare with a slower run)."""
        idx = [int(i) for i in index]
        if not idx or not all(0 <= i < self.n_pairs for i in idx):
            raise ConfigError(f"pair indices must lie in [0, {self.n_pairs}), got {idx}")
        return dataclasses.replace(
            self, effects=self.effects[idx], patched=self.patched[idx], clean=self.clean[idx],
            corrupted=self.corrupted[idx], pairs=[self.pairs[i] for i in idx] if self.pairs else [],
            seconds=[self.seconds[i] for i in idx] if self.seconds else [])

    def to_transformer_lens(self):
        """The raw values as TransformerLens' ``PatchingResult`` (axes ``layer, head``,
        per-pair values, the unpatched target run as baseline), for its statistics:
        ``.stderr()``, ``.bootstrap_ci()``, ``.permutation_pvalue()``, and
        ``.normalized(clean)`` (= :attr:`effects` when denoising)."""
        from transformer_lens.patching import PatchingResult, make_df_from_ranges

        denoise = self.config.direction == "denoise"
        return PatchingResult(
            values=einops.rearrange(self.patched, "pair layer head -> layer head pair").contiguous(),
            axis_names=["layer", "head"],
            index_df=make_df_from_ranges([self.n_layers, self.n_heads], ["layer", "head"]),
            metric_names=[self.config.metric],
            reduced=False,
            baseline=(self.corrupted if denoise else self.clean).clone(),
        )

    def __repr__(self) -> str:
        c = self.config
        top = ", ".join(f"L{la}H{h}={e:.2f}" for la, h, e in self.top(3))
        return (f"HeadPatchingResult({self.model_name!r}, {self.n_pairs} pairs, {c.activation}, "
                f"{c.mode}/{c.direction}/{_positions(c)}/{c.metric}, top: {top})")


def _positions(config: PatchConfig) -> str:
    p = config.positions
    return p if isinstance(p, str) else f"{len(p)} positions"


def _finite_pair(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    ok = torch.isfinite(a) & torch.isfinite(b)
    return a[ok].double(), b[ok].double()


def compare_patching(reference: HeadPatchingResult, estimate: HeadPatchingResult, *, k: int = 10,
                     min_effect: float = 0.05) -> dict[str, float]:
    """How well ``estimate`` (e.g. attribution) reproduces ``reference`` (e.g. exact patching).

    Returns Spearman and Pearson correlations of the heads' mean effects, the mean per-pair
    Spearman, the fraction of heads with ``|reference effect| >= min_effect`` whose sign
    agrees, and the overlap of the two top-``k`` lists.
    """
    if reference.effects.shape[1:] != estimate.effects.shape[1:]:
        raise ConfigError("the two results cover different head grids")
    a, b = _finite_pair(reference.mean.flatten(), estimate.mean.flatten())
    if len(a) < 2:
        raise ConfigError("fewer than two heads have an effect in both results")
    per_pair = []
    if reference.n_pairs == estimate.n_pairs:
        for p in range(reference.n_pairs):
            x, y = _finite_pair(reference.effects[p].flatten(), estimate.effects[p].flatten())
            if len(x) > 1:
                per_pair.append(spearman(x, y))
    big = a.abs() >= min_effect
    sign = float(((a[big] > 0) == (b[big] > 0)).double().mean()) if big.any() else math.nan
    top_a, top_b = set(reference.top_heads(k)), set(estimate.top_heads(k))
    return {"spearman": spearman(a, b), "pearson": pearson(a, b),
            "spearman_per_pair": float(sum(per_pair) / len(per_pair)) if per_pair else math.nan,
            "sign_agreement": sign, "n_large": int(big.sum()),
            f"top{k}_overlap": len(top_a & top_b) / max(1, min(k, len(top_a)))}


Row = tuple[int, int, float, float]


def _rows(items: Any) -> list[Row]:
    """``(layer, head, effect, score)`` tuples from tuples, lists or the old files' dicts."""
    out = []
    for r in items or []:
        if isinstance(r, dict):
            r = (r["layer"], r["head"], r["effect"], r["score"])
        la, h, e, s = r
        out.append((int(la), int(h), float(e), float(s)))
    return out


def _grid(x: list[list[Any]]) -> Tensor:
    return torch.tensor([[math.nan if v is None else float(v) for v in row] for row in x])


@dataclass
class PatchingVsRetrieval(Displayed, Result):
    """Per-head causal effect against retrieval score, and the heads where they disagree.

    Attributes:
        effect, score: mean patching effect and mean retrieval score of every head.
        spearman, pearson: correlations over the heads that have both.
        causal_not_retrieval: heads with effect >= ``effect_threshold`` but retrieval score
            < ``score_threshold``, as ``(layer, head, effect, score)``, largest effect first.
        retrieval_not_causal: heads with score >= ``score_threshold`` but effect <
            ``effect_threshold``, largest score first.
        both: heads above both thresholds, largest effect first.
    """

    schema_version = 1

    effect: Float[Tensor, "layer head"]
    score: Float[Tensor, "layer head"]
    spearman: float
    pearson: float
    causal_not_retrieval: list[Row] | list[list[Any]]  # lists as loaded, tuples after init
    retrieval_not_causal: list[Row] | list[list[Any]]
    both: list[Row] | list[list[Any]]
    effect_threshold: float
    score_threshold: float
    model_name: str = ""
    scores_model_name: str = ""
    patch_config: PatchConfig | dict[str, Any] = field(default_factory=PatchConfig)

    def __post_init__(self) -> None:
        self.effect, self.score = self.effect.float(), self.score.float()
        for name in ("causal_not_retrieval", "retrieval_not_causal", "both"):
            setattr(self, name, _rows(getattr(self, name)))
        self.patch_config = _as_config(self.patch_config)

    @classmethod
    def load(cls, path: str | Path) -> PatchingVsRetrieval:
        """A saved comparison: a directory, or the single JSON file older rhlens wrote."""
        path = Path(path)
        if path.is_file():
            old = read_json(path, "a patching-vs-retrieval comparison")
            if not isinstance(old, dict) or old.get("kind") != cls.kind:
                raise ResultError(f"{path} holds no PatchingVsRetrieval comparison")
            doc = cls.upgrade({"kind": cls.kind, "schema_version": 0, "meta": old}, 0, path)
            return cls._from_doc(doc, path.parent)
        return super().load(path)

    @classmethod
    def upgrade(cls, doc: dict[str, Any], version: int, directory: Path) -> dict[str, Any]:
        """Schema 0: one JSON file, as :meth:`to_dict` writes it (grids as nested lists)."""
        if version != 0:
            return super().upgrade(doc, version, directory)
        old = doc["meta"]
        names = [f.name for f in dataclasses.fields(cls)]
        fields = {k: old[k] for k in names if k in old}
        fields["effect"], fields["score"] = _grid(old["effect"]), _grid(old["score"])
        for name in ("causal_not_retrieval", "retrieval_not_causal", "both"):
            fields[name] = _rows(old.get(name))
        fields["patch_config"] = {"__config__": {
            "type": "PatchConfig",
            **{k: v for k, v in (old.get("patch_config") or {}).items() if k != "type"}}}
        return {"kind": cls.kind, "schema_version": cls.schema_version, "fields": fields}

    def to_dict(self) -> dict[str, Any]:
        """The comparison as plain JSON values (what older rhlens saved as one file)."""
        def rows(items):
            return [{"layer": la, "head": h, "effect": e, "score": s} for la, h, e, s in items]

        return {"kind": "PatchingVsRetrieval", "model_name": self.model_name,
                "scores_model_name": self.scores_model_name, "spearman": self.spearman,
                "pearson": self.pearson, "effect_threshold": self.effect_threshold,
                "score_threshold": self.score_threshold,
                "patch_config": {k: v for k, v in self.patch_config.to_dict().items() if k != "type"},
                "causal_not_retrieval": rows(self.causal_not_retrieval),
                "retrieval_not_causal": rows(self.retrieval_not_causal), "both": rows(self.both),
                "effect": [[None if math.isnan(x) else x for x in row] for row in self.effect.tolist()],
                "score": self.score.tolist()}


def patching_vs_retrieval(result: HeadPatchingResult, scores: RetrievalScores, *,
                          effect_threshold: float = 0.1,
                          score_threshold: float = 0.1) -> PatchingVsRetrieval:
    """Do the heads that carry the needle causally match the heads that copy it?

    Args:
        result: from :func:`rhlens.patching.patch_heads` (per query head).
        scores: retrieval scores of the same model (same layer x head grid).
        effect_threshold: a "causal" head restores (or destroys) at least this fraction.
        score_threshold: a "retrieval" head scores at least this (the paper: 0.1).
    """
    score = scores.mean.float()
    effect = result.mean
    if tuple(score.shape) != tuple(effect.shape):
        kv = (" (this result patched k/v per KV head; retrieval scores are per query head)"
              if kv_indexed(result.config.atoms) else "")
        raise ConfigError(f"the retrieval scores cover {tuple(score.shape)} (layer, head) and the "
                          f"patching result {tuple(effect.shape)}: not the same model?{kv}")
    ok = torch.isfinite(effect) & torch.isfinite(score)
    if int(ok.sum()) < 3:
        raise ConfigError("fewer than three heads have both a patching effect and a retrieval score")
    rho = spearman(effect[ok].double(), score[ok].double())
    r = pearson(effect[ok].double(), score[ok].double())
    def cells(order: list[Head]) -> list[Row]:
        return [(la, h, float(effect[la, h]), float(score[la, h])) for la, h in order if ok[la, h]]

    causal = [c for c in cells(rank_heads(effect)) if c[2] >= effect_threshold]
    retrieval = [c for c in cells(rank_heads(score)) if c[3] >= score_threshold]
    return PatchingVsRetrieval(
        effect=effect, score=score, spearman=rho, pearson=r,
        causal_not_retrieval=[c for c in causal if c[3] < score_threshold],
        retrieval_not_causal=[c for c in retrieval if c[2] < effect_threshold],
        both=[c for c in causal if c[3] >= score_threshold],
        effect_threshold=effect_threshold, score_threshold=score_threshold,
        model_name=result.model_name, scores_model_name=scores.model_name,
        patch_config=result.config,
    )
