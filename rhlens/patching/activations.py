"""Patching any per-head activation from a clean ActivationCache into a corrupted run, as TL does.

The way in for a user who already has a bridge, two prompts and a cache::

    clean_logits, cache = model.run_with_cache(clean_tokens)
    result = patch_activation(model, corrupted_tokens, cache, metric, activation="v",
                              clean_logits=clean_logits)
    result.effects                      # [example, layer, head], 1 = restores the clean metric
    result.to_transformer_lens()        # TransformerLens' PatchingResult

Each (layer, head) cell is one forward of the corrupted tokens with one hook set attached
through ``model.hooks(...)`` (detached when the forward ends, whatever happens), writing the
clean activation of that head at the chosen positions: every position, a list of them, or the
answer positions of a :class:`~rhlens.patching.PatchPair`. The names that can be patched are
listed in :mod:`rhlens.patching.config`; ``ov`` recomputes the head's ``z`` from its own
attention pattern and the clean values, which patches what the head moves without changing
where it (or any other head of its KV group) looks.

The same cell runner serves :func:`rhlens.patching.patch_heads` for every activation but the
fast ``z`` path (:mod:`rhlens.patching.runner`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import einops
import torch
from jaxtyping import Float
from torch import Tensor

from rhlens.errors import ConfigError
from rhlens.patching.config import (
    PatchConfig,
    _model_name,
    kv_indexed,
    model_grid,
    normalise,
    plan_cells,
)
from rhlens.patching.pairs import PatchPair
from rhlens.patching.results import HeadPatchingResult
from rhlens.validate import check_token_rows

__all__ = ["patch_activation"]

Head = tuple[int, int]
Hook = tuple[str, Callable]
# The hook each activation reads from its source; ``ov`` writes z from the source's values.
_SOURCE = {"q": "q", "k": "k", "v": "v", "z": "z", "pattern": "pattern", "result": "result",
           "ov": "v"}


def hook_name(layer: int, name: str) -> str:
    return f"blocks.{layer}.attn.hook_{name}"


def source_names(atoms: Sequence[str], layers: Sequence[int]) -> list[str]:
    """The hooks a source run (or cache) must hold for patching ``atoms`` at ``layers``."""
    wanted = sorted({_SOURCE[a] for a in atoms})
    return [hook_name(layer, n) for layer in sorted(set(layers)) for n in wanted]


def needs_patterns(atoms: Sequence[str]) -> bool:
    """Whether the runs need the bridge's own attention (patterns, per-head results)."""
    return bool({"pattern", "result", "ov"} & set(atoms))


@contextlib.contextmanager
def attn_results(model, on: bool) -> Iterator[None]:
    """``hook_result`` fires only while the bridge computes per-head results; switched on for
    the runs that patch it and back off after."""
    was = bool(getattr(model.cfg, "use_attn_result", False))
    if on and not was:
        model.set_use_attn_result(True)
    try:
        yield
    finally:
        if on and not was:
            model.set_use_attn_result(False)


def cell_hooks(layer: int, head: int, atoms: Sequence[str], source: Any,
               positions: Tensor | None, group: int, offset: int = 0) -> list[Hook]:
    """The hooks that write one head's source activations into a run.

    ``head`` is a KV head when ``atoms`` are ``k``/``v`` alone, else a query head (whose KV
    head is ``head // group``). ``positions`` index the hooked run's positions (query
    positions for ``pattern``); ``None`` is every position. A run on top of a KV cache of
    ``offset`` tokens sees only the positions after them, while ``source`` always holds
    every position: the run's position ``p`` is the source's ``p + offset``.
    """
    pos = slice(None) if positions is None else positions
    src_pos = slice(offset, None) if positions is None else positions + offset
    kv_only = kv_indexed(atoms)
    kv = head if kv_only else head // group
    hooks: list[Hook] = []

    def vector(name: str, index: int) -> Hook:
        src = source[hook_name(layer, name)]

        def hook(act: Float[Tensor, "batch pos head d"], hook=None):
            act = act.clone()  # never write into a tensor another hook may hold
            act[:, pos, index] = src[:, src_pos, index].to(device=act.device, dtype=act.dtype)
            return act

        return hook_name(layer, name), hook

    for atom in atoms:
        if atom in ("q", "z", "result"):
            hooks.append(vector(atom, head))
        elif atom in ("k", "v"):
            hooks.append(vector(atom, kv))
        elif atom == "pattern":
            src = source[hook_name(layer, "pattern")]

            def pattern(act: Float[Tensor, "batch head query key"], hook=None, src=src):
                act = act.clone()
                act[:, head, pos] = src[:, head, src_pos].to(device=act.device, dtype=act.dtype)
                return act

            hooks.append((hook_name(layer, "pattern"), pattern))
    if "ov" in atoms:
        seen: dict[str, Tensor] = {}
        values = source[hook_name(layer, "v")]

        def grab(act: Float[Tensor, "batch head query key"], hook=None):
            seen["pattern"] = act[:, head, pos]  # after any pattern patch above; every key

        def write(z: Float[Tensor, "batch pos head d_head"], hook=None):
            z = z.clone()
            v = values[:, :, kv].to(device=z.device)
            a = seen.pop("pattern").to(v.dtype)
            mixed = einops.einsum(a, v, "batch query key, batch key d_head -> batch query d_head")
            z[:, pos, head] = mixed.to(z.dtype)
            return z

        hooks += [(hook_name(layer, "pattern"), grab), (hook_name(layer, "z"), write)]
    return hooks


