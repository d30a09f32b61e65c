"""Which heads to knock out: one home for every way to choose them.

A :class:`Mask` is a set of ``(layer, head)`` pairs with how (``mode``) and when (``phase``)
to knock them out; :mod:`rhlens.ablation` turns it into hooks. Masks come from:

* :func:`top_k_mask`: the K best retrieval heads, by the one top-K rule
  (:func:`rhlens.stats.top_k_heads`: ties by layer, then head);
* :func:`random_k_mask` / :func:`random_k_heads`: K heads drawn from the model's real grid,
  never a retrieval head (the draw itself is :func:`rhlens.stats.random_heads`);
* :func:`parse_mask`: the specs a user types (``none``, ``top:K``, ``random:K[:seed]``,
  ``heads:L.H,...``);
* :func:`sweep_masks`: a K sweep (none, top-K and random-K per seed), with its checked
  :func:`k_list` and :func:`seed_list`;
* :func:`as_masks`: whatever a user hands an analysis (``None``, masks, ``(layer, head)``
  pairs, or retrieval scores with ``k``), as a list led by the unmasked baseline.
"""

from __future__ import annotations

import math
from collections.abc import Sequence, Sized
from dataclasses import dataclass
from typing import Any, Literal

from rhlens.errors import ConfigError
from rhlens.retrieval.scores import RetrievalScores
from rhlens.stats import Head, heads_above, random_heads, top_k_heads
from rhlens.validate import (
    DRAWS_WHY,
    MAX_DRAWS,
    check_count,
    check_finite,
    check_heads,
    parse_heads,
    whole_number,
)

__all__ = [
    "MASK_SPECS",
    "RETRIEVAL_THRESHOLD",
    "Head",
    "Mask",
    "as_masks",
    "k_list",
    "parse_mask",
    "random_heads",
    "random_k_heads",
    "random_k_mask",
    "seed_list",
    "sweep_masks",
    "top_k_mask",
]

Mode = Literal["uniform", "zero", "mean"]
PhaseName = Literal["decode", "all"]


@dataclass(frozen=True)
class Mask:
    """A set of heads to knock out, and how. ``Mask.none()`` is the unmasked baseline."""

    heads: Sequence[Any] = ()  # (layer, head) pairs, checked; kept as a sorted tuple of ints
    mode: Mode = "uniform"
    phase: PhaseName = "decode"
    label: str = ""

    def __post_init__(self) -> None:
        # Exact types (a string, float or bool is refused, never coerced with int()).
        object.__setattr__(self, "heads", tuple(sorted(set(check_heads(self.heads)))))
        if self.mode not in ("uniform", "zero", "mean"):
            raise ConfigError(f"mode must be uniform, zero or mean, got {self.mode!r}")
        if self.phase not in ("decode", "all"):
            raise ConfigError(f"phase must be decode or all, got {self.phase!r}")
        if not self.label:
            object.__setattr__(self, "label", f"{len(self.heads)} heads" if self.heads else "none")

    @classmethod
    def none(cls) -> Mask:
        return cls((), label="none")

    def to_dict(self) -> dict:
        return {"heads": [list(h) for h in self.heads], "mode": self.mode, "phase": self.phase,
                "label": self.label}


# ---- choosing heads ------------------------------------------------------------------------
RETRIEVAL_THRESHOLD = 0.1  # the paper's line between retrieval heads and the rest


def _grid(scores, grid: tuple[int, int] | None) -> tuple[int, int]:
    if grid is not None:
        return int(grid[0]), int(grid[1])
    if scores is None:
        raise ConfigError("need the model's grid (n_layers, n_heads) or retrieval scores")
    return scores.n_layers, scores.n_heads


def _check_k(k: int, n_cells: int, what: str) -> None:
    if not 1 <= k <= n_cells:
        raise ConfigError(f"{what}: K must be between 1 and the model's {n_cells} heads, got {k}")


def top_k_mask(scores, k: int, *, mode: Mode = "uniform", phase: PhaseName = "decode") -> Mask:
    """The ``k`` best retrieval heads (:func:`rhlens.stats.top_k_heads`: ties by layer, head),
    labelled ``top-k``."""
    k = whole_number(k, "K")
    _check_k(k, scores.n_layers * scores.n_heads, f"top-{k}")
    mean = check_finite(scores.mean, "the retrieval scores")  # NaN would rank as the lowest head
    return Mask(tuple(top_k_heads(mean, k)), mode, phase, label=f"top-{k}")


