"""Patching every head over clean/corrupted pairs: the analysis, its resumable log, and patching a head set.

:func:`patch_heads` runs each pair in turn and, given ``out=``, appends the pair's numbers to
``out/patching.jsonl`` as soon as they are known (``out/patching.run.json`` holds what shapes
them: the model, the :class:`PatchConfig` and the pairs' contents). A rerun with the same
``out`` computes only the pairs missing from the log; a rerun with another model, setting or
pair set is refused. The result is always assembled from the records, so a resumed run and an
uninterrupted one give the same numbers.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from rhlens.distributed import Sweep
from rhlens.engine import hf_model, native_attention
from rhlens.errors import ConfigError
from rhlens.patching.activations import (
    attn_results,
    needs_patterns,
    run_cells,
    source_names,
)
from rhlens.patching.config import (
    PatchConfig,
    _model_name,
    check_pairs,
    kv_indexed,
    model_grid,
    normalise,
    pair_metric,
    plan_cells,
    run_length,
)
from rhlens.patching.pairs import PatchPair
from rhlens.patching.results import HeadPatchingResult
from rhlens.patching.runner import PairRunner
from rhlens.validate import check_heads, check_resumed, patching_record_problem

__all__ = ["LOG_NAME", "patch_head_set", "patch_heads"]

Head = tuple[int, int]
LOG_NAME = "patching.jsonl"


def _fast_pair(model, pair: PatchPair, config: PatchConfig, cells: Sequence[Head],
               n_heads: int) -> tuple[float, float, list[float]]:
    """``z`` at all or the answer positions: the batched runner (exact) or attribution."""
    runner = PairRunner(model, pair, config)
    layers = sorted({layer for layer, _ in cells})
    source_metric, src = runner.capture(layers)
    if config.mode == "exact":
        target_metric = float(runner.run([{}], src)[0])
        batch = config.batch_size or n_heads
        values: list[float] = []
        for s in range(0, len(cells), batch):
            chunk = cells[s:s + batch]
            values += runner.run([{layer: [head]} for layer, head in chunk], src).tolist()
    else:
        target_metric, attr = runner.attribution(layers, src, n_heads)
        row = {layer: i for i, layer in enumerate(layers)}
        values = [target_metric + float(attr[row[layer], head]) for layer, head in cells]
    return source_metric, target_metric, values


def _generic_pair(model, pair: PatchPair, config: PatchConfig,
                  cells: Sequence[Head]) -> tuple[float, float, list[float]]:
    """Any activation: capture the source's hooks, then one patched target run per cell.

    Source and target share their tokens up to the first one that differs, so every
    activation before it is the same in both runs and a patch there changes nothing: that
    prefix is run once into a KV cache, and each run (source, target, patched copies)
    computes only the tokens after it. The source's activations are joined back to full
    length, as a cache from ``run_with_cache`` would hold them.
    """
    hf = hf_model(model)
    device = next(hf.parameters()).device
    end = run_length(pair, config.metric)
    n_keep = end - pair.answer_pos
    denoise = config.direction == "denoise"
    target = (pair.corrupted_ids if denoise else pair.clean_ids)[:end]
    source = (pair.clean_ids if denoise else pair.corrupted_ids)[:end]
    start = next((i for i, (a, b) in enumerate(zip(target, source)) if a != b), pair.answer_pos)
    start = min(start, pair.answer_pos)  # the runs must reach every position read
    atoms = config.atoms
    native = not needs_patterns(atoms)  # q, k, v, z: SDPA, no O(n²) pattern
    if config.positions == "all":
        index = None
    else:
        pos = range(pair.answer_pos, end) if config.positions == "answer" else config.positions
        index = torch.tensor([p - start for p in pos if p >= start], dtype=torch.long, device=device)

    def ids(tokens: Sequence[int]) -> Tensor:
        return torch.tensor([list(tokens)], dtype=torch.long, device=device)

    def forward(hooks: list, x: Tensor, cache, keep: int = n_keep) -> Tensor:
        ctx = model.hooks(fwd_hooks=hooks) if hooks else contextlib.nullcontext()
        attn = native_attention(model) if native else contextlib.nullcontext()
        with attn_results(model, "result" in atoms), ctx, attn:
            return hf(input_ids=x, past_key_values=cache, use_cache=True, logits_to_keep=keep).logits

    def capture(store: dict[str, Tensor]) -> list:
        def grab(name: str):
            def hook(act: Tensor, hook=None):
                store[name] = act.detach().clone()

            return name, hook

        return [grab(n) for n in source_names(atoms, [layer for layer, _ in cells])]

    def metric(logits: Tensor) -> Tensor:
        return pair_metric(logits, pair, config.metric)

    from transformers import DynamicCache

    with torch.no_grad():
        prefix = DynamicCache(config=hf.config)
        before: dict[str, Tensor] = {}
        if start > 0:
            forward(capture(before), ids(target[:start]), prefix, keep=1)
        after: dict[str, Tensor] = {}
        source_metric = float(metric(forward(capture(after), ids(source[start:]),
                                             copy.deepcopy(prefix)))[0])
        full = {name: _join(before.get(name), act, name) for name, act in after.items()}
        segment = ids(target[start:])
        target_metric = float(metric(forward([], segment, copy.deepcopy(prefix)))[0])
    values = run_cells(model, lambda hooks: forward(hooks, segment, copy.deepcopy(prefix)), cells,
                       atoms, full, index, metric, offset=start)
    return source_metric, target_metric, values[:, 0].tolist()


def _join(before: Tensor | None, after: Tensor, name: str) -> Tensor:
    """A prefix run's activation and the following segment's, as one full-length tensor."""
    if before is None:
        return after
    if name.endswith("hook_pattern"):  # [batch, head, query, key]: the prefix saw fewer keys
        before = torch.nn.functional.pad(before, (0, after.shape[-1] - before.shape[-1]))
        return torch.cat([before, after], dim=2)
    return torch.cat([before, after], dim=1)


def _header(model, config: PatchConfig, keys: Sequence[str]) -> dict[str, Any]:
    """Everything that shapes a run's numbers (batch_size changes the cost only)."""
    settings = {k: v for k, v in config.to_dict().items() if k != "batch_size"}
    return {"model": _model_name(model), "grid": list(model_grid(model)), "config": settings,
            "pairs": list(keys)}