@torch.no_grad()
def run_cells(model, forward: Callable[[list[Hook]], Tensor], cells: Sequence[Head],
              atoms: Sequence[str], source: Any, positions: Tensor | None,
              metric: Callable[[Tensor], Tensor], on_cell: Callable[[], None] | None = None,
              offset: int = 0) -> Float[Tensor, "cell batch"]:
    """The metric of one patched run per cell; ``forward(hooks)`` runs the target with them
    (on top of a KV cache of ``offset`` tokens, see :func:`cell_hooks`)."""
    _, n_heads, n_kv = model_grid(model)
    group = max(1, n_heads // n_kv)
    out = []
    for layer, head in cells:
        hooks = cell_hooks(layer, head, atoms, source, positions, group, offset)
        out.append(_values(metric(forward(hooks))))
        if on_cell is not None:
            on_cell()
    return torch.stack(out) if out else torch.zeros(0, 0)


def _values(value: Any) -> Tensor:
    t = torch.as_tensor(value).detach().float().cpu()
    if t.ndim > 1:
        raise ConfigError(f"the metric must return a scalar or a [batch] tensor, got shape "
                          f"{tuple(t.shape)}")
    return t.reshape(-1)


def _positions(positions: str | Sequence[int] | PatchPair, n: int) -> tuple[int, ...] | None:
    if isinstance(positions, PatchPair):
        if positions.n_tokens != n:
            raise ConfigError(f"the pair has {positions.n_tokens} tokens, the corrupted tokens {n}: "
                              "not the pair these tokens came from?")
        return tuple(range(positions.answer_pos, positions.n_tokens))
    if isinstance(positions, str):
        if positions != "all":
            raise ConfigError(f"positions must be 'all', a list of positions or a PatchPair, "
                              f"got {positions!r}")
        return None
    pos = tuple(int(p) for p in positions)
    bad = [p for p in pos if not 0 <= p < n]
    if not pos or bad or len(set(pos)) != len(pos):
        raise ConfigError(f"positions must be distinct token positions in [0, {n}), got {list(pos)}")
    return pos


def check_cache(cache: Any, names: Sequence[str], batch: int, n: int,
                atoms: Sequence[str]) -> None:
    """Refuse a cache that lacks a hook, or whose shapes are not those of the tokens."""
    keys = set(cache.keys())
    missing = [name for name in names if name not in keys]
    if missing:
        tip = (" (hook_result is cached only after model.set_use_attn_result(True))"
               if any(m.endswith("hook_result") for m in missing) else "")
        raise ConfigError(f"the clean cache lacks {', '.join(missing[:3])}"
                          f"{' ...' if len(missing) > 3 else ''}; make it with "
                          f"model.run_with_cache(clean_tokens) keeping these hooks{tip}")
    if getattr(cache, "has_batch_dim", True) is False:
        raise ConfigError("the clean cache has no batch dimension (remove_batch_dim was "
                          "called); make it again with model.run_with_cache")
    for name in names:
        t = cache[name]
        is_pattern = name.endswith("hook_pattern")
        want = "[batch, head, query, key]" if is_pattern else "[batch, pos, head, d]"
        seq = ((t.shape[2], t.shape[3]) if (is_pattern and t.ndim == 4) else
            (t.shape[1],) * 2 if t.ndim == 4 else None)
        if t.ndim != 4 or t.shape[0] != batch or seq != (n, n):
            raise ConfigError(f"clean cache {name} has shape {tuple(t.shape)}, expected {want} with "
                              f"batch {batch} and {n} positions (the corrupted tokens' shape)")


def patch_activation(model, corrupted_tokens: Tensor | Sequence[Sequence[int]],
                     clean_cache: Any, metric: Callable[[Tensor], Tensor], *,
                     activation: str = "z", layers: Sequence[int] | None = None,
                     heads: Sequence[Head] | None = None,
                     positions: str | Sequence[int] | PatchPair = "all",
                     clean_logits: Tensor | None = None, min_gap: float = 1e-3,
                     progress: bool = False):
    """Patch one head's activation at a time from ``clean_cache`` into the corrupted run.

    Args:
        model: a TransformerBridge.
        corrupted_tokens: ``[batch, pos]`` token ids (same shape as the clean run's).
        clean_cache: from ``model.run_with_cache(clean_tokens)`` (an ``ActivationCache`` or
            any mapping from hook names to tensors), holding the hooks patched.
        metric: logits ``[batch, pos, vocab]`` -> a ``[batch]`` tensor (per example) or a
            scalar, as for TransformerLens' patching functions.
        activation: what to patch (``"z"``, ``"q"``, ``"k"``, ``"v"``, ``"pattern"``,
            ``"result"``, ``"ov"``, or names joined by ``+``; see :mod:`rhlens.patching.config`).
        layers, heads: the layers (all their heads) or the ``(layer, head)`` cells to patch;
            default every head. For ``k``/``v`` alone, heads are KV heads.
        positions: ``"all"``, a list of positions, or a :class:`PatchPair` (its answer
            positions).
        clean_logits: the clean run's logits, for the normalised :attr:`effects`; without
            them effects are NaN (``patched`` and ``corrupted`` are still filled).
        min_gap: examples whose clean and corrupted metrics differ by less get NaN effects.
        progress: a tqdm bar over cells.

    Returns:
        :class:`~rhlens.patching.HeadPatchingResult`: ``patched[example, layer, head]`` (NaN
        where not patched), ``corrupted`` (the unpatched run), ``clean``, ``effects``.
    """
    vocab = getattr(getattr(model, "cfg", None), "d_vocab", None)
    tokens = check_token_rows(corrupted_tokens, vocab if isinstance(vocab, int) and vocab > 0 else None,
                              "corrupted_tokens")  # whole numbers in the vocabulary, before any forward
    batch, n = tokens.shape
    pos = _positions(positions, n)
    config = PatchConfig(metric="custom", direction="denoise", activation=activation,
                         layers=layers, heads=heads, positions="all" if pos is None else pos,
                         min_gap=min_gap)
    cells = plan_cells(model, config)
    atoms = config.atoms
    check_cache(clean_cache, source_names(atoms, [la for la, _ in cells]), batch, n, atoms)
    if clean_logits is not None and tuple(clean_logits.shape[:2]) != (batch, n):
        raise ConfigError(f"clean_logits have shape {tuple(clean_logits.shape)}, expected "
                          f"[{batch}, {n}, vocab]")

    device = next(model.parameters()).device
    tokens = tokens.to(device)
    index = None if pos is None else torch.tensor(pos, device=device)

    def forward(hooks: list[Hook]) -> Tensor:
        ctx = model.hooks(fwd_hooks=hooks) if hooks else contextlib.nullcontext()
        with attn_results(model, "result" in atoms), ctx:
            return model(tokens)

    with torch.no_grad():
        corrupted = _values(metric(forward([])))
        clean = (_values(metric(clean_logits)) if clean_logits is not None
            else torch.full_like(corrupted, math.nan))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(cells), desc=f"patch {config.activation}", unit="head")
    try:
        values = run_cells(model, forward, cells, atoms, clean_cache, index, metric,
                           on_cell=bar.update if bar else None)
    finally:
        if bar:
            bar.close()
    n_layers, n_heads, n_kv = model_grid(model)
    width = n_kv if kv_indexed(atoms) else n_heads
    patched = torch.full((len(corrupted), n_layers, width), math.nan)
    for (layer, head), v in zip(cells, values):
        if v.shape != corrupted.shape:
            raise ConfigError("the metric returned differently shaped values on different runs")
        patched[:, layer, head] = v
    effects = normalise(patched, clean, corrupted, "denoise", min_gap)
    return HeadPatchingResult(
        effects=effects, patched=patched, clean=clean, corrupted=corrupted,
        model_name=_model_name(model), config=config,
        pairs=[{"example": i} for i in range(len(corrupted))], seconds=[])
