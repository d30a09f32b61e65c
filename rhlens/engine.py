"""The decode engine that detection, ablation, NIAH sweeps and CoT runs share.

Reading order: phases -> native prefill -> one greedy decode -> many prompts with
prefix reuse.

Why it is built this way: TransformerBridge re-implements every attention layer as
matmul + softmax so that ``hook_pattern`` can fire. Over a long prompt that is an
O(n²) pattern per head (8K tokens of a 7B model: 38 GB). Retrieval scoring needs
patterns only at decode steps, where the single query makes them ``[batch, head, 1,
keys]``. So the engine

* prefills the prompt through the HF model's *own* attention modules with SDPA
  (:func:`native_attention` swaps them in for the duration of the prefill). The bridge's
  linear components stay in place, so ``hook_q``/``hook_k``/``hook_v``/``hook_z`` still
  fire during the prefill (ablation uses them); ``hook_pattern`` does not;
* decodes token by token through the bridge's hooked attention, reusing the prefill's KV
  cache, so every TransformerLens hook fires on every decode step;
* marks which phase is running (:func:`current_phase`), so that a hook can choose to act
  only while the model answers, as the paper's masking code does.

Greedy decoding follows the paper's harness: the prompt minus its last token is
prefilled, and the first decode step feeds that last token, so the attention that
produces the first answer token is observed like every later one.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from jaxtyping import Int
from torch import Tensor

from rhlens.errors import ConfigError

__all__ = [
    "Generation",
    "GenerationConfig",
    "HookPair",
    "current_phase",
    "generate",
    "generate_many",
    "native_attention",
    "phase",
]

Phase = Literal["prefill", "decode"]
HookPair = tuple[str, Callable[..., Any]]

# ---------------------------------------------------------------------------------------
# Phases
# ---------------------------------------------------------------------------------------
_PHASE: contextvars.ContextVar[Phase | None] = contextvars.ContextVar("rhlens_phase", default=None)


def current_phase() -> Phase | None:
    """``"prefill"`` or ``"decode"`` while the engine runs the model, else ``None``."""
    return _PHASE.get()


@contextlib.contextmanager
def phase(name: Phase) -> Iterator[None]:
    token = _PHASE.set(name)
    try:
        yield
    finally:
        _PHASE.reset(token)


# ---------------------------------------------------------------------------------------
# Native (SDPA) prefill
# ---------------------------------------------------------------------------------------
def hf_model(model) -> torch.nn.Module:
    """The HF model a bridge wraps (the bridge's components live inside it)."""
    hf = getattr(model, "original_model", None)
    if hf is None:
        raise ConfigError("expected a TransformerBridge (from rhlens.load_model)")
    return hf


def _attention_slots(model) -> list[tuple[torch.nn.Module, str, torch.nn.Module]]:
    """(HF decoder layer, attribute name, HF attention module) for every block."""
    slots = []
    for block in model.blocks:
        layer = block.original_component
        bridge_attn = block.attn
        native = bridge_attn.original_component
        name = next((n for n, m in layer._modules.items() if m is bridge_attn), None)
        if name is None or native is None:
            raise ConfigError(f"cannot find the attention module of {type(layer).__name__}")
        slots.append((layer, name, native))
    return slots


def _set_attn_impl(hf: torch.nn.Module, impl: str) -> None:
    configs = [hf.config, getattr(hf.config, "text_config", None)]
    configs += [getattr(m, "config", None) for m in hf.modules() if hasattr(m, "config")]
    for cfg in {id(c): c for c in configs if c is not None}.values():
        if hasattr(cfg, "_attn_implementation"):
            cfg._attn_implementation = impl


@contextlib.contextmanager
def native_attention(model, impl: str = "sdpa") -> Iterator[None]:
    """Run attention through the HF modules with ``impl`` (SDPA) instead of the bridge.

    Nothing quadratic in the prompt is allocated: no pattern, and (with SDPA's causal
    path) no dense mask. The bridge's q/k/v/o linear hooks keep firing.
    """
    hf = hf_model(model)
    slots = _attention_slots(model)
    old_impl = hf.config._attn_implementation
    bridged = [getattr(layer, name) for layer, name, _ in slots]
    try:
        for layer, name, native in slots:
            layer._modules[name] = native
        _set_attn_impl(hf, impl)
        yield
    finally:
        for (layer, name, _), module in zip(slots, bridged):
            layer._modules[name] = module
        _set_attn_impl(hf, old_impl)


def _new_cache(hf: torch.nn.Module):
    from transformers import DynamicCache

    return DynamicCache(config=hf.config)


@torch.no_grad()
def prefill(model, ids: Sequence[int], cache, *, chunk: int | None = None) -> None:
    """Append ``ids`` to ``cache`` through native attention, in chunks of ``chunk`` tokens."""
    if not ids:
        return
    hf = hf_model(model)
    device = next(hf.parameters()).device
    x = torch.tensor([list(ids)], dtype=torch.long, device=device)
    step = chunk or x.shape[1]
    with phase("prefill"), native_attention(model):
        for s in range(0, x.shape[1], step):
            # logits_to_keep=1: a [T, vocab] logits matrix would dwarf the KV cache.
            hf(input_ids=x[:, s:s + step], past_key_values=cache, use_cache=True,
               logits_to_keep=1)


# ---------------------------------------------------------------------------------------
# One greedy decode
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GenerationConfig:
    """How the engine answers.

    Attributes:
        max_new_tokens: decode steps at most (the paper: 50).
        stop_at_newline: stop at the first generated token containing a newline.
        stop_at_eos: stop at the tokenizer's end-of-sequence token(s).
        prefill_chunk: prefill this many tokens at a time (``None``: all at once). Bounds
            activation memory on very long prompts; results are the same up to float
            rounding.
        reuse_prefix: in :func:`generate_many`, keep the KV cache of the tokens a prompt
            shares with the previous one instead of prefilling them again.
    """

    max_new_tokens: int = 50
    stop_at_newline: bool = True
    stop_at_eos: bool = True
    prefill_chunk: int | None = None
    reuse_prefix: bool = True

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.prefill_chunk is not None and self.prefill_chunk < 1:
            raise ConfigError("prefill_chunk must be a positive number of tokens or None")


@dataclass
class Generation:
    """A greedy answer to one prompt.

    ``response_ids`` holds every generated token, the stopping token included (its step was
    observed like the others); ``response`` is the text without the stopping token.
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


class StepState:
    """What decode-time hooks may read: the step index and how many tokens were seen."""

    def __init__(self) -> None:
        self.step = -1  # index of the running decode step
        self.n_seen = 0  # tokens in the sequence including the one being fed now

    def absolute(self, n_keys: int) -> int:
        """Offset from a layer's key index to the absolute position (sliding caches drop keys)."""
        return self.n_seen - n_keys


def _eos_ids(tokenizer) -> set[int]:
    ids = set()
    for attr in ("eos_token_id",):
        v = getattr(tokenizer, attr, None)
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, (list, tuple)):
            ids.update(int(x) for x in v)
    return ids


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _crop(cache, keep: int) -> None:
    """Cut ``cache`` back to its first ``keep`` tokens."""
    # Sliding-window layers keep only the last window of keys: cutting into a dropped part
    # would silently lose context, so those caches are never reused.
    if any(getattr(layer, "is_sliding", False) for layer in getattr(cache, "layers", ())):
        raise NotImplementedError("sliding-window cache")
    drop = cache.get_seq_length() - keep
    if drop > 0:
        cache.crop(-drop)  # transformers 5: a negative value removes that many tokens


