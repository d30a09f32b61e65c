"""Planning a sweep: units of work that share engine state, their costs, which rank takes which."""

from __future__ import annotations

import heapq
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from rhlens.errors import ConfigError

__all__ = ["DECODE_STEP_TOKENS", "Shard", "Unit", "decode_step_tokens", "engine_plan", "plan_units",
           "prefix_order", "schedule", "shard", "shard_of"]

# One decode step costs what prefilling this many prompt tokens costs. Measured on Llama-3-8B
# (bf16, one H100, BENCHMARKS.md section A): a lean decode step with the retrieval recorder at
# 8,192 tokens took 23.3 ms, and prefilling 8,192 tokens 0.26 s (32 us a token), so a step is
# worth ~730 tokens. A GPU decodes a batch of prompts in one step ("slab" products cost what
# one row costs), so a batch's steps are shared by its prompts. On a CPU a step is worth far
# less (~27 tokens for the default model): the work queue absorbs such errors
# (rhlens.distributed.sweep).
DECODE_STEP_TOKENS = 700
CPU_DECODE_STEP_TOKENS = 27


def decode_step_tokens(device: Any) -> float:
    """What one decode step costs in prompt tokens prefilled, on ``device``'s kind."""
    kind = getattr(device, "type", str(device).split(":")[0])
    return float(CPU_DECODE_STEP_TOKENS if kind == "cpu" else DECODE_STEP_TOKENS)


@dataclass(frozen=True)
class Unit:
    """Items (indices into a work list, in its order) that run on one rank, and their cost."""

    items: tuple[int, ...]
    cost: float


def plan_units(costs: Sequence[int | float], links: Sequence[bool]) -> list[Unit]:
    """Cut a work list into units: item ``i`` joins item ``i - 1``'s unit when ``links[i]``."""
    if len(costs) != len(links):
        raise ConfigError(f"{len(costs)} costs for {len(links)} links")
    units: list[Unit] = []
    items: list[int] = []
    cost = 0.0
    for i, (c, linked) in enumerate(zip(costs, links)):
        if items and not linked:
            units.append(Unit(tuple(items), cost))
            items, cost = [], 0.0
        items.append(i)
        cost += float(c)
    if items:
        units.append(Unit(tuple(items), cost))
    return units


def prefix_order(prompts: Sequence[Sequence[int]],
                 groups: Sequence[Any] | None = None) -> list[int]:
    """The order (indices into ``prompts``) in which the engine reuses the most KV: by group
    (``groups``, one sortable value per prompt, e.g. ``(length, haystack)``; the groups in
    their sorted order), then by token count (prompts of equal length stay together, so they
    can be decoded in one batch), then by the tokens themselves.

    The engine reuses what a prompt shares with the previous one (its common prefix, cut back
    to whole prefill chunks), and sorted token sequences put the prompts with the longest
    common prefixes side by side: NIAH probes of one haystack, needles and depths mixed, each
    after the one whose needle lies nearest after its own. No order has a larger sum of
    common prefixes between neighbours (the sorted order walks the prompts' prefix tree
    depth first), chunks or not. Ties keep the given order.
    """
    keys = list(groups) if groups is not None else [0] * len(prompts)
    if len(keys) != len(prompts):
        raise ConfigError(f"{len(keys)} groups for {len(prompts)} prompts")

    def tokens(p) -> tuple[int, ...]:  # a probe's ids are a tuple already: no copy
        return p if isinstance(p, tuple) else tuple(int(t) for t in p)

    return sorted(range(len(prompts)), key=lambda i: (keys[i], len(prompts[i]), tokens(prompts[i])))