def random_k_heads(scores, k: int, *, seed: int = 0, grid: tuple[int, int] | None = None,
                   exclude_threshold: float = RETRIEVAL_THRESHOLD) -> list[Head]:
    """``k`` heads drawn from the model's grid, never a retrieval head nor a top-``k`` head.

    ``grid`` is the model's ``(n_layers, n_heads)`` (default: the scores'); without
    ``scores``, heads are drawn from the whole grid. Heads scoring above
    ``exclude_threshold`` and the top-``k`` heads are excluded, so a random mask never
    hides a retrieval head.
    """
    n_layers, n_heads = _grid(scores, grid)
    _check_k(k, n_layers * n_heads, f"random-{k}")
    banned: list[Head] = []
    if scores is not None:
        if (scores.n_layers, scores.n_heads) != (n_layers, n_heads):
            raise ConfigError(f"the scores cover {scores.n_layers} x {scores.n_heads} heads, the "
                              f"model {n_layers} x {n_heads}: scores of another model?")
        banned = sorted(set(heads_above(scores.mean, exclude_threshold)) |
                        set(top_k_heads(scores.mean, k)))
    return random_heads(n_layers, n_heads, k, seed=seed, exclude=banned)


def random_k_mask(scores, k: int, *, seed: int = 0, grid: tuple[int, int] | None = None,
                  mode: Mode = "uniform", phase: PhaseName = "decode") -> Mask:
    """:func:`random_k_heads` as a mask labelled ``random-k-s<seed>``."""
    heads = random_k_heads(scores, k, seed=seed, grid=grid)
    return Mask(tuple(heads), mode, phase, label=f"random-{k}-s{seed}")


MASK_SPECS = "none, top:K, random:K[:seed] or heads:L.H,L.H,..."


def parse_mask(spec: str, *, grid: tuple[int, int] | None = None, scores=None,
               mode: Mode = "uniform", phase: PhaseName = "decode") -> Mask:
    """A mask from a spec: ``none``, ``top:K``, ``random:K[:seed]`` or ``heads:L.H,L.H``.

    ``grid`` is the model's ``(n_layers, n_heads)``: heads and K are checked against it (and
    random heads drawn from it). ``top:K`` needs ``scores``; ``random:K`` uses them, when
    given, to leave retrieval heads out.
    """
    if not isinstance(spec, str):
        raise ConfigError(f"a mask spec is a string ({MASK_SPECS}), got {spec!r}")
    kind, _, rest = spec.strip().partition(":")
    if kind == "none" and not rest:
        return Mask((), mode, phase, label="none")
    if kind == "heads":
        try:
            heads = parse_heads(rest, grid)
        except ConfigError as exc:
            raise ConfigError(f"mask {spec.strip()!r}: {exc}") from None
        return Mask(tuple(heads), mode, phase, label=spec.strip())
    if kind not in ("top", "random"):
        raise ConfigError(f"a mask is {MASK_SPECS}; got {spec!r}")
    parts = rest.split(":")
    if (not rest or len(parts) > (2 if kind == "random" else 1) or
            not all(x.strip().lstrip("-").isdecimal() and x.isascii() for x in parts)):
        form = "top:K" if kind == "top" else "random:K or random:K:SEED"
        raise ConfigError(f"mask {spec!r}: expected {form} with whole numbers")
    k, seed = int(parts[0]), int(parts[1]) if len(parts) > 1 else 0
    if kind == "top":
        if scores is None:
            raise ConfigError(f"mask {spec}: top-K needs retrieval scores (--scores: a detection "
                              "run or a paper JSON file)")
        if grid is not None and (scores.n_layers, scores.n_heads) != tuple(grid):
            raise ConfigError(f"the scores cover {scores.n_layers} x {scores.n_heads} heads, the "
                              f"model {grid[0]} x {grid[1]}: scores of another model?")
        return top_k_mask(scores, k, mode=mode, phase=phase)
    return random_k_mask(scores, k, seed=seed, grid=grid, mode=mode, phase=phase)


def seed_list(seeds: int | Sequence[int]) -> list[int]:
    """``seeds`` random draws per K: a count (>= 1) or distinct seeds (>= 0)."""
    if isinstance(seeds, bool):
        raise ConfigError(f"seeds must be a count >= 1 or a list of seeds, got {seeds!r}")
    if isinstance(seeds, int):
        if seeds < 1:
            raise ConfigError(f"seeds must be >= 1 (random masks per K), got {seeds}")
        check_count(seeds, "seeds", maximum=MAX_DRAWS, why=DRAWS_WHY)  # before range() expands it
        return list(range(seeds))
    if isinstance(seeds, Sized) and len(seeds) > MAX_DRAWS:
        raise ConfigError(f"seeds holds {len(seeds)} seeds, above the limit of {MAX_DRAWS} ({DRAWS_WHY})")
    out = list(seeds)
    if not out or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in out):
        raise ConfigError(f"seeds must be a non-empty list of whole numbers >= 0, got {out!r}")
    if len(set(out)) != len(out):
        raise ConfigError(f"seeds must be distinct, got {out!r}")
    return out