class _CacheReuse:
    """Keeps the last prompt's KV cache and crops it to the part the next prompt shares."""

    def __init__(self, model) -> None:
        self.model = model
        self.cache = None
        self.ids: tuple[int, ...] = ()
        self.key: Hashable = None  # what the prefill depends on besides the tokens
        self._cache_key: Hashable = None

    def take(self, ids: tuple[int, ...], enabled: bool):
        hf = hf_model(self.model)
        same = enabled and self.cache is not None and self.key == self._cache_key
        keep = _common_prefix(self.ids, ids) if same else 0
        if keep > 0:
            try:
                _crop(self.cache, keep)
            except (AttributeError, NotImplementedError, ValueError):
                keep = 0  # sliding-window caches cannot be cropped back
        if keep == 0:
            self.cache = _new_cache(hf)
        return self.cache, keep

    def remember(self, ids: tuple[int, ...]) -> None:
        self.ids = ids
        self._cache_key = self.key


@torch.no_grad()
def _answer(model, tokenizer, prompt_ids: tuple[int, ...], config: GenerationConfig,
            reuse: _CacheReuse, state: StepState) -> Generation:
    if len(prompt_ids) < 1:
        raise ConfigError("empty prompt")
    hf = hf_model(model)
    device = next(hf.parameters()).device
    body = prompt_ids[:-1]
    cache, kept = reuse.take(body, config.reuse_prefix)
    prefill(model, body[kept:], cache, chunk=config.prefill_chunk)
    reuse.remember(body)  # the decode steps below extend the cache past `body`; crop trims them
    eos = _eos_ids(tokenizer) if config.stop_at_eos else set()
    inp = torch.tensor([[prompt_ids[-1]]], dtype=torch.long, device=device)
    out: list[int] = []
    stop: Literal["newline", "eos", "length"] = "length"
    for step in range(config.max_new_tokens):
        state.step = step
        state.n_seen = len(prompt_ids) + step
        with phase("decode"):
            logits = hf(input_ids=inp, past_key_values=cache, use_cache=True).logits
        nxt = logits[0, -1].argmax()
        tok = int(nxt)  # the one host sync per step: needed to decide whether to stop
        out.append(tok)
        if tok in eos:
            stop = "eos"
            break
        if config.stop_at_newline and "\n" in tokenizer.decode([tok]):
            stop = "newline"
            break
        inp = nxt.view(1, 1)
    text_ids = out[:-1] if stop != "length" else out
    response = tokenizer.decode(text_ids, skip_special_tokens=True).strip()
    return Generation(prompt_ids=tuple(prompt_ids), response_ids=out, response=response,
                      stop_reason=stop, reused_prefix=kept)


