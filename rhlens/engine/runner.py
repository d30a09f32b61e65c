"""Greedy answers: ``GenerationConfig``, ``generate`` and ``generate_many`` (prefix reuse, batched decode).

Greedy decoding follows the paper's harness: the prompt minus its last token is prefilled,
and the first decode step feeds that last token, so the attention that produces the first
answer token is observed like every later one. Consecutive prompts of equal length are
decoded together when ``batch_size > 1`` (one forward per step for the batch), each row
bit-identical to the prompt answered alone under the exact kernel policies.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import operator
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from jaxtyping import Int
from torch import Tensor

from rhlens.engine.bridge import hf_model, input_device, new_cache
from rhlens.engine.captured import SYNC_EVERY, captured_decoder, decode_path, forget_decoders
from rhlens.engine.hooks import HookPair, StepState, phase
from rhlens.engine.kv import done_with, forget_pool, kept_pool, plain_cache_layers
from rhlens.engine.lean import DecodeStep, LeanDecoder, lean_ok
from rhlens.engine.native import DEFAULT_PREFILL_CHUNK, default_prefill_chunk, prefill
from rhlens.engine.policy import KernelPolicy
from rhlens.errors import ConfigError
from rhlens.store.results import Config
from rhlens.validate import check_token_ids

# On a GPU, prompts this long are prefilled in chunks of LONG_PROMPT_CHUNK unless a chunk is set
# (Runner.chunk_of): their KV is most of the card, and what else grows is one chunk's activations.
LONG_PROMPT = 262144
LONG_PROMPT_CHUNK = 8192

__all__ = ["Generation", "GenerationConfig", "Runner", "as_ids", "chat_prompt", "check_count", "decode_step",
           "generate", "generate_many", "model_tokenizer", "release_buffers"]


def check_count(name: str, value: Any, low: int) -> None:
    try:
        ok = not isinstance(value, bool) and operator.index(value) >= low
    except TypeError:
        ok = False
    if not ok:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")


@dataclass(frozen=True)
class GenerationConfig(Config):
    """How the engine answers.

    Attributes:
        max_new_tokens: decode steps at most (the paper: 50).
        stop_at_newline: stop at the first generated token containing a newline.
        stop_at_eos: stop at the tokenizer's end-of-sequence token(s).
        prefill_chunk: prefill this many tokens at a time (``None``: the device's default,
            16384 on a GPU, 32768 elsewhere: :func:`~rhlens.engine.native.default_prefill_chunk`).
            Bounds activation memory on long prompts; a reused prefix is cut back to a multiple
            of it, so that reuse changes no result.
        reuse_prefix: in :func:`generate_many`, keep the KV cache of the tokens a prompt
            shares with the previous one instead of prefilling them again.
        batch_size: in :func:`generate_many`, answer up to this many consecutive prompts of
            equal length together (one forward per decode step for all of them). On a GPU
            fewer are batched when their KV caches would not fit. Hooks then see a batch
            dimension of that size. ``1``: one prompt at a time.
        lean_decode: decode on the engine's own steps where they apply (the captured or the
            lean step, as ``policy.decode`` says); ``False`` always decodes through the
            bridge.
        policy: the lean step's kernels, a :class:`KernelPolicy` (``None`` or ``"auto"``:
            every choice the device's default, resolved when a run starts; see
            :meth:`describe`).
    """

    max_new_tokens: int = 50
    stop_at_newline: bool = True
    stop_at_eos: bool = True
    prefill_chunk: int | None = None
    reuse_prefix: bool = True
    batch_size: int = 1
    lean_decode: bool = True
    policy: KernelPolicy | Literal["auto"] | None = None

    def __post_init__(self) -> None:
        check_count("max_new_tokens", self.max_new_tokens, 1)
        if self.prefill_chunk is not None:
            check_count("prefill_chunk (tokens, or None)", self.prefill_chunk, 1)
        check_count("batch_size", self.batch_size, 1)
        for name in ("stop_at_newline", "stop_at_eos", "reuse_prefix", "lean_decode"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        policy = self.policy
        if policy is None or policy == "auto":
            policy = KernelPolicy()
        elif not isinstance(policy, KernelPolicy):
            raise ConfigError(f"policy must be a KernelPolicy, 'auto' or None, got {type(policy).__name__}")
        object.__setattr__(self, "policy", policy)

    @property
    def chunk(self) -> int:
        """The prefill chunk on a CPU (:meth:`chunk_for` gives any device's)."""
        return self.prefill_chunk or DEFAULT_PREFILL_CHUNK

    def chunk_for(self, device: torch.device | str) -> int:
        """The prefill chunk of a run on ``device``."""
        return self.prefill_chunk or default_prefill_chunk(device)

    def resolved_policy(self, model) -> KernelPolicy:
        """The kernel policy a run of ``model`` uses, on the device its weights are on."""
        return self.policy.resolve(next(hf_model(model).parameters()).device, model)

    def kernel_policy(self, model) -> dict[str, Any]:
        """The resolved :class:`KernelPolicy` of a run of ``model``, JSON-ready (what a run's
        header records as ``kernel_policy``)."""
        return self.resolved_policy(model).to_dict()

    def describe(self, model) -> dict[str, Any]:
        """What a run of ``model`` with this config uses, JSON-ready, for a run's header:
        ``{"generation": settings, "kernel_policy": the resolved KernelPolicy}``."""
        settings = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "policy"}
        return {"generation": settings, "kernel_policy": self.kernel_policy(model)}


