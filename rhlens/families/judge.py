"""The causal judgement of score families: NIAH when each family's top-K heads are masked, against random-K.

For each ranking (a family's scores, or any ``[layer, head]`` grid) and each K, the top-K
heads are masked (the paper's uniform mask, decode steps only) and every probe is answered;
K random heads (several seeds, drawn from the whole grid: no family's heads are excluded,
so the baseline is the same for every family) give the reference. Masks that name the same
heads (two families agreeing on their top-2, say) run once. The sweep is
:func:`rhlens.niah.niah_sweep`: probe-major, so the engine reuses each probe's prefill
across its masks, resumable through ``out``.

Each curve is summarised by two numbers, with bootstrap intervals over probes
(:func:`rhlens.stats.bootstrap_means`, the same resample for every mask):

* :func:`k_to_halve`: the K at which the NIAH score falls to half the unmasked score, read
  off the curve by linear interpolation between the Ks tried (``inf``: it never does);
* :func:`curve_auc`: the area under the curve of the NIAH score relative to the unmasked
  one, over K from 0 to the largest K, divided by that K: the share of the score kept on
  average (1: masking never hurts; near 0: the first heads break retrieval).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from rhlens.errors import ConfigError
from rhlens.masks import Mask, k_list, seed_list
from rhlens.niah import NIAHConfig, NIAHResult, niah_sweep
from rhlens.probes.probe import Probe
from rhlens.retrieval.scores import RetrievalScores
from rhlens.stats import bootstrap_means, percentile_interval, random_heads, top_k_heads
from rhlens.store.results import Result

__all__ = ["DEFAULT_KS", "DamageResult", "curve_auc", "damage_masks", "damage_sweep", "k_to_halve"]

DEFAULT_KS = (1, 2, 5, 10, 20)
RANDOM = "random"


# ---- the two summaries ----------------------------------------------------------------------
def _check_curve(ks: Sequence[float | int], curve: Sequence[float | int]) -> tuple[list[float], list[float]]:
    k = [float(x) for x in ks]
    c = [float(x) for x in curve]
    if len(k) != len(c) or len(k) < 2:
        raise ConfigError(f"a curve needs a score per K and at least two Ks, got {len(k)} Ks, "
                          f"{len(c)} scores")
    if k[0] != 0 or any(b <= a for a, b in pairwise(k)):
        raise ConfigError(f"Ks must start at 0 (unmasked) and increase, got {list(ks)}")
    return k, c


def k_to_halve(ks: Sequence[float | int], curve: Sequence[float | int]) -> float:
    """The K at which ``curve`` (NIAH score per K; ``ks[0] == 0``, the unmasked score) first
    reaches half its value at K = 0, interpolating linearly between the Ks tried.

    ``inf`` when it never does within the Ks; ``nan`` when the unmasked score is not above 0.
    """
    k, c = _check_curve(ks, curve)
    base = c[0]
    if not base > 0:
        return math.nan
    half = base / 2
    for (k0, c0), (k1, c1) in zip(zip(k, c), zip(k[1:], c[1:])):
        if c1 <= half:
            return k1 if c0 == c1 else k0 + (c0 - half) / (c0 - c1) * (k1 - k0)
    return math.inf


def curve_auc(ks: Sequence[float | int], curve: Sequence[float | int]) -> float:
    """Mean of ``curve / curve[0]`` over K in ``[0, ks[-1]]`` (trapezoids): the share of the
    unmasked NIAH score kept on average; ``nan`` when the unmasked score is not above 0."""
    k, c = _check_curve(ks, curve)
    if not c[0] > 0:
        return math.nan
    rel = [x / c[0] for x in c]
    area = sum((k1 - k0) * (r0 + r1) / 2 for k0, k1, r0, r1 in zip(k, k[1:], rel, rel[1:]))
    return area / k[-1]


# ---- masks ----------------------------------------------------------------------------------
def _grid_of(ranking: RetrievalScores | Tensor) -> Float[Tensor, "layer head"]:
    if isinstance(ranking, RetrievalScores):
        return ranking.mean
    if isinstance(ranking, Tensor) and ranking.ndim == 2:
        return ranking
    raise ConfigError(f"a ranking is retrieval/family scores or a [layer, head] grid, got "
                      f"{type(ranking).__name__}")


def damage_masks(rankings: Mapping[str, RetrievalScores | Tensor], grid: tuple[int, int],
                 ks: Sequence[int] = DEFAULT_KS, seeds: int | Sequence[int] = 3,
                 mode: str = "uniform") -> tuple[dict[str, list[list[int]]], list[Mask]]:
    """Every label of a damage sweep with its heads, and the distinct masks to run.

    Labels: ``"none"``, ``"<name>:top-<K>"`` per ranking and K, ``"random-<K>-s<seed>"``.
    A mask is labelled by the first label that names its heads.
    """
    n_layers, n_heads = grid
    ks_ = [k for k in k_list(list(ks), n_layers * n_heads) if k > 0]
    seeds_ = seed_list(seeds)
    if not rankings:
        raise ConfigError("no ranking to judge")
    for name in rankings:
        if not isinstance(name, str) or not name or name in ("none", RANDOM) or ":" in name:
            raise ConfigError(f"a ranking's name must be a non-empty word other than 'none' and "
                              f"'random', without ':', got {name!r}")
    heads: dict[str, list[list[int]]] = {"none": []}
    for name, ranking in rankings.items():
        g = _grid_of(ranking)
        if tuple(g.shape) != (n_layers, n_heads):
            raise ConfigError(f"ranking {name!r} covers {tuple(g.shape)} heads, the model "
                              f"{n_layers}x{n_heads}")
        for k in ks_:
            heads[f"{name}:top-{k}"] = sorted([la, h] for la, h in top_k_heads(g, k))
    for k in ks_:
        for s in seeds_:
            heads[f"{RANDOM}-{k}-s{s}"] = [list(x) for x in random_heads(n_layers, n_heads, k, seed=s)]
    masks: dict[tuple, Mask] = {}
    for label, hs in heads.items():
        key = tuple(map(tuple, hs))
        if key not in masks:
            masks[key] = Mask(key, mode, "decode", label=label)  # type: ignore[arg-type]
    return heads, list(masks.values())


@dataclass
class DamageResult(Result):
    """NIAH under each ranking's top-K masks and random-K masks (see the module's doc).

    ``heads`` maps every label to its heads; ``niah`` holds the masks that ran, each labelled
    by the first label naming its heads (:meth:`ran` maps a label to it).
    """

    niah: NIAHResult
    heads: dict[str, list[list[int]]]
    rankings: list[str]
    ks: list[int]
    seeds: list[int]
    needle_set: str = ""

    def __post_init__(self) -> None:
        missing = [label for label in self.heads if self.ran(label) not in self.niah.masks]
        if missing:
            raise ConfigError(f"the NIAH result lacks the masks of {', '.join(missing[:4])}")

    def ran(self, label: str) -> str:
        """The label of the mask that ran ``label``'s heads."""
        if label not in self.heads:
            raise ConfigError(f"no mask {label!r} in this sweep")
        key = self.heads[label]
        return next(other for other, hs in self.heads.items() if hs == key)

    @property
    def probe_keys(self) -> list[str]:
        return [r["key"] for r in self.niah.for_mask(self.ran("none"))]

    def per_probe(self, label: str) -> Float[Tensor, " probe"]:
        """NIAH score (ROUGE-1 recall x 100) of every probe under ``label``, in probe order."""
        by_key = {r["key"]: float(r["score"]) for r in self.niah.for_mask(self.ran(label))}
        return torch.tensor([by_key[k] for k in self.probe_keys], dtype=torch.float64)

    def labels_of(self, name: str) -> list[list[str]]:
        """Per K (0 first), the labels whose per-probe scores make ``name``'s curve (one for
        a ranking, one per seed for ``"random"``)."""
        if name == RANDOM:
            return [["none"]] + [[f"{RANDOM}-{k}-s{s}" for s in self.seeds] for k in self.ks]
        if name not in self.rankings:
            raise ConfigError(f"no ranking {name!r}; rankings: {', '.join(self.rankings)}")
        return [["none"]] + [[f"{name}:top-{k}"] for k in self.ks]

    def per_probe_curve(self, name: str) -> Float[Tensor, "probe k"]:
        """Each probe's NIAH score per K (0 first); random-K averaged over the seeds."""
        return torch.stack([torch.stack([self.per_probe(x) for x in labels]).mean(0)
                            for labels in self.labels_of(name)], dim=1)

    @property
    def all_ks(self) -> list[int]:
        return [0, *self.ks]

    def curve(self, name: str) -> list[float]:
        """Mean NIAH score per K (0 first) of a ranking, or of ``"random"``."""
        return [float(x) for x in self.per_probe_curve(name).mean(0)]

    def summary(self, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, dict[str, Any]]:
        """Per ranking and ``"random"``: the curve, K to halve NIAH and the AUC, each with a
        bootstrap interval over probes (the same resamples for every curve)."""
        names = [*self.rankings, RANDOM]
        per = torch.stack([self.per_probe_curve(n) for n in names], dim=1)  # [probe, name, k]
        boots = bootstrap_means(per, n_boot, seed)  # [boot, name, k]
        out = {}
        for i, name in enumerate(names):
            curve = per[:, i].mean(0).tolist()
            halves = torch.tensor([k_to_halve(self.all_ks, b.tolist()) for b in boots[:, i]])
            aucs = torch.tensor([curve_auc(self.all_ks, b.tolist()) for b in boots[:, i]])
            out[name] = {"curve": curve, "k_half": k_to_halve(self.all_ks, curve),
                         "k_half_ci": _interval(halves, level, cap=max(self.ks)),
                         "auc": curve_auc(self.all_ks, curve), "auc_ci": _interval(aucs, level),
                         "reached_half": float((halves < math.inf).double().mean())}
        return out