def k_list(ks: Sequence[int], n_cells: int) -> list[int]:
    """Sorted distinct Ks, each in [0, heads], at least one of them > 0."""
    if isinstance(ks, (str, bytes)) or not isinstance(ks, Sequence):
        raise ConfigError(f"ks must be a list of head counts, got {ks!r}")
    if not all(isinstance(k, int) and not isinstance(k, bool) for k in ks):
        raise ConfigError(f"every K must be a whole number, got {list(ks)!r}")
    out = sorted(set(ks))
    if not any(k > 0 for k in out):
        raise ConfigError(f"ks needs at least one K > 0 (heads to mask), got {list(ks)!r}")
    if out[0] < 0:
        raise ConfigError(f"K must be >= 0, got {out[0]}")
    if out[-1] > n_cells:
        raise ConfigError(f"K={out[-1]} exceeds the model's {n_cells} heads")
    return out


def sweep_masks(scores, ks: Sequence[int], seeds: int | Sequence[int] = 3, *,
                mode: str = "uniform", phase: str = "decode",
                exclude_threshold: float = 0.1) -> list[Mask]:
    """The masks of a K sweep: none, top-K, and random-K for each seed.

    Random heads are drawn from the model's whole grid minus every head scoring above
    ``exclude_threshold`` (and minus the top-K), so a random mask never hides a retrieval
    head. Every argument is checked here, before any compute.
    """
    seed_list_ = seed_list(seeds)
    k_list_ = k_list(ks, scores.n_layers * scores.n_heads)
    if not isinstance(exclude_threshold, (int, float)) or not math.isfinite(exclude_threshold):
        raise ConfigError(f"exclude_threshold must be a finite number, got {exclude_threshold!r}")
    retrieval = scores.retrieval_heads(exclude_threshold)
    masks = [Mask((), mode, phase, label="none")]
    for k in k_list_:
        if k == 0:
            continue
        top = scores.top_heads(k)
        masks.append(Mask(tuple(top), mode, phase, label=f"top-{k}"))
        banned = sorted(set(retrieval) | set(top))
        for s in seed_list_:
            heads = random_heads(scores.n_layers, scores.n_heads, k, seed=s, exclude=banned)
            masks.append(Mask(tuple(heads), mode, phase, label=f"random-{k}-s{s}"))
    return masks


def as_masks(masks: Any = None, *, k: int | None = None, seeds: int | Sequence[int] = 0,
             mode: str = "uniform") -> list[Mask]:
    """The masks of a run, the unmasked baseline ``"none"`` first (added when missing).

    ``masks`` may be ``None`` (the baseline only); a :class:`Mask` or a list
    of them; a list of ``(layer, head)`` pairs (one mask, labelled ``heads-<n>``); or a
    :class:`~rhlens.retrieval.RetrievalScores` with ``k``: its top-``k`` heads, plus ``k``
    random non-retrieval heads per seed in ``seeds`` (a count or a list; none by default),
    as :func:`sweep_masks` draws them.
    ``mode`` is how the heads of pairs and scores are knocked out. Masks act only while
    answering (``phase="decode"``), as in the paper.
    """
    if isinstance(masks, RetrievalScores):
        if k is None or isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(f"masks from retrieval scores need k >= 1 (the top-K heads), got {k!r}")
        # sweep_masks always draws random controls: with no seeds keep none and top-K only.
        out = sweep_masks(masks, ks=[k], seeds=seeds or 1, mode=mode)
        if not seeds:
            out = [m for m in out if not m.label.startswith("random-")]
    else:
        if k is not None:
            raise ConfigError("k picks the top-K heads of RetrievalScores; pass the scores as masks")
        items = [] if masks is None else [masks] if isinstance(masks, Mask) else list(masks)
        if items and all(isinstance(m, Mask) for m in items):
            out = items
        elif items and not any(isinstance(m, Mask) for m in items):
            out = [Mask(tuple(_pair(h) for h in items), mode, label=f"heads-{len(items)}")]
        elif items:
            raise ConfigError("masks: give Mask objects or (layer, head) pairs, not a mix")
        else:
            out = []
    if not any(m.label == "none" for m in out):
        out = [Mask.none(), *out]
    labels = [m.label for m in out]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"mask labels must be unique, got {labels}")
    if any(m.phase == "all" and m.heads for m in out):
        raise ConfigError("CoT masks act while answering (phase='decode'), as in the paper")
    return out


def _pair(head: Any) -> tuple[int, int]:
    try:
        layer, h = head
        return int(layer), int(h)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"heads are (layer, head) pairs, got {head!r}") from exc