def _json_cell(x: float) -> float | None:
    return x if math.isfinite(x) else None


def patch_heads(model, pairs: Sequence[PatchPair], *, config: PatchConfig | None = None,
                out: str | Path | None = None, progress: bool = True) -> HeadPatchingResult:
    """The causal effect of every head of ``config.layers`` (or ``config.heads``) on each pair.

    Args:
        model: a TransformerBridge (``rhlens.load_model``).
        pairs: from :func:`make_pairs` or :func:`make_pair`.
        config: :class:`PatchConfig` (``activation`` picks what is patched: ``z`` at all or
            the answer positions takes the fast path, anything else one run per head).
        out: a directory; each finished pair is appended to ``out/patching.jsonl`` at once, a
            rerun with the same ``out`` computes only the missing pairs, and a rerun with
            another model, setting or pair set is refused.
        progress: show a tqdm bar over pairs.

    Inside a ``torchrun`` launch the pairs are split across the ranks
    (:class:`rhlens.distributed.Sweep`); every rank returns the result of all of them.

    Returns:
        :class:`HeadPatchingResult` with ``effects[pair, layer, head]`` (1 = this head alone
        carries the clean-vs-corrupted difference, 0 = it carries nothing).
    """
    config = config or PatchConfig()
    pairs = list(pairs)
    check_pairs(model, pairs, config)
    cells = plan_cells(model, config)
    n_layers, n_heads, n_kv = model_grid(model)
    width = n_kv if kv_indexed(config.atoms) else n_heads
    fast = config.atoms == ("z",) and isinstance(config.positions, str)
    keys = [f"{i}-{pair.digest}" for i, pair in enumerate(pairs)]
    meta = [{**pair.labels, "n_tokens": pair.n_tokens, "answer_pos": pair.answer_pos,
             "clean_token": pair.clean_token, "corrupted_token": pair.corrupted_token}
            for pair in pairs]
    if out is not None:
        try:
            json.dumps(meta)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"pair labels must be JSON values to be logged in {out}: {exc}") from exc
    header = None if out is None else _header(model, config, keys)
    sweep = Sweep(out, header, LOG_NAME, total=len(pairs), unit="pair", progress=progress,
                  desc=f"patch {config.activation} ({config.mode})",
                  device=next(model.parameters()).device)
    check_resumed(sweep.done, lambda rec: patching_record_problem(rec, (n_layers, width)),
                  f"{out}/{LOG_NAME}", "patching record")  # before any pair runs
    todo = [i for i, key in enumerate(keys) if key not in sweep.done]
    # Pairs share nothing: each is a unit, its cost its tokens.
    for unit in sweep.run([keys[i] for i in todo], [pairs[i].n_tokens for i in todo],
                          [False] * len(todo)):
        i = todo[unit[0]]
        t0 = time.perf_counter()
        pair = pairs[i]
        if fast:
            source_metric, target_metric, values = _fast_pair(model, pair, config, cells, n_heads)
        else:
            source_metric, target_metric, values = _generic_pair(model, pair, config, cells)
        grid = [[None] * width for _ in range(n_layers)]
        for (layer, head), v in zip(cells, values):
            grid[layer][head] = _json_cell(float(v))
        clean, corrupted = ((source_metric, target_metric) if config.direction == "denoise"
                            else (target_metric, source_metric))
        sweep.add({"key": keys[i], "index": i, "clean": clean, "corrupted": corrupted,
                   "patched": grid, "seconds": round(time.perf_counter() - t0, 4),
                   "pair": meta[i]})
    done = sweep.finish()
    return _assemble(model, config, [done[key] for key in keys])


