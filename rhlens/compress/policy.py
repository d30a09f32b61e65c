"""Head-selective KV-cache policies: which KV heads keep the whole context, and what a budget buys in bytes.

A policy keeps the full keys and values for a chosen set of KV heads and, for every other
KV head, only the ``sink`` first tokens plus a ``window`` of the most recent ones (the
StreamingLLM cache, per head). The budget is the share of the full cache's bytes, counted
exactly at a given context length from the model's real cache (:class:`CacheLayout`):

* a global-attention layer holds every token: ``T`` per KV head, or ``min(T, sink + window)``
  for a streaming head;
* a sliding-window layer (Gemma-3's local layers) already holds only its window
  (``min(T, W - 1)`` tokens between steps, as HF's ``DynamicSlidingWindowLayer`` keeps them):
  a policy leaves it as it is, and its bytes are a fixed cost in the full and in the compressed
  cache alike. Only the KV heads of global layers are ranked, kept or streamed.

A budget buys the largest number of full KV heads whose bytes stay within it (never more);
a budget below the all-streaming floor (every selectable head streaming) is refused.

Under grouped-query attention a KV head serves ``g`` query heads, and a score grid ranks query
heads: KV heads are ranked by their query heads' ``max`` (default) or ``mean``. Max, because
evicting a KV head's context blinds every query head reading it: one strong retrieval head in a
group needs the whole group's KV, and a mean would let three mediocre heads outrank it. All
rankings go through :func:`rhlens.stats.rank_heads` (ties by layer, then KV head).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from rhlens.engine.bridge import config_attention_shape, hf_model
from rhlens.engine.runner import check_count
from rhlens.errors import ConfigError
from rhlens.retrieval.scores import RetrievalScores
from rhlens.stats import random_heads, rank_heads
from rhlens.store.results import Config

__all__ = [
    "CacheLayout",
    "CompressConfig",
    "HeadPolicy",
    "budget_policy",
    "full_heads_for_budget",
    "full_policy",
    "kv_grid",
    "policy_table",
    "random_policy",
    "rank_kv_heads",
    "streaming_policy",
]

KVHead = tuple[int, int]  # (layer, KV head)
Pool = Literal["max", "mean"]


def _count(name: str, value: Any, low: int) -> int:
    check_count(name, value, low)  # the engine's settings rule: an integer >= low, not a bool
    return int(value)


@dataclass(frozen=True)
class CompressConfig(Config):
    """Settings of head-selective policies.

    Attributes:
        sink: first tokens every streaming head keeps (StreamingLLM's attention sinks).
        window: most recent tokens every streaming head keeps (the token being decoded
            included). The default, 124 (+ 4 sinks = 128 tokens a head), covers a NIAH
            prompt's question and a 50-token answer.
        pool: how a KV head's score is made from its query heads' (``"max"``: see the
            module's docstring; ``"mean"``).
    """

    sink: int = 4
    window: int = 124
    pool: Pool = "max"

    def __post_init__(self) -> None:
        _count("sink", self.sink, 0)
        _count("window", self.window, 1)
        if self.pool not in ("max", "mean"):
            raise ConfigError(f"pool must be 'max' or 'mean', got {self.pool!r}")


# ---------------------------------------------------------------------------------------
# The cache a model really holds
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CacheLayout:
    """The shape of a model's KV cache: per layer, KV heads of ``head_dim`` values of
    ``itemsize`` bytes, and the layer's sliding window (``None``: a global layer)."""

    n_heads: int
    n_kv: int
    head_dim: int
    itemsize: int
    sliding: tuple[int | None, ...]

    def __post_init__(self) -> None:
        if self.n_kv < 1 or self.n_heads % self.n_kv:
            raise ConfigError(f"{self.n_heads} query heads cannot share {self.n_kv} KV heads")
        if not self.sliding:
            raise ConfigError("a cache layout needs at least one layer")
        if not any(w is None for w in self.sliding):
            raise ConfigError("every layer has a sliding window: no KV head keeps the whole "
                              "context, so there is nothing for a policy to choose")

    @classmethod
    def of(cls, model) -> CacheLayout:
        """The layout of a bridged model's cache (its dtype, its layers' windows)."""
        hf = hf_model(model)
        return cls.from_config(hf.config, next(hf.parameters()).dtype.itemsize)

    @classmethod
    def from_config(cls, config, itemsize: int) -> CacheLayout:
        """The layout of the cache a model with this HF ``config`` holds in a dtype of
        ``itemsize`` bytes, known before any weight is read (what :meth:`of` finds once loaded)."""
        from transformers import DynamicCache

        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        n_heads, n_kv, head_dim = config_attention_shape(text)
        sliding = tuple(int(layer.sliding_window) if getattr(layer, "is_sliding", False) else None
                        for layer in DynamicCache(config=config).layers)  # as new_cache() makes it
        return cls(n_heads, n_kv, head_dim, int(itemsize), sliding)

    @property
    def n_layers(self) -> int:
        return len(self.sliding)

    @property
    def group(self) -> int:
        """Query heads per KV head."""
        return self.n_heads // self.n_kv

    @property
    def global_layers(self) -> list[int]:
        return [la for la, w in enumerate(self.sliding) if w is None]

    @property
    def selectable(self) -> list[KVHead]:
        """The KV heads a policy may keep whole or stream: those of global layers."""
        return [(la, h) for la in self.global_layers for h in range(self.n_kv)]

    def tokens_held(self, layer: int, context: int) -> int:
        """Tokens one KV head of ``layer`` holds at ``context`` tokens, uncompressed."""
        w = self.sliding[layer]
        return context if w is None else min(context, w - 1)

    def token_bytes(self) -> int:
        """Bytes one token costs in one KV head (its key and its value)."""
        return 2 * self.head_dim * self.itemsize

    def full_bytes(self, context: int) -> int:
        """Bytes of the uncompressed cache at ``context`` tokens."""
        return self.n_kv * self.token_bytes() * sum(
            self.tokens_held(la, context) for la in range(self.n_layers))

    def fixed_bytes(self, context: int) -> int:
        """Bytes no policy changes (sliding-window layers)."""
        return self.n_kv * self.token_bytes() * sum(
            self.tokens_held(la, context) for la, w in enumerate(self.sliding) if w is not None)

    def bytes_with(self, n_full: int, sink: int, window: int, context: int) -> int:
        """Bytes at ``context`` tokens with ``n_full`` selectable KV heads whole and the rest
        keeping ``sink + window`` tokens."""
        n_sel = len(self.selectable)
        if not 0 <= n_full <= n_sel:
            raise ConfigError(f"{n_full} full KV heads: this model has {n_sel} to choose from")
        streamed = min(context, sink + window)
        return self.fixed_bytes(context) + self.token_bytes() * (
            n_full * context + (n_sel - n_full) * streamed)

    def check_context(self, context: int) -> int:
        return _count("context (tokens)", context, 1)


def _check_budget(budget: float) -> float:
    if (isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget)
            or not 0 < budget <= 1):
        raise ConfigError(f"a KV budget is a share of the full cache's bytes in (0, 1], got {budget!r}")
    return float(budget)


def full_heads_for_budget(layout: CacheLayout, context: int, budget: float, sink: int,
                          window: int) -> int:
    """The most selectable KV heads that can be kept whole within ``budget`` (a share of the
    full bytes at ``context`` tokens), the others keeping ``sink + window`` tokens.

    Raises:
        ConfigError: the budget is below the all-streaming floor.
    """
    budget = _check_budget(budget)
    layout.check_context(context)
    full = layout.full_bytes(context)
    floor = layout.bytes_with(0, sink, window, context)
    allowed = budget * full
    if floor > allowed * (1 + 1e-12):
        raise ConfigError(
            f"a budget of {budget:g} of the KV bytes is below the floor of {floor / full:.4f} at "
            f"{context} tokens (every KV head keeping {sink} sink + {window} recent tokens); "
            + ("raise the budget or shrink the window" if sink + window < context else
               f"the sink and window already hold the whole {context}-token context: use a window "
               f"below {max(1, context - sink)} (window, --window)"))
    per_head = layout.token_bytes() * (context - min(context, sink + window))
    if per_head == 0:
        return len(layout.selectable)
    k = max(0, int((allowed - floor) // per_head))
    while k < len(layout.selectable) and layout.bytes_with(k + 1, sink, window, context) <= allowed:
        k += 1  # guard against float rounding of the division
    while k > 0 and layout.bytes_with(k, sink, window, context) > allowed:
        k -= 1
    return min(k, len(layout.selectable))


# ---------------------------------------------------------------------------------------
# Policies
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HeadPolicy(Config):
    """Which KV heads keep the whole context; every other KV head of a global layer keeps
    ``sink`` first + ``window`` recent tokens (sliding-window layers are left as they are).

    Attributes:
        full: the KV heads kept whole, ``(layer, kv_head)``.
        sink, window: what a streaming head keeps.
        label: a name for tables and logs.
        kind: ``"full"``, ``"streaming"``, ``"random"`` or the ranking's name.
        budget: the budget the policy was made for (``None``: made by hand).
        seed: the seed of a random policy.
    """

    full: tuple[tuple[int, int], ...]
    sink: int
    window: int
    label: str = ""
    kind: str = "custom"
    budget: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        try:
            heads = tuple(sorted({(int(a), int(b)) for a, b in self.full}))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"full heads are (layer, kv_head) pairs, got {self.full!r}") from exc
        object.__setattr__(self, "full", heads)
        _count("sink", self.sink, 0)
        _count("window", self.window, 1)
        if not self.label:
            object.__setattr__(self, "label", f"{len(heads)} full KV heads")

    def check(self, layout: CacheLayout) -> HeadPolicy:
        """Refuse a policy naming a KV head the model lacks or one of a sliding layer."""
        allowed = set(layout.selectable)
        bad = [h for h in self.full if h not in allowed]
        if bad:
            la, h = bad[0]
            where = ("a sliding-window layer, whose cache is already a window"
                     if 0 <= la < layout.n_layers and 0 <= h < layout.n_kv
                     else f"outside this model's {layout.n_layers} layers x {layout.n_kv} KV heads")
            raise ConfigError(f"policy {self.label!r}: KV head ({la}, {h}) is {where}")
        return self

    def is_full(self, layout: CacheLayout) -> bool:
        """Every selectable KV head kept whole: the uncompressed cache."""
        return len(self.full) == len(layout.selectable)

    def signature(self, layout: CacheLayout) -> tuple:
        """Equal for policies that attend to the same keys (so answer the same)."""
        return ("full",) if self.is_full(layout) else (self.full, self.sink, self.window)

    def streaming(self, layout: CacheLayout) -> list[KVHead]:
        """The selectable KV heads that stream."""
        full = set(self.full)
        return [h for h in layout.selectable if h not in full]

    def streaming_query_heads(self, layout: CacheLayout, layer: int) -> list[int]:
        """Query heads of ``layer`` whose KV head streams (all ``group`` of them per KV head)."""
        g = layout.group
        return [kv * g + i for la, kv in self.streaming(layout) if la == layer for i in range(g)]

    def bytes(self, layout: CacheLayout, context: int) -> int:
        return layout.bytes_with(len(self.check(layout).full), self.sink, self.window, context)

    def share(self, layout: CacheLayout, context: int) -> float:
        """This policy's KV bytes over the full cache's, at ``context`` tokens."""
        return self.bytes(layout, context) / layout.full_bytes(context)

    def describe(self, layout: CacheLayout, context: int) -> dict[str, Any]:
        """JSON-ready: the policy, its bytes and share at ``context`` tokens."""
        return {**self.to_dict(), "n_full": len(self.full), "n_selectable": len(layout.selectable),
                "context": context, "bytes": self.bytes(layout, context),
                "full_bytes": layout.full_bytes(context), "share": self.share(layout, context)}


def kv_grid(ranking: Any, layout: CacheLayout, pool: Pool = "max") -> Float[Tensor, "layer kv_head"]:
    """A ``[layer, kv_head]`` score grid from a ranking: a
    :class:`~rhlens.scores.RetrievalScores`, a ``[layer, query head]`` grid (pooled over each
    KV head's query heads by ``pool``) or a ``[layer, kv_head]`` grid (used as it is)."""
    if pool not in ("max", "mean"):
        raise ConfigError(f"pool must be 'max' or 'mean', got {pool!r}")
    if isinstance(ranking, RetrievalScores):
        if ranking.n_layers != layout.n_layers or ranking.n_heads != layout.n_heads:
            raise ConfigError(f"the scores are for a {ranking.n_layers}x{ranking.n_heads} model, this "
                              f"model is {layout.n_layers}x{layout.n_heads}")
        if ranking.n_kv_heads not in (None, layout.n_kv):
            raise ConfigError(f"the scores say {ranking.n_kv_heads} KV heads, the model has {layout.n_kv}")
        grid = ranking.mean
    elif isinstance(ranking, Tensor):
        grid = ranking.detach().float().cpu()
    else:
        raise ConfigError("a ranking is RetrievalScores or a [layer, head] tensor, "
                          f"got {type(ranking).__name__}")
    widths = (layout.n_heads, layout.n_kv)
    if grid.ndim != 2 or grid.shape[0] != layout.n_layers or grid.shape[1] not in widths:
        raise ConfigError(f"a score grid for this model is [{layout.n_layers}, {layout.n_heads}] (query "
                          f"heads) or [{layout.n_layers}, {layout.n_kv}] (KV heads), got {list(grid.shape)}")
    if grid.shape[1] == layout.n_kv:
        return grid
    # One home for pooling query heads into KV heads: RetrievalScores.kv_aggregate.
    one = RetrievalScores(per_probe=grid[None], success=torch.ones(1, dtype=torch.bool),
                          model_name="grid", n_kv_heads=layout.n_kv)
    return one.kv_aggregate(pool)


def rank_kv_heads(ranking: Any, layout: CacheLayout, pool: Pool = "max") -> list[KVHead]:
    """The selectable KV heads, best first (ties by layer, then KV head; NaN last)."""
    allowed = set(layout.selectable)
    return [h for h in rank_heads(kv_grid(ranking, layout, pool)) if h in allowed]


def budget_policy(ranking: Any, layout: CacheLayout, context: int, budget: float,
                  config: CompressConfig | None = None, *, name: str = "ranked") -> HeadPolicy:
    """The best-ranked KV heads kept whole, as many as ``budget`` buys at ``context`` tokens."""
    config = config or CompressConfig()
    k = full_heads_for_budget(layout, context, budget, config.sink, config.window)
    heads = rank_kv_heads(ranking, layout, config.pool)[:k]
    return HeadPolicy(tuple(heads), config.sink, config.window, label=f"{name}@{budget:g}",
                      kind=name, budget=budget)


def random_policy(layout: CacheLayout, context: int, budget: float, seed: int,
                  config: CompressConfig | None = None) -> HeadPolicy:
    """As many KV heads as ``budget`` buys, drawn uniformly among the selectable ones with
    :func:`rhlens.stats.random_heads` on the ``[layer, kv_head]`` grid (nothing excluded
    but the KV heads of sliding-window layers)."""
    config = config or CompressConfig()
    k = full_heads_for_budget(layout, context, budget, config.sink, config.window)
    allowed = set(layout.selectable)
    banned = [(la, h) for la in range(layout.n_layers) for h in range(layout.n_kv) if (la, h) not in allowed]
    heads = random_heads(layout.n_layers, layout.n_kv, k, seed=seed, exclude=banned)
    return HeadPolicy(tuple(heads), config.sink, config.window, label=f"random-s{seed}@{budget:g}",
                      kind="random", budget=budget, seed=seed)


def streaming_policy(layout: CacheLayout, context: int, budget: float, sink: int = 4) -> HeadPolicy:
    """StreamingLLM at ``budget``: every selectable KV head keeps ``sink`` + the largest recent
    window whose bytes stay within the budget at ``context`` tokens (at most the whole context)."""
    budget = _check_budget(budget)
    layout.check_context(context)
    _count("sink", sink, 0)
    allowed = budget * layout.full_bytes(context) - layout.fixed_bytes(context)
    per_token = layout.token_bytes() * len(layout.selectable)  # one more token in every head
    held = min(context, int(allowed // per_token))
    while held < context and per_token * (held + 1) <= allowed:  # float rounding guards
        held += 1
    while held > 0 and per_token * held > allowed:
        held -= 1
    if held < min(context, sink + 1):
        raise ConfigError(f"a budget of {budget:g} at {context} tokens buys {held} tokens a KV head: "
                          f"not even the {sink} sink tokens plus one recent token")
    return HeadPolicy((), sink, max(1, held - sink), label=f"streaming@{budget:g}",
                      kind="streaming", budget=budget)


def full_policy(layout: CacheLayout, sink: int = 4, window: int = 124) -> HeadPolicy:
    """The uncompressed cache: every selectable KV head whole."""
    return HeadPolicy(tuple(layout.selectable), sink, window, label="full", kind="full", budget=1.0)


def policy_table(policies: Sequence[HeadPolicy], layout: CacheLayout, context: int) -> list[dict[str, Any]]:
    """:meth:`HeadPolicy.describe` of each policy (JSON-ready)."""
    return [p.describe(layout, context) for p in policies]