def model_tokenizer(model, tokenizer=None):
    """``tokenizer``, else the one attached to ``model`` (a bridge's); a :class:`ConfigError`
    when there is neither."""
    tokenizer = tokenizer or getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ConfigError("pass the tokenizer: the model has none attached")
    return tokenizer


@dataclass
class Generation:
    """A greedy answer to one prompt.

    ``response_ids`` holds every generated token, the stopping token included (its step was
    observed like the others); ``response`` is the text without the stopping token.
    ``info["batch_row"]`` is the prompt's row in the batch it was decoded with;
    ``info["decode"]`` the decode step that ran (``"captured"``, ``"lean"`` or ``"bridge"``);
    ``info["prefill_tokens"]`` the prompt tokens the prefill computed for it (the prompt minus
    its last token, less the ``reused_prefix`` whose keys and values were copied instead).
    """

    prompt_ids: tuple[int, ...]
    response_ids: list[int]
    response: str
    stop_reason: Literal["newline", "eos", "length"]
    reused_prefix: int = 0
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def n_steps(self) -> int:
        return len(self.response_ids)


def _eos_ids(tokenizer) -> set[int]:
    ids = set()
    v = getattr(tokenizer, "eos_token_id", None)
    if isinstance(v, int):
        ids.add(v)
    elif isinstance(v, (list, tuple)):
        ids.update(int(x) for x in v)
    return ids


class _Stops:
    """Each row's tokens until its stop (EOS, newline, or none yet)."""

    def __init__(self, rows: int, eos: set[int], newline: Callable[[int], bool] | None) -> None:
        self.outs: list[list[int]] = [[] for _ in range(rows)]
        self.stops: list[str | None] = [None] * rows
        self.eos, self.newline = eos, newline

    def add(self, toks: Sequence[int]) -> bool:
        """One step's tokens (one per row); True when every row has stopped."""
        for r, tok in enumerate(toks):
            if self.stops[r] is not None:
                continue
            self.outs[r].append(tok)
            if tok in self.eos:
                self.stops[r] = "eos"
            elif self.newline is not None and self.newline(tok):
                self.stops[r] = "newline"
        return all(s is not None for s in self.stops)

    def add_steps(self, steps: Sequence[Sequence[int]]) -> bool:
        return any(self.add(toks) for toks in steps)

    def result(self) -> list[tuple[list[int], str]]:
        return [(o, s or "length") for o, s in zip(self.outs, self.stops)]