def _interval(samples: Tensor, level: float, cap: float | int | None = None) -> list[float]:
    """Percentile interval of bootstrap samples; NaNs dropped; with ``cap``, ``inf`` (never
    reached) is ordered above every finite value and an end beyond ``cap`` reads ``inf``."""
    s = samples[~torch.isnan(samples)].double()
    if s.numel() == 0:
        return [math.nan, math.nan]
    if cap is not None:
        s = torch.where(torch.isinf(s), torch.full_like(s, 1e9), s)
    lo, hi = percentile_interval(s, level)
    ends = [float(lo), float(hi)]
    if cap is not None:
        ends = [math.inf if e > cap else e for e in ends]
    return ends


def damage_sweep(model, probes: Sequence[Probe], rankings: Mapping[str, RetrievalScores | Tensor], *,
                 ks: Sequence[int] = DEFAULT_KS, seeds: int | Sequence[int] = 3,
                 mode: str = "uniform", config: NIAHConfig | None = None, tokenizer=None,
                 needle_set: str = "", out: str | Path | None = None,
                 progress: bool = False) -> DamageResult:
    """NIAH with each ranking's top-K heads masked, and K random heads, for every K.

    Args:
        rankings: name -> scores (a :class:`~rhlens.families.FamilyScores`, any
            :class:`~rhlens.scores.RetrievalScores`) or a ``[layer, head]`` grid.
        ks: the Ks (> 0; K = 0, the unmasked answer, is always run).
        seeds: random-K masks per K (a count, or the seeds).
        mode: how a head is masked (:func:`rhlens.ablation.ablate_heads`; decode steps only).
        config: the NIAH settings (answer budget, prefill chunk: a small chunk lets a probe's
            masks reuse all but the last chunk of its prefill).
        out: a directory for the sweep's resumable log (``niah.jsonl``).
    """
    grid = (int(model.cfg.n_layers), int(model.cfg.n_heads))
    heads, masks = damage_masks(rankings, grid, ks, seeds, mode)
    niah = niah_sweep(model, probes, masks=masks, config=config, tokenizer=tokenizer, out=out,
                      progress=progress)
    return DamageResult(niah=niah, heads=heads, rankings=list(rankings),
                        ks=[k for k in sorted(set(ks)) if k > 0], seeds=seed_list(seeds),
                        needle_set=needle_set)