def generate(model, tokenizer, prompt_ids: Sequence[int] | Tensor, *,
             config: GenerationConfig | None = None, hooks: Iterable[HookPair] = (),
             state: StepState | None = None) -> Generation:
    """Greedy-answer one prompt; ``hooks`` are TransformerLens ``(name, fn)`` pairs.

    Hooks are attached for this call only (through ``model.hooks``), so nothing stays
    attached, even after an exception. Attention-pattern hooks fire at decode steps only.
    """
    return next(iter(generate_many(model, tokenizer, [prompt_ids], config=config,
                                   hooks=hooks, state=state)))


def generate_many(model, tokenizer, prompts: Iterable[Sequence[int] | Tensor], *,
                  config: GenerationConfig | None = None, hooks: Iterable[HookPair] = (),
                  state: StepState | None = None,
                  on_start: Callable[[int], None] | None = None,
                  item_hooks: Callable[[int], Sequence[HookPair]] | None = None,
                  prefill_keys: Sequence[Hashable] | None = None) -> Iterator[Generation]:
    """Greedy-answer prompts one after another, reusing the KV cache of shared prefixes.

    Yields each :class:`Generation` as soon as it is done.

    Args:
        hooks: ``(name, fn)`` pairs attached for the whole call.
        on_start: ``on_start(i)`` runs before prompt ``i`` (watchers reset buffers there).
        item_hooks: ``item_hooks(i)`` gives extra pairs attached for prompt ``i`` only
            (e.g. a different head mask per prompt).
        prefill_keys: one hashable per prompt saying what the prefill depends on besides
            the tokens (e.g. a mask that also acts on the prefill). The KV cache is reused
            only between prompts with equal keys; by default all prompts share one key.
    """
    config = config or GenerationConfig()
    state = state or StepState()
    reuse = _CacheReuse(model)
    hook_list = list(hooks)
    ctx = model.hooks(fwd_hooks=hook_list) if hook_list else contextlib.nullcontext()
    with ctx:
        for i, prompt in enumerate(prompts):
            ids = _as_ids(prompt)
            if on_start is not None:
                on_start(i)
            reuse.key = prefill_keys[i] if prefill_keys is not None else None
            extra = list(item_hooks(i)) if item_hooks is not None else []
            with model.hooks(fwd_hooks=extra) if extra else contextlib.nullcontext():
                yield _answer(model, tokenizer, ids, config, reuse, state)


def _as_ids(prompt: Sequence[int] | Int[Tensor, " seq"]) -> tuple[int, ...]:
    if isinstance(prompt, Tensor):
        if prompt.ndim != 1:
            raise ConfigError(f"a prompt must be a 1-D tensor of token ids, got {tuple(prompt.shape)}")
        return tuple(int(t) for t in prompt.tolist())
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