class Runner:
    """Prefills and decodes batches of equal-length prompts for :func:`generate_many`."""

    def __init__(self, model, tokenizer, config: GenerationConfig, state: StepState) -> None:
        self.model, self.tokenizer, self.config, self.state = model, tokenizer, config, state
        self.hf = hf_model(model)
        self.device = input_device(self.hf)  # where token ids go (the first of a split model's)
        self.policy = config.policy.resolve(self.device, model)
        self.chunk = config.chunk_for(self.device)
        self._fitted: dict[int, int] = {}  # prompt length -> the chunk that let one row fit
        n_layers = plain_cache_layers(self.hf)
        self.pool = kept_pool(self.hf, n_layers, self) if n_layers else None
        self.eos = _eos_ids(tokenizer) if config.stop_at_eos else set()
        self._newline: dict[int, bool] = {}
        self._last_body: tuple[tuple[tuple[int, ...], Hashable], Any] | None = None

    def _path(self) -> str:
        """The decode step for the hooks attached now (see :class:`KernelPolicy`'s ``decode``)."""
        if not self.config.lean_decode:
            return "bridge"
        wanted = self.policy.decode
        if self.pool is None and wanted == "captured":  # the captured step needs the pool's buffers
            wanted = "lean"
        return decode_path(self.model, wanted)

    def _captured_decoder(self):
        """The captured step this run decodes on (the model's, kept with it)."""
        return captured_decoder(self.model, self.policy)

    def max_rows(self, n_tokens: int) -> int:
        if self.pool is None:
            return 1
        cap = n_tokens - 1 + self.config.max_new_tokens
        chunk = self.chunk_of(n_tokens)
        rows, fitted = self.pool.fit(self.config.batch_size, cap, chunk)
        if fitted != chunk:  # not even one row fitted with the usual chunk
            self._fitted[n_tokens] = fitted
        return rows

    def chunk_of(self, n_tokens: int) -> int:
        """The prefill chunk of a prompt of ``n_tokens`` (a function of its length alone, so a
        prompt is prefilled in the same chunks in any batch or run): the config's, except on a
        GPU for prompts of :data:`LONG_PROMPT` tokens or more when none was set, whose KV is
        most of the card: :data:`LONG_PROMPT_CHUNK` (a 512K-token probe on an H100: the same
        prefill rate, peak memory 3.0% above weights + KV instead of 5.6%; BENCHMARKS.md);
        or a smaller one that :meth:`KVPool.fit` found where not even one row fitted."""
        if n_tokens in self._fitted:
            return self._fitted[n_tokens]
        if self.config.prefill_chunk is None and self.device.type == "cuda" and n_tokens >= LONG_PROMPT:
            return min(self.chunk, LONG_PROMPT_CHUNK)
        return self.chunk

    def _has_newline(self, tok: int) -> bool:
        hit = self._newline.get(tok)
        if hit is None:
            hit = self._newline[tok] = "\n" in self.tokenizer.decode([tok])
        return hit

    def _sliding_cache(self, body: tuple[int, ...], key: Hashable) -> tuple[Any, list[int]]:
        """A model without a plain KV cache (sliding-window layers): its prompt prefilled into a
        fresh cache, or, when the previous prompt had the same body and prefill key (one probe
        under several decode-only masks), a copy of that prompt's prefilled cache."""
        if self.config.reuse_prefix and self._last_body is not None and self._last_body[0] == (body, key):
            return copy.deepcopy(self._last_body[1]), [len(body)]
        cache = new_cache(self.hf)
        prefill(self.model, body, cache, chunk=self.chunk_of(len(body) + 1), attn=self.policy.prefill_attn,
                on_chunk=self.state.on_prefill)
        self._last_body = ((body, key), copy.deepcopy(cache)) if self.config.reuse_prefix else None
        return cache, [0]

    @torch.no_grad()
    def run(self, items: Sequence[tuple[int, tuple[int, ...], Hashable]],
            on_start: Callable[[int], None] | None) -> list[Generation]:
        """Answer ``items`` ((index, prompt ids, prefill key), equal lengths) together."""
        config = self.config
        rows = len(items)
        n = len(items[0][1])
        bodies = [ids[:-1] for _, ids, _ in items]
        for i, _, _ in items:
            if on_start is not None:
                on_start(i)
        path = self._path()
        captured = None
        if path == "captured":
            captured = self._captured_decoder()
            if not captured.applies(rows, config.max_new_tokens):
                path, captured = "lean", None
        capacity = n - 1 + config.max_new_tokens
        if captured is not None:  # the captured step attends over whole buckets of keys
            capacity = -(-capacity // self.policy.bucket) * self.policy.bucket
        last = [ids[-1] for _, ids, _ in items]
        cache, kept = self._prefill(items, bodies, capacity, want_cache=captured is None)
        if captured is not None:
            outs = self._decode_captured(captured, rows, last, n)
            if "compile failed" in captured.last_path:  # said in every Generation, not only a warning
                path = "captured (uncompiled: compile failed)"
        else:
            outs = self._decode(cache, last, n, path)
        gens = []
        for r, ((_, ids, _), (out, stop)) in enumerate(zip(items, outs)):
            text_ids = out[:-1] if stop != "length" else out
            response = self.tokenizer.decode(text_ids, skip_special_tokens=True).strip()
            gens.append(Generation(prompt_ids=ids, response_ids=out, response=response,
                                   stop_reason=stop, reused_prefix=kept[r],
                                   info={"batch_row": r, "batch_size": rows, "decode": path,
                                         "prefill_tokens": len(bodies[r]) - kept[r]}))
        return gens

    def _stops(self, rows: int) -> _Stops:
        return _Stops(rows, self.eos, self._has_newline if self.config.stop_at_newline else None)

    def _prefill(self, items: Sequence[tuple[int, tuple[int, ...], Hashable]],
                 bodies: list[tuple[int, ...]], capacity: int,
                 want_cache: bool = True) -> tuple[Any, list[int]]:
        """The KV cache of the prompt bodies (row r: ``bodies[r]``; room for ``capacity``
        positions), and how many leading tokens of each were reused instead of computed.
        ``want_cache=False``: the pool's buffers are filled, no cache object is made (the
        captured step reads the buffers itself)."""
        config = self.config
        rows, n = len(items), len(items[0][1])
        if self.pool is None:  # sliding-window caches: a fresh cache, one prompt at a time
            if rows != 1:
                raise RuntimeError("rhlens: batching needs a plain KV cache (engine bug)")
            return self._sliding_cache(bodies[0], items[0][2])
        chunk = self.chunk_of(n)
        self.pool.ensure(rows, capacity, bodies[0], items[0][2], config.reuse_prefix, chunk)
        kept = [self.pool.fill(self.model, r, bodies[r], items[r][2], config.reuse_prefix,
                               chunk, self.policy.prefill_attn, self.state.on_prefill)
                for r in range(rows)]
        return (self.pool.decode_cache(rows, n - 1) if want_cache else None), kept

    def step(self, path: str) -> Callable[[Tensor, Any, int], Tensor]:
        """The decode step ``step(input_ids [rows, 1], cache, position) -> logits`` of ``path``
        ("lean" or "bridge"; the captured step runs through :meth:`_decode_captured`)."""
        return decode_step(self.model, path == "lean", self.policy)

    def _decode(self, cache, last: list[int], n_prompt: int, path: str) -> list[tuple[list[int], str]]:
        config, state = self.config, self.state
        rows = len(last)
        inp = torch.tensor([[t] for t in last], dtype=torch.long, device=self.device)  # [rows, 1]
        stops = self._stops(rows)
        state.rows = rows
        forward = self.step(path)
        with phase("decode", state):
            for step in range(config.max_new_tokens):
                state.step = step
                state.n_seen = n_prompt + step
                logits = forward(inp, cache, n_prompt - 1 + step)  # [rows, 1, vocab]
                nxt = logits[:, -1].argmax(-1)
                if state.on_step is not None:
                    state.on_step()
                # the one host sync per step: needed to decide whether to stop
                if stops.add(nxt.tolist()):
                    break
                inp = nxt.view(rows, 1).to(self.device)  # a split model's logits: its last device
        return stops.result()

    def _decode_captured(self, decoder, rows: int, last: list[int],
                         n_prompt: int) -> list[tuple[list[int], str]]:
        stops = self._stops(rows)
        self.state.rows = rows
        check = SYNC_EVERY if (self.eos or self.config.stop_at_newline) else None
        pool = self.pool
        with phase("decode", self.state):
            ran = decoder.decode(pool.k, pool.v, rows, n_prompt, last, self.config.max_new_tokens,
                                 stops.add_steps, check, on_step=self.state.on_step)
        decoder.crop(ran, [len(o) for o in stops.outs])
        return stops.result()


def generate(model, tokenizer, prompt_ids: Sequence[int] | Tensor, *,
             config: GenerationConfig | None = None, hooks: Iterable[HookPair] = (),
             state: StepState | None = None) -> Generation:
    """Greedy-answer one prompt; ``hooks`` are TransformerLens ``(name, fn)`` pairs.

    Hooks are attached for this call only (through ``model.hooks``), so nothing stays
    attached, even after an exception. Attention-pattern hooks fire at decode steps only.
    """
    gens = generate_many(model, tokenizer, [prompt_ids], config=config, hooks=hooks, state=state)
    try:
        return next(gens)
    finally:
        gens.close()


def generate_many(model, tokenizer, prompts: Iterable[Sequence[int] | Tensor], *,
                  config: GenerationConfig | None = None, hooks: Iterable[HookPair] = (),
                  state: StepState | None = None,
                  on_start: Callable[[int], None] | None = None,
                  item_hooks: Callable[[int], Sequence[HookPair]] | None = None,
                  prefill_keys: Sequence[Hashable] | None = None) -> Iterator[Generation]:
    """Greedy-answer prompts, reusing the KV cache of shared prefixes.

    Yields each :class:`Generation` in prompt order. With ``config.batch_size > 1``,
    consecutive prompts of equal length (and equal prefill key) are decoded together and
    yielded when their batch is done; hooks then see a batch dimension.

    Args:
        hooks: ``(name, fn)`` pairs attached for the whole call.
        state: the :class:`StepState` the engine updates at every step (also readable from a
            hook as :func:`rhlens.engine.current_step`).
        on_start: ``on_start(i)`` runs before prompt ``i`` (watchers reset buffers there);
            for a batch, for each of its prompts before the batch starts.
        item_hooks: ``item_hooks(i)`` gives extra pairs attached for prompt ``i`` only
            (e.g. a different head mask per prompt); prompts are then answered one at a time.
        prefill_keys: one hashable per prompt saying what the prefill depends on besides
            the tokens (e.g. a mask that also acts on the prefill). The KV cache is reused
            only between prompts with equal keys; by default all prompts share one key.
    """
    config = config or GenerationConfig()
    state = state or StepState()
    runner = Runner(model, tokenizer, config, state)
    hook_list = list(hooks)

    def run(items, extra: Sequence[HookPair] = ()) -> list[Generation]:
        # Hooks are attached while the model runs and removed before anything is yielded:
        # a caller that stops iterating early (zip, next) leaves nothing attached.
        pairs = [*hook_list, *extra]
        with model.hooks(fwd_hooks=pairs) if pairs else contextlib.nullcontext():
            return runner.run(items, on_start)

    try:
        yield from _generate_all(runner, run, prompts, config, item_hooks, prefill_keys)
    finally:  # a large KV pool is not held after the run (see engine.kv.done_with)
        if runner.pool is not None:
            done_with(runner.hf, runner.pool)


def _generate_all(runner, run, prompts, config, item_hooks, prefill_keys) -> Iterator[Generation]:
    batch: list[tuple[int, tuple[int, ...], Hashable]] = []
    limit = 1
    vocab = getattr(getattr(runner.model, "cfg", None), "d_vocab", None)
    vocab = vocab if isinstance(vocab, int) and vocab > 0 else None
    for i, prompt in enumerate(prompts):
        # Whole numbers inside the vocabulary, checked here: not 27 frames deep in torch.
        ids = as_ids(check_token_ids(prompt, vocab, what=f"prompt {i}'s token ids"))
        key = prefill_keys[i] if prefill_keys is not None else None
        if item_hooks is not None:
            yield from run([(i, ids, key)], list(item_hooks(i)))
            continue
        if batch and (len(ids) != len(batch[0][1]) or key != batch[0][2]):
            yield from run(batch)
            batch = []
        if not batch:
            limit = runner.max_rows(len(ids))  # on a GPU: refused here if one row does not fit
        batch.append((i, ids, key))
        if len(batch) >= limit:
            yield from run(batch)
            batch = []
    if batch:
        yield from run(batch)


def as_ids(prompt: Sequence[int] | Int[Tensor, " seq"]) -> tuple[int, ...]:
    if isinstance(prompt, Tensor):
        if prompt.ndim != 1:
            raise ConfigError(f"a prompt must be a 1-D tensor of token ids, got {tuple(prompt.shape)}")
        ids = tuple(int(t) for t in prompt.tolist())
    else:
        ids = tuple(int(t) for t in prompt)
    if not ids:
        raise ConfigError("empty prompt")
    return ids


def chat_prompt(tokenizer, user: str, *, chat_template: bool = True) -> list[int]:
    """Token ids of a single-turn prompt, through the chat template when there is one."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        return list(tokenizer.apply_chat_template([{"role": "user", "content": user}],
                                                  add_generation_prompt=True, tokenize=True,
                                                  return_dict=False))
    return list(tokenizer(user)["input_ids"])


def decode_step(model, lean: bool, policy: KernelPolicy | None = None) -> DecodeStep:
    """The decode step of a run: ``step(input_ids [batch, 1], cache, position) -> logits [batch, 1, vocab]``.

    The lean step when ``lean`` and :func:`lean_ok`, computing its products as ``policy``
    says (``None``: the device's defaults); else the bridge's own forward.
    """
    hf = hf_model(model)
    if lean and lean_ok(model):
        if policy is None or not policy.resolved:
            policy = (policy or KernelPolicy()).resolve(next(hf.parameters()).device, model)
        return LeanDecoder(model, policy)

    def step(input_ids: Tensor, cache, position: int) -> Tensor:
        return hf(input_ids=input_ids, past_key_values=cache, use_cache=True).logits

    return step


def release_buffers(model) -> None:
    """Free what the engine keeps on a model's GPU between runs (``model``: a bridge): its KV
    pool and the captured decode step's graphs (the next run allocates and captures anew)."""
    hf = hf_model(model)
    forget_pool(hf)
    forget_decoders(hf)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


_Runner = Runner  # the older private name (benchmarks/bench_speed.py patches its methods)