def engine_plan(prompts: Sequence[Any], *, max_new_tokens: int, batch_size: int = 1,
                chunk: int | None = None,
                prefill_keys: Sequence[Hashable] | None = None,
                groups: Sequence[Hashable] | None = None,
                world: int = 1,
                step_tokens: int | float | None = None) -> tuple[list[float], list[bool]]:
    """Predicted cost of each prompt, and whether it must run after the previous one on the
    same rank, when ``generate_many`` answers ``prompts`` in this order.

    Linked: a prompt the engine decodes in one batch with the previous one (equal length and
    prefill key, ``batch_size`` at a time), or whose prefix it reuses (a shared prefix of at
    least one whole prefill chunk, :func:`rhlens.engine.kv.reusable`). Cost: the tokens
    prefilled (the prompt minus its reused prefix) plus :data:`DECODE_STEP_TOKENS` per decode
    step, a batch's steps shared by its prompts.

    ``chunk``: the prefill chunk the engine runs with (``GenerationConfig.chunk_for(device)``;
    ``None``: the CPU's). ``groups``: one value per prompt; a prompt is never linked to one of
    another group (a unit never spans two lengths of a grid, say, though the engine could
    reuse the start of the haystack they share), and the plan counts no reuse there, since
    units run apart (each its own ``generate_many``, whose KV starts empty).

    ``world``: the ranks that will share the units. With more than one, units too large for
    the ranks to finish together (a grid of few lengths, each one unit) are cut where cutting
    costs least, each cut counted as the engine will then run (the prompt after it prefilled
    whole, batches formed anew), until the longest-first schedule is within
    :data:`BALANCE` of even or the cuts would recompute more than :data:`CUT_BUDGET` of the
    prefill (so the ranks together prefill what one process does, within that share).
    ``step_tokens``: a decode step's cost (default :data:`DECODE_STEP_TOKENS`, a GPU's;
    :func:`decode_step_tokens` gives a device's).
    """
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ConfigError(f"world must be a whole number >= 1, got {world!r}")
    scan = _scan(prompts, chunk, prefill_keys, groups)
    step = float(DECODE_STEP_TOKENS if step_tokens is None else step_tokens) * max_new_tokens
    costs, links, _ = _cost(scan, set(), step, batch_size)
    if world > 1 and len(prompts) > 1:
        costs, links = _balance(scan, costs, links, world, step, batch_size)
    return costs, links


# The plan cuts units while the longest-first schedule's longest rank is more than this share
# above the mean, and while the cuts recompute at most CUT_BUDGET of the prefill tokens.
BALANCE = 0.05
CUT_BUDGET = 0.025


@dataclass(frozen=True)
class _Scan:
    """What the engine can share between each prompt and the previous one."""

    lengths: list[int]  # prompt tokens
    bodies: list[int]  # tokens prefilled without reuse (the prompt minus its last token)
    same: list[bool]  # same prefill key and group as the previous prompt
    reuse: list[int]  # tokens it would reuse after the previous one, in one generate_many


def _scan(prompts, chunk, prefill_keys, groups) -> _Scan:
    import numpy as np

    from rhlens.engine.kv import reusable
    from rhlens.engine.native import DEFAULT_PREFILL_CHUNK

    chunk = chunk or DEFAULT_PREFILL_CHUNK
    n = len(prompts)
    keys = list(prefill_keys) if prefill_keys is not None else [None] * n
    part = list(groups) if groups is not None else [None] * n
    if len(keys) != n or len(part) != n:
        raise ConfigError(f"{n} prompts, {len(keys)} prefill keys, {len(part)} groups")
    scan = _Scan([], [], [], [])
    prev = None
    for i, ids in enumerate(prompts):
        body = np.asarray(ids[:-1] if len(ids) else ids, dtype=np.int64)
        reused = 0
        same = i > 0 and keys[i] == keys[i - 1] and part[i] == part[i - 1]
        if same and prev is not None:
            m = min(len(prev), len(body))
            differ = np.flatnonzero(prev[:m] != body[:m])
            if not differ.size and len(prev) == len(body):
                reused = len(body)  # the same body again: all of its KV is reused (KVPool._reusable)
            else:
                reused = reusable(int(differ[0]) if differ.size else m, chunk)
        scan.lengths.append(len(ids))
        scan.bodies.append(len(body))
        scan.same.append(same)
        scan.reuse.append(reused)
        prev = body
    return scan


def _cost(scan: _Scan, starts: set[int], step: float,
          batch_size: int) -> tuple[list[float], list[bool], list[float]]:
    """Costs, links and prefill tokens when the engine starts afresh at ``starts`` too."""
    prefill: list[float] = []
    links: list[bool] = []
    batch_of: list[int] = []  # each prompt's batch, numbered
    pos = 0
    for i in range(len(scan.lengths)):
        same = scan.same[i] and i not in starts
        reused = scan.reuse[i] if same else 0
        pos = pos + 1 if same and scan.lengths[i] == scan.lengths[i - 1] else 0
        batched = batch_size > 1 and pos % batch_size != 0
        links.append(i > 0 and (batched or reused > 0))
        batch_of.append(batch_of[-1] if batched else (batch_of[-1] + 1 if batch_of else 0))
        prefill.append(float(scan.bodies[i] - reused))
    sizes: dict[int, int] = {}
    for b in batch_of:
        sizes[b] = sizes.get(b, 0) + 1
    return [c + step / sizes[b] for c, b in zip(prefill, batch_of)], links, prefill


def _makespan(units: Sequence[Unit], world: int) -> float:
    return max(sum(units[u].cost for u in rank) for rank in schedule(units, world))


