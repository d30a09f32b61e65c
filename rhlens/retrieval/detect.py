"""Retrieval-head detection: which heads copy the needle while the model answers.

At each greedy decode step, for every (layer, query head), the key position of the head's
top-1 attention is recorded (a ``[head, keys]`` argmax per layer, no Python loop over
heads, no host sync). After the answer, a head *copies* at a step when that position lies
in the needle's answer span and the prompt token there equals the token generated at that
step (Wu et al., 2024, Sec. 2). Per probe:

* ``unique`` (default): distinct needle positions copied / needle length, at most 1
  (the paper's |g_h ∩ k| / |k|);
* ``paper``: what the authors' code computes, +1/needle-length at every copying step, so
  a head that copies one position twice counts twice (can exceed 1).

A probe enters the mean only if the answer's ROUGE-1 recall against the expected answer
exceeds ``success_threshold`` (0.5, as in the paper).
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from rhlens.distributed import Sweep, decode_step_tokens, engine_plan, prefix_order, shard_of
from rhlens.engine import (
    EngineHook,
    GenerationConfig,
    StepState,
    TopKeySpec,
    current_phase,
    current_step,
    generate_many,
    hf_model,
    model_tokenizer,
    prefill,
)
from rhlens.errors import ConfigError, ProbeError
from rhlens.probes import Probe
from rhlens.retrieval.config import DetectConfig
from rhlens.retrieval.scores import RetrievalScores
from rhlens.stats import rouge1_recall  # the paper's metric; kept importable from here
from rhlens.store.identity import run_header
from rhlens.validate import check_span, check_token_rows, detect_record_problem

__all__ = [
    "DetectConfig",
    "TopKeyRecorder",
    "bridge_shape",
    "cache_answer_patterns",
    "copy_scores",
    "detect_retrieval_heads",
    "pattern_layers",
    "probe_retrieval_scores",
    "retrieval_scores_from_cache",
    "rouge1_recall",
    "top_keys_from_cache",
]


# ---------------------------------------------------------------------------------------
# Watching the decode steps
# ---------------------------------------------------------------------------------------
class TopKeyRecorder:
    """Records each head's top-1 key position (absolute) at every decode step.

    ``hooks()`` gives one ``(name, fn)`` pair per layer on ``hook_pattern`` (read-only
    :class:`~rhlens.engine.EngineHook` s, inert while the engine prefills a prompt).
    ``positions[:n_steps]`` is ``[step, layer, head]`` (batch row 0); ``row(r)[:n_steps]`` the
    same for row ``r`` when ``max_batch`` prompts are decoded together. The hook is a batched
    argmax and an indexed write on the device: no host sync.

    Inside the engine (``generate``, ``generate_many``, ``detect_retrieval_heads``) a step is
    an engine decode step. Outside it (``model.hooks(...)``, ``model.run_with_hooks``, the
    bridge's own ``generate``, a hand-written loop) every forward pass is one step, and the
    row recorded is its last query, the one that predicts the next token; ``n_steps`` counts
    them. The engine's first decode step feeds the prompt's last token after prefilling the
    rest, so its step ``s`` is the ``s``-th forward of a cached generation loop (the first
    reading the whole prompt), or of a loop that re-reads the whole sequence every step.
    Outside the engine a key index is taken as the absolute position (no sliding window).
    """

    def __init__(self, n_layers: int, n_heads: int, max_steps: int, state: StepState | None = None,
                 device: torch.device | str = "cpu", max_batch: int = 1) -> None:
        self.n_layers, self.n_heads, self.max_steps, self.state = n_layers, n_heads, max_steps, state
        # [step, layer, row, head]: each hook call writes one contiguous [row, head] block.
        self._buf = torch.full((max_steps, n_layers, max_batch, n_heads), -1, dtype=torch.long,
                               device=device)
        self.positions = self._buf[:, :, 0]
        self._forwards = [0] * n_layers  # outside the engine: forwards seen, per layer

    @property
    def n_steps(self) -> int:
        """Steps recorded outside the engine since the last :meth:`reset`."""
        return max(self._forwards)

    def row(self, r: int) -> Tensor:
        """``[step, layer, head]`` of batch row ``r``."""
        return self._buf[:, :, r]

    def reset(self) -> None:
        self._buf.fill_(-1)
        self._forwards = [0] * self.n_layers

    def hooks(self) -> list[tuple[str, Any]]:
        # The spec lets the captured decode step write the same argmax into the same buffer
        # without calling the hook (rhlens.engine.captured).
        return [(f"blocks.{layer}.attn.hook_pattern",
                 EngineHook(self._make_hook(layer), phase="decode", reads_only=True,
                            spec=TopKeySpec(self._buf, layer)))
                for layer in range(self.n_layers)]

    def _make_hook(self, layer: int):
        def hook(pattern: Tensor, hook=None) -> None:
            # pattern: [batch, head, query, key]; the step's query is the last one.
            B, H, Q, K = pattern.shape
            state = current_step() or (self.state if current_phase() == "decode" else None)
            if state is not None:  # an engine decode step
                step, offset = state.step, state.absolute(K)
            else:  # a forward outside the engine: the next step of this layer
                step, offset = self._forwards[layer], 0
                if step >= self.max_steps:
                    raise ConfigError(f"the recorder holds {self.max_steps} steps; reset() it between "
                                      "runs or make it with a larger max_steps")
                self._forwards[layer] = step + 1
            if self._buf.shape[2] < B:
                raise ConfigError(f"the recorder holds {self._buf.shape[2]} batch rows, the model "
                                  f"runs {B}; make it with max_batch={B}")
            slot = self._buf[step, layer, :B]  # [batch, head]
            if pattern.device != slot.device:  # a layer on another device of a split model
                slot.copy_(pattern[:, :, -1].argmax(-1) + offset)
            elif offset:
                torch.add(pattern[:, :, -1].argmax(-1), offset, out=slot)
            else:
                torch.argmax(pattern[:, :, -1], dim=-1, out=slot)
            return None

        return hook


def copy_mask(positions: Int[Tensor, "step layer head"], generated: Int[Tensor, " step"],
              prompt: Int[Tensor, " seq"], span: tuple[int, int]) -> torch.Tensor:
    """``[step, layer, head]``: did the head copy the generated token from the needle?"""
    start, end = span
    in_span = (positions >= start) & (positions < end)
    token_there = prompt[positions.clamp(0, prompt.shape[0] - 1)]
    return in_span & (token_there == generated[:, None, None])


def copy_scores(positions: Int[Tensor, "step layer head"], generated: Int[Tensor, " step"],
                prompt: Int[Tensor, " seq"], span: tuple[int, int],
                mode: Literal["unique", "paper"] = "unique") -> Float[Tensor, "layer head"]:
    """Per-head retrieval score of one answered probe."""
    start, end = span
    n = end - start
    S, L, H = positions.shape
    copied = copy_mask(positions, generated, prompt, span)  # [S, L, H]
    if mode == "paper":
        return copied.sum(0).float() / n
    if mode != "unique":
        raise ConfigError(f"mode must be 'unique' or 'paper', got {mode!r}")
    # Count distinct needle positions: scatter each copying step onto its needle slot.
    slots = torch.zeros(L, H, n, device=positions.device)
    index = (positions - start).clamp(0, n - 1).permute(1, 2, 0)  # [L, H, S]
    slots.scatter_add_(-1, index, copied.permute(1, 2, 0).float())
    return (slots > 0).sum(-1).float() / n


# ---------------------------------------------------------------------------------------
# Scores from a user's own forward pass (an ActivationCache)
# ---------------------------------------------------------------------------------------
# Causal attention makes a teacher-forced forward over prompt + answer see, at the answer's
# query rows, exactly the attention that greedy generation saw: the engine feeds the
# prompt's last token at decode step 0, so the row that predicts answer token s is position
# ``answer_start - 1 + s``, and the token it may copy is answer token s.
_PATTERN = re.compile(r"^blocks\.(\d+)\.attn\.hook_pattern$")


def _token_rows(tokens: Sequence[int] | Tensor, vocab: int | None = None) -> Int[Tensor, "batch seq"]:
    """``[batch, seq]`` int64 ids: whole numbers (in ``[0, vocab)`` when given), one line if not."""
    return check_token_rows(tokens, vocab, "tokens", form="[seq] or [batch, seq] integer")


def _check_answer(n_tokens: int, answer_start: int) -> int:
    """The number of answer tokens; refuses an ``answer_start`` outside the sequence."""
    if (isinstance(answer_start, bool) or not isinstance(answer_start, int)
            or not 1 <= answer_start < n_tokens):
        raise ConfigError(f"answer_start must lie in [1, {n_tokens - 1}] (the first answer token's "
                          f"position in the {n_tokens} tokens), got {answer_start!r}")
    return n_tokens - answer_start


def pattern_layers(cache) -> list[str]:
    """The ``hook_pattern`` names of ``cache``, by layer; every layer 0..L-1 must be there."""
    found = {int(m.group(1)): name for name in cache if (m := _PATTERN.match(name))}
    if not found:
        raise ConfigError("the cache holds no blocks.{l}.attn.hook_pattern: run the model with "
                          "run_with_cache (keep the hook_pattern names) or cache_answer_patterns")
    missing = sorted(set(range(max(found) + 1)) - set(found))
    if missing:
        raise ConfigError(f"the cache lacks hook_pattern for layers {missing}: scores need every layer")
    return [found[layer] for layer in range(len(found))]


def top_keys_from_cache(cache, n_tokens: int, *,
                        answer_start: int) -> Int[Tensor, "batch step layer head"]:
    """Each head's top-1 key position (absolute) at every answer step, from cached patterns.

    What :class:`TopKeyRecorder` records while the engine decodes, read from ``cache``
    instead: ``cache[f"blocks.{l}.attn.hook_pattern"]`` is ``[batch, head, query, key]`` (or
    ``[head, query, key]``) either over the whole sequence of ``n_tokens`` (a plain
    ``run_with_cache`` over prompt + answer) or over the answer's query rows only (as
    :func:`cache_answer_patterns` keeps it, keys ending at the last of those rows).
    """
    steps = _check_answer(n_tokens, answer_start)
    first = answer_start - 1  # the query row of step 0
    out = []
    for name in pattern_layers(cache):
        pattern = cache[name]
        if pattern.ndim == 3:
            pattern = pattern[None]
        if pattern.ndim != 4:
            raise ConfigError(f"{name} has shape {tuple(pattern.shape)}; expected [batch, head, query, key]")
        n_query, n_key = pattern.shape[-2:]
        if n_query == steps and n_query not in (n_tokens - 1, n_tokens):
            # the answer's rows only; the last one is the last query
            rows, last = pattern, first + steps - 1
        elif n_query in (n_tokens - 1, n_tokens):  # the whole sequence (its last token or not)
            if n_key != n_query:
                raise ConfigError(f"{name} has {n_query} query rows and {n_key} keys: a cache of "
                                  "the whole sequence has as many keys as queries")
            rows, last = pattern[:, :, first:first + steps], n_query - 1
        elif n_query > n_tokens:
            raise ConfigError(f"{name} covers {n_query} positions but tokens has {n_tokens}: pass "
                              "the same tokens the cache was made from (prompt + answer)")
        else:
            raise ConfigError(f"{name} has {n_query} query rows: neither the {steps} answer rows "
                              f"nor the {n_tokens}-token sequence")
        # Keys end at the last query row (a sliding-window cache may have dropped early ones).
        out.append(rows.argmax(-1) + (last + 1 - n_key))  # [batch, head, step]
    return torch.stack(out, 1).permute(0, 3, 1, 2)  # [batch, step, layer, head]


def retrieval_scores_from_cache(cache, tokens: Sequence[int] | Tensor, *,
                                needle_span: Sequence[int] | Sequence[Sequence[int]] | Tensor,
                                answer_start: int, mode: Literal["unique", "paper"] = "unique",
                                ) -> Float[Tensor, "... layer head"]:
    """Per-head retrieval scores of one answered prompt, from a TransformerLens cache.

    Args:
        cache: an ``ActivationCache`` (or any mapping) holding every layer's
            ``blocks.{l}.attn.hook_pattern``, from ``model.run_with_cache(tokens)`` or from
            :func:`cache_answer_patterns` (which keeps only the answer's query rows).
        tokens: prompt + answer ids, ``[seq]`` or ``[batch, seq]``. The answer is every
            token the model generated, the stopping token included (``Generation.response_ids``),
            as :func:`detect_retrieval_heads` scores it.
        needle_span: ``(start, end)`` of the needle's answer tokens in the prompt (one span,
            or one per batch row).
        answer_start: the position of the first answer token (the prompt's length).
        mode: ``"unique"`` or ``"paper"``, as in :func:`copy_scores` (the same copy rule).

    Returns:
        ``[layer, head]`` for 1-D ``tokens``, ``[batch, layer, head]`` for 2-D; equal to the
        engine's per-probe scores for the same prompt and answer.
    """
    rows = _token_rows(tokens)
    batch, n_tokens = rows.shape
    steps = _check_answer(n_tokens, answer_start)
    if not isinstance(needle_span, Tensor):  # exact types: (True, 3) or (1.5, 3) is no span
        if isinstance(needle_span, Sequence) and needle_span and \
                all(isinstance(x, Sequence) or (isinstance(x, Tensor) and x.ndim) for x in needle_span):
            needle_span = [check_span(x) for x in needle_span]
        else:
            needle_span = check_span(needle_span)
    try:
        spans = torch.as_tensor(needle_span)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"needle_span must be (start, end) or one per row, got {needle_span!r}") from exc
    if spans.dtype.is_floating_point or spans.dtype == torch.bool or spans.is_complex():
        raise ConfigError(f"needle_span must hold whole numbers, got {needle_span!r}")
    spans = spans.long()
    spans = spans.expand(batch, 2) if spans.shape == (2,) else spans
    if spans.ndim != 2 or spans.shape[1] != 2 or spans.shape[0] != batch:
        raise ConfigError(f"needle_span must be (start, end) or one per row of the {batch} token "
                          f"rows, got shape {tuple(spans.shape)}")
    for start, end in spans.tolist():
        if not 0 <= start < end <= answer_start:
            raise ConfigError(f"needle span ({start}, {end}) does not lie inside the "
                              f"{answer_start}-token prompt")
    if mode not in ("unique", "paper"):
        raise ConfigError(f"mode must be 'unique' or 'paper', got {mode!r}")
    positions = top_keys_from_cache(cache, n_tokens, answer_start=answer_start)
    if positions.shape[0] != batch:
        raise ConfigError(f"the cache has {positions.shape[0]} batch rows, tokens {batch}")
    rows = rows.to(positions.device)
    scores = torch.stack([
        copy_scores(positions[b], rows[b, answer_start:answer_start + steps],
                    rows[b, :answer_start], (int(spans[b, 0]), int(spans[b, 1])), mode)
        for b in range(batch)])
    return scores[0] if torch.as_tensor(tokens).ndim == 1 else scores


@torch.no_grad()
def cache_answer_patterns(model, tokens: Sequence[int] | Tensor, *, answer_start: int,
                          prefill_prompt: bool = True, prefill_chunk: int | None = None):
    """An ``ActivationCache`` of every layer's attention at the answer's query rows only.

    ``cache[f"blocks.{l}.attn.hook_pattern"]`` is ``[batch, head, answer, key]``: row s is
    the query that predicted answer token s (position ``answer_start - 1 + s``), over keys
    ``0 .. answer_start - 1 + s`` (those after the row are 0), never the n x n prompt pattern.

    With ``prefill_prompt`` (default) the prompt before its last token is first run as the
    engine prefills it (:func:`rhlens.engine.prefill`: the model's own SDPA attention, no
    pattern hook fires, ``prefill_chunk`` tokens at a time, default the engine's), then the
    answer rows run through the bridge against that KV cache in one forward: the only
    attention pattern formed is each layer's ``[batch, head, answer, key]``, so it works on
    long prompts (memory linear in the prompt: ``benchmarks/answer_rows_memory.py``). With
    ``False`` it is one plain bridge forward over the whole sequence whose hooks keep only the
    answer rows, but the bridge's eager attention still forms each layer's full
    ``[batch, head, seq, seq]`` pattern (one layer at a time): memory grows with the square
    of the prompt.
    """
    from transformer_lens import ActivationCache

    vocab = getattr(model.cfg, "d_vocab", None)  # ids in the vocabulary, before any forward
    rows = _token_rows(tokens, vocab if isinstance(vocab, int) and vocab > 0 else None)
    batch, n_tokens = rows.shape
    steps = _check_answer(n_tokens, answer_start)
    chunk = GenerationConfig(prefill_chunk=prefill_chunk).chunk  # validates it
    first = answer_start - 1
    kept: dict[str, list[Tensor]] = {}

    def keep(pattern: Tensor, hook) -> None:
        if pattern.shape[-2] == steps:
            kept.setdefault(hook.name, []).append(pattern.detach())
        else:  # a whole-sequence forward: copy the answer rows out, the rest is freed
            answer_rows = pattern[..., first:first + steps, :first + steps]
            kept.setdefault(hook.name, []).append(answer_rows.detach().clone())

    hooks = [(f"blocks.{layer}.attn.hook_pattern", keep) for layer in range(int(model.cfg.n_layers))]
    rows = rows.to(next(model.parameters()).device)
    if prefill_prompt:
        from transformers import DynamicCache

        hf = hf_model(model)
        for b in range(batch):
            kv = DynamicCache(config=hf.config)
            prefill(model, rows[b, :first].tolist(), kv, chunk=chunk)
            with model.hooks(fwd_hooks=hooks):
                hf(input_ids=rows[b:b + 1, first:first + steps], past_key_values=kv,
                   use_cache=True, logits_to_keep=1)
    else:
        with model.hooks(fwd_hooks=hooks):
            model(rows[:, :first + steps], return_type=None)
    return ActivationCache({name: torch.cat(parts) for name, parts in kept.items()}, model)


def probe_retrieval_scores(model, probe: Probe, answer_ids: Sequence[int] | Tensor, *,
                           mode: Literal["unique", "paper"] = "unique",
                           prefill_prompt: bool = True) -> Float[Tensor, "layer head"]:
    """The retrieval scores of ``probe`` answered with ``answer_ids``, by teacher forcing.

    ``answer_ids``: the model's answer, every generated token with the stopping one
    (``Generation.response_ids``); the scores then equal :func:`detect_retrieval_heads`'
    scores of the probe. Only the answer's attention rows are kept
    (:func:`cache_answer_patterns`).
    """
    answer = [int(t) for t in torch.as_tensor(answer_ids).reshape(-1).tolist()]
    if not answer:
        raise ConfigError("answer_ids is empty: pass the model's answer (Generation.response_ids)")
    tokens = list(probe.prompt_ids) + answer
    cache = cache_answer_patterns(model, tokens, answer_start=probe.n_tokens,
                                  prefill_prompt=prefill_prompt)
    return retrieval_scores_from_cache(cache, tokens, needle_span=probe.needle_span,
                                       answer_start=probe.n_tokens, mode=mode)


# ---------------------------------------------------------------------------------------
# The analysis
# ---------------------------------------------------------------------------------------
def bridge_shape(model) -> tuple[int, int, int | None, int | None]:
    """``(n_layers, n_heads, n_kv_heads or None, n_ctx or None)`` of a bridged model."""
    cfg = model.cfg
    n_kv = getattr(cfg, "n_key_value_heads", None)
    n_ctx = getattr(cfg, "n_ctx", None)
    return int(cfg.n_layers), int(cfg.n_heads), (int(n_kv) if n_kv else None), n_ctx


def check_probes(probes: Sequence[Probe], max_tokens: int | None, max_new_tokens: int, *,
                 name: str | None = None) -> None:
    """Refuse, before any compute, probes the model cannot take.

    ``name``: how the caller's user sets ``max_new_tokens``, for the messages: the command
    line's flag (``"--max-new-tokens"``); by default the library's field,
    ``max_new_tokens`` of the analysis' config (its :class:`~rhlens.engine.GenerationConfig`).
    """
    said = (f"{name} {max_new_tokens}" if name else
            f"max_new_tokens={max_new_tokens} (of the config's GenerationConfig)")
    fix = name or "max_new_tokens"
    if not probes:
        raise ProbeError("no probes given")
    if max_tokens is not None and max_new_tokens >= max_tokens:
        raise ProbeError(f"{said} does not fit the model's maximum context of {max_tokens} "
                         f"tokens, which must also hold the prompt; use {fix} below {max_tokens} "
                         "(the paper: 50)")
    for p in probes:
        if not isinstance(p, Probe):
            raise ProbeError(f"expected Probe objects, got {type(p).__name__}")
        if max_tokens is not None and p.n_tokens + max_new_tokens > max_tokens:
            raise ProbeError(
                f"probe {p.key} has {p.n_tokens} prompt tokens + {max_new_tokens} new tokens "
                f"({said}), more than the model's maximum context of {max_tokens}; use shorter "
                f"lengths or {fix} of at most {max_tokens - p.n_tokens}"
            )
    keys = [p.key for p in probes]
    if len(set(keys)) != len(keys):
        raise ProbeError("probes must be distinct (same length, depth and needle given twice)")


def detect_retrieval_heads(model, probes: Sequence[Probe], *, config: DetectConfig | None = None,
                           tokenizer=None, out: str | Path | None = None,
                           progress: bool = True) -> RetrievalScores:
    """Score every head of ``model`` on ``probes`` (Wu et al., 2024).

    Args:
        model: a TransformerBridge (``rhlens.load_model``).
        probes: from :func:`rhlens.probes.build_probes`, or hand-made :class:`Probe` objects;
            or one process' share of them (:func:`rhlens.distributed.shard`), which logs into
            its own shard of ``out``.
        config: :class:`DetectConfig`.
        tokenizer: defaults to ``model.tokenizer``.
        out: a directory; each finished probe is appended to ``out/probes.jsonl`` at once,
            and a rerun with the same ``out`` skips the probes found there.
        progress: show a tqdm bar (a notebook's bar in Jupyter); it moves at every decode step.

    Inside a ``torchrun`` launch (or any initialised ``torch.distributed`` group) the probes
    are split across the ranks (:class:`rhlens.distributed.Sweep`) and every rank returns the
    scores of all of them.

    Returns:
        :class:`RetrievalScores`, probes in the order given.
    """
    config = config or DetectConfig()
    tokenizer = model_tokenizer(model, tokenizer)
    part = shard_of(probes)
    probes = list(probes)
    n_layers, n_heads, n_kv, n_ctx = bridge_shape(model)
    check_probes(probes, n_ctx, config.generation.max_new_tokens)
    name = getattr(model, "rhlens_name", None) or str(getattr(model.cfg, "model_name", "model"))
    # How many probes share a batch changes the cost, not the experiment; the kernels that
    # ran (which can round bf16 scores differently) are recorded as resolved.
    header = None if out is None else run_header(
        model, probes, config, kernel_policy=config.generation.kernel_policy(model))
    # Buffers are sized by the probes, never by the flag alone: a batch holds at most the
    # probes of one token count (a batch_size of 10**12 must not allocate 10**12 rows).
    most = max(Counter(len(p.prompt_ids) for p in probes).values())
    if config.generation.batch_size > most:
        config = replace(config, generation=replace(config.generation, batch_size=most))
    device = next(model.parameters()).device
    sweep = Sweep(out, header, "probes.jsonl", total=len(probes), desc="detect", unit="probe",
                  weights={p.key: p.n_tokens for p in probes}, progress=progress, shard=part,
                  device=device)
    state = StepState()
    recorder = TopKeyRecorder(n_layers, n_heads, config.generation.max_new_tokens, state, device,
                              max_batch=config.generation.batch_size)
    # One length's probes of one haystack (every needle, every depth) sorted by their tokens:
    # each shares the longest prefix there is with the previous one, so the engine prefills
    # only what differs; probes of equal token count are decoded together, batch_size at a
    # time. A unit never spans two lengths or haystacks (rhlens.distributed.prefix_order).
    todo = [p for p in probes if p.key not in sweep.done]
    groups = [(p.length, str(p.meta.get("haystack_sha256", p.meta.get("haystack", ""))))
              for p in todo]
    order = prefix_order([p.prompt_ids for p in todo], groups)
    todo, groups = [todo[i] for i in order], [groups[i] for i in order]
    costs, links = engine_plan([p.prompt_ids for p in todo], max_new_tokens=config.generation.max_new_tokens,
                               batch_size=config.generation.batch_size,
                               chunk=config.generation.chunk_for(device), groups=groups,
                               world=sweep.world, step_tokens=decode_step_tokens(device))
    records = sweep.sink.done
    for unit in sweep.run([p.key for p in todo], costs, links):
        batch = [todo[i] for i in unit]
        # The bar moves with every prefill chunk and decode step (StepState.spread).
        state.spread(sum(p.n_tokens for p in batch), config.generation.max_new_tokens, sweep.advance)
        gens = generate_many(model, tokenizer, [p.prompt_ids for p in batch],
                             config=config.generation, hooks=recorder.hooks(), state=state,
                             on_start=lambda i: recorder.reset())
        t_last = time.perf_counter()
        per_probe = 0.0
        try:
            for probe, gen in zip(batch, gens):
                now = time.perf_counter()
                if gen.info.get("batch_row", 0) == 0:  # a batch's time, shared by its probes
                    per_probe = (now - t_last) / gen.info.get("batch_size", 1)
                t_last = now
                sweep.add(_probe_record(probe, gen, recorder, config, device, per_probe),
                          postfix=lambda: {"ok": sum(r["success"] for r in records.values())},
                          generation=gen)
        finally:
            gens.close()  # end the engine's generator now, not whenever it is collected
    found = sweep.finish()
    return scores_from_records([found[p.key] for p in probes], name, n_kv, config)


def _probe_record(probe: Probe, gen, recorder: TopKeyRecorder, config: DetectConfig, device,
                  seconds: float) -> dict[str, Any]:
    """One probe's line of ``probes.jsonl``: its answer, success and per-head scores."""
    steps = gen.n_steps
    generated = torch.tensor(gen.response_ids, device=device)
    prompt = torch.tensor(probe.prompt_ids, device=device)
    positions = recorder.row(gen.info.get("batch_row", 0))[:steps]
    scores = copy_scores(positions, generated, prompt, probe.needle_span, config.mode)
    copies = copy_mask(positions, generated, prompt, probe.needle_span).sum(0)
    recall = rouge1_recall(probe.real_needle, gen.response)
    return {
        "key": probe.key, "length": probe.length, "depth": probe.depth,
        "needle_id": probe.needle_id, "n_tokens": probe.n_tokens, **probe.placement,
        "prompt_ids": list(probe.prompt_ids), "needle_span": list(probe.needle_span),
        "response_ids": gen.response_ids, "response": gen.response,
        "stop_reason": gen.stop_reason, "rouge_recall": recall,
        "success": recall > config.success_threshold,
        "scores": [[round(float(x), 6) for x in row] for row in scores.cpu()],
        "copy_steps": copies.cpu().tolist(), "reused_prefix": gen.reused_prefix,
        "seconds": round(seconds, 3),
    }


def scores_from_records(records: Sequence[dict[str, Any]], model_name: str,
                        n_kv_heads: int | None, config: DetectConfig) -> RetrievalScores:
    """Assemble :class:`RetrievalScores` from per-probe records (as in ``probes.jsonl``)."""
    for i, r in enumerate(records):
        wrong = detect_record_problem(r)
        if wrong:
            raise ConfigError(f"record {i} ({r.get('key') if isinstance(r, dict) else r!r}) is "
                              f"malformed: {wrong}")
    per_probe = torch.tensor([r["scores"] for r in records], dtype=torch.float32)
    success = torch.tensor([bool(r["success"]) for r in records])
    meta_keys = ("key", "length", "depth", "needle_id", "n_tokens", "response", "response_ids",
                 "rouge_recall", "success", "stop_reason")
    return RetrievalScores(per_probe=per_probe, success=success, model_name=model_name,
                           n_kv_heads=n_kv_heads,
                           probes=[{k: r[k] for k in meta_keys if k in r} for r in records],
                           config=config)