def _assemble(model, config: PatchConfig, records: Sequence[dict[str, Any]]) -> HeadPatchingResult:
    def num(x: float | None) -> float:
        return math.nan if x is None else float(x)

    patched = torch.tensor([[[num(x) for x in row] for row in r["patched"]] for r in records])
    clean = torch.tensor([num(r["clean"]) for r in records])
    corrupted = torch.tensor([num(r["corrupted"]) for r in records])
    effects = normalise(patched, clean, corrupted, config.direction, config.min_gap)
    return HeadPatchingResult(effects=effects, patched=patched, clean=clean, corrupted=corrupted,
                              model_name=_model_name(model), config=config,
                              pairs=[r["pair"] for r in records],
                              seconds=[float(r["seconds"]) for r in records])


def patch_head_set(model, pairs: Sequence[PatchPair], heads: Sequence[Head], *,
                   config: PatchConfig | None = None) -> Float[Tensor, " pair"]:
    """Patch the ``z`` of all of ``heads`` at once; the normalised metric of each pair's run.

    The value is ``(m - m_corrupted) / (m_clean - m_corrupted)``: 1 is clean behaviour, 0
    corrupted. Denoising every head of every layer at ``positions="answer"`` or ``"all"``
    gives 1 (the answer position then sees only clean attention outputs); no heads gives 0.
    ``config.mode``, ``activation``, ``layers`` and ``heads`` are ignored (an exact ``z`` run
    of the heads given).
    """
    config = config or PatchConfig()
    if not isinstance(config.positions, str):
        raise ConfigError("patch_head_set patches at positions 'all' or 'answer'")
    pairs = list(pairs)
    check_pairs(model, pairs, config)
    by_layer: dict[int, list[int]] = {}
    n_layers, n_heads, _ = model_grid(model)
    for layer, head in check_heads(heads):  # exact (layer, head) pairs, never int()-coerced
        if not (layer < n_layers and head < n_heads):
            raise ConfigError(f"head ({layer}, {head}) is outside this model's "
                              f"{n_layers} layers x {n_heads} heads")
        by_layer.setdefault(layer, []).append(head)
    out = torch.zeros(len(pairs))
    for p, pair in enumerate(pairs):
        runner = PairRunner(model, pair, config)
        source_metric, src = runner.capture(sorted(by_layer))
        both = runner.run([{}, by_layer], src) if by_layer else runner.run([{}], src).repeat(2)
        target_metric, value = float(both[0]), float(both[1])
        if config.direction == "denoise":
            c, r = source_metric, target_metric
        else:
            c, r = target_metric, source_metric
        out[p] = (value - r) / (c - r) if abs(c - r) >= config.min_gap else math.nan
    return out