def _balance(scan: _Scan, costs: list[float], links: list[bool], world: int,
             step: float, batch_size: int) -> tuple[list[float], list[bool]]:
    """Cut the plan's units until ``world`` ranks finish together (see :func:`engine_plan`)."""
    starts: set[int] = set()
    budget = CUT_BUDGET * sum(_cost(scan, starts, step, batch_size)[2])
    spent = 0.0
    while True:
        units = plan_units(costs, links)
        total = sum(costs)
        span = _makespan(units, world)
        if span <= (1 + BALANCE) * total / world:
            break
        best = None  # (recomputed tokens, the larger piece, cut, costs, links)
        for u in sorted(units, key=lambda u: -u.cost)[:world]:  # the largest units
            for i in u.items[1:]:
                lost = float(scan.reuse[i]) if scan.same[i] else 0.0
                if spent + lost > budget:
                    continue
                new_costs, new_links, _ = _cost(scan, starts | {i}, step, batch_size)
                new_span = _makespan(plan_units(new_costs, new_links), world)
                if new_span >= span:
                    continue
                key = (new_span + lost, lost, i)
                if best is None or key < best[0]:
                    best = (key, lost, i, new_costs, new_links)
        if best is None:
            break
        _, lost, i, costs, links = best
        starts.add(i)
        spent += lost
    return costs, links


def schedule(units: Sequence[Unit], world: int) -> list[list[int]]:
    """Longest-processing-time-first assignment: each unit, most costly first, goes to the
    rank with the least work so far. Returns the unit indices of each rank, in the order it
    runs them (what the work queue does when the costs are right)."""
    if world < 1:
        raise ConfigError(f"world must be >= 1, got {world}")
    heap = [(0.0, r) for r in range(world)]
    out: list[list[int]] = [[] for _ in range(world)]
    for u in sorted(range(len(units)), key=lambda i: (-units[i].cost, i)):
        load, r = heapq.heappop(heap)
        out[r].append(u)
        heapq.heappush(heap, (load + units[u].cost, r))
    return out


class Shard(list):
    """Process ``rank`` of ``world``'s share of a work list (from :func:`shard`). An analysis
    given a Shard with ``out=DIR`` logs into its own shard of ``DIR``; :func:`merge_shards`
    folds the shards into ``DIR``'s logs."""

    def __init__(self, items: Sequence[Any], rank: int, world: int) -> None:
        super().__init__(items)
        self.rank, self.world = rank, world

    @property
    def launch(self) -> str:
        return f"shard-of-{self.world}"


def _item_cost(item: Any) -> float:
    """An item's tokens plus its share of a batch's decode steps (the detection defaults: 50
    new tokens, 8 probes a batch); 1 for an item without tokens."""
    n = getattr(item, "n_tokens", None)
    return float(n) + DECODE_STEP_TOKENS * 50 / 8 if isinstance(n, int) else 1.0


def shard(work: Sequence[Any], rank: int, world: int, *,
          costs: Sequence[int | float] | None = None) -> Shard:
    """Process ``rank`` of ``world``'s share of ``work`` (probes, pairs, any items), in
    ``work``'s order.

    Probes of one length and haystack stay together, every needle with every depth (the
    engine reuses their shared prefix and decodes them together: :func:`prefix_order`); the
    groups are assigned by :func:`schedule` on their costs
    (``costs``, one per item; by default prompt tokens plus the share of a batch's decode
    steps, the cost model of a torchrun launch). Every process must pass the same ``work``.
    """
    work = list(getattr(work, "probes", work))
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ConfigError(f"world must be a whole number >= 1, got {world!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world:
        raise ConfigError(f"rank must be a whole number in [0, {world - 1}], got {rank!r}")
    if costs is not None and len(costs) != len(work):
        raise ConfigError(f"{len(costs)} costs for {len(work)} items")
    groups: dict[Any, list[int]] = {}
    for i, item in enumerate(work):
        meta = getattr(item, "meta", None) or {}
        key = (getattr(item, "length", None), meta.get("haystack_sha256", meta.get("haystack")))
        groups.setdefault(key if key != (None, None) else ("item", i), []).append(i)
    units = [Unit(tuple(items), sum(float(costs[i]) if costs is not None else _item_cost(work[i])
                                    for i in items)) for items in groups.values()]
    mine = sorted(i for u in schedule(units, world)[rank] for i in units[u].items)
    return Shard([work[i] for i in mine], rank, world)


def shard_of(work: Any) -> Shard | None:
    """``work`` itself when it is a :class:`Shard` (an analysis checks before copying it)."""
    return work if isinstance(work, Shard) else None
