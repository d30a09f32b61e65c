"""The decode engine that detection, ablation, NIAH sweeps and CoT runs share.

Reading order: phases -> native prefill -> KV storage -> lean decode -> one batch of greedy
decodes -> many prompts with prefix reuse and batching.

Why it is built this way: TransformerBridge re-implements every attention layer as
matmul + softmax so that ``hook_pattern`` can fire. Over a long prompt that is an
O(n²) pattern per head (8K tokens of a 7B model: 38 GB). Retrieval scoring needs
patterns only at decode steps, where the single query makes them ``[batch, head, 1,
keys]``. So the engine

* prefills the prompt through the HF model's *own* attention modules with SDPA
  (:func:`native_attention` swaps them in for the duration of the prefill). The bridge's
  linear components stay in place, so ``hook_q``/``hook_k``/``hook_v``/``hook_z`` still
  fire during the prefill (ablation uses them); ``hook_pattern`` does not. A chunk that
  follows cached tokens (chunked prefill, a reused prefix) runs SDPA with a lower-right
  causal bias instead of a dense ``[chunk, keys]`` mask, so nothing quadratic in the
  context is allocated;
* decodes token by token with every TransformerLens attention hook firing on every decode
  step, reusing the prefill's KV cache. When only attention hooks are attached (retrieval
  recording, head ablation), the step is :class:`_LeanDecoder`: the same tensor operations
  on the same HF modules' weights, without HF's and the bridge's per-module call
  machinery (the decode step is bound by Python, not by the GPU), with a lean copy of the
  bridge's attention that fires the same hook points on the same tensors and does not copy
  K/V for every query head under grouped-query attention (:class:`_LeanAttention`). With
  any other hook attached the step runs through the bridge itself;
* keeps the KV cache in preallocated buffers (:class:`_BufferLayer`): a decode step writes
  one position instead of re-concatenating the whole cache, and consecutive prompts that
  share a prefix (NIAH probes of one haystack) reuse its keys and values. Prefill runs in
  chunks of :data:`DEFAULT_PREFILL_CHUNK` tokens counted from the prompt's start and a
  reused prefix is cut back to a chunk boundary, so reuse computes exactly what the prompt
  alone computes;
* answers prompts of equal length together when ``batch_size > 1`` (one forward per step
  for the whole batch). Matrix products run row by row (``_LeanAttention.rows``): BLAS
  picks kernels, and so rounding, by shape, and this keeps every row bit-identical to the
  prompt answered alone while the rest of the step (norms, elementwise work, hooks, Python)
  is shared;
* marks which phase is running (:func:`current_phase`), so that a hook can choose to act
  only while the model answers, as the paper's masking code does.

Greedy decoding follows the paper's harness: the prompt minus its last token is
prefilled, and the first decode step feeds that last token, so the attention that
produces the first answer token is observed like every later one.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import weakref
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
    "native_modules",
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
    # The configs are found once per model: walking every module costs milliseconds on a 7B
    # bridge, and this runs around every prefill and decode.
    configs = hf.__dict__.get("_rhlens_configs")
    if configs is None:
        found = [hf.config, getattr(hf.config, "text_config", None)]
        found += [getattr(m, "config", None) for m in hf.modules() if hasattr(m, "config")]
        configs = [c for c in {id(c): c for c in found if c is not None}.values()
                   if hasattr(c, "_attn_implementation")]
        hf.__dict__["_rhlens_configs"] = configs
    for cfg in configs:
        cfg._attn_implementation = impl


# A chunk of queries that follows cached keys needs a causal mask aligned to the lower right
# (query i sees keys 0..offset+i). HF builds it densely ([batch, 1, chunk, keys]: quadratic
# in the context for a long chunk) and then cannot use the flash kernel. Registered under
# this name, the engine's prefill gets no mask from HF when nothing is padded, and SDPA gets
# a lower-right causal bias object that the flash / memory-efficient kernels apply on the fly.
_IMPL = "rhlens_sdpa"


def _rhlens_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                 is_causal=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q_len, kv_len = query.shape[2], key.shape[2]
    if attention_mask is not None or q_len == 1 or q_len == kv_len or kv_len < q_len:
        # The cases HF's SDPA handles without a dense causal mask: no cached keys (is_causal),
        # a single query, or a mask that the caller really needs (padding, sliding window).
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    from torch.nn.attention.bias import causal_lower_right

    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        # The lower-right causal flash kernel takes equal head counts: K/V are expanded for
        # this call (a transient copy of one layer, linear in the context).
        from transformers.models.llama.modeling_llama import repeat_kv

        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=causal_lower_right(q_len, kv_len), dropout_p=dropout,
        scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def _rhlens_mask(*args, **kwargs):
    """HF's SDPA mask, except ``None`` for a plain causal mask over unpadded rows."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    pad = kwargs.get("attention_mask")
    plain = (kwargs.get("mask_function", causal_mask_function) is causal_mask_function
             and kwargs.get("local_size") is None and (pad is None or bool(pad.all())))
    if plain and not args:
        return None
    return sdpa_mask(*args, **kwargs)


@functools.cache
def _register_impl() -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(_IMPL, _rhlens_sdpa)
    AttentionMaskInterface.register(_IMPL, _rhlens_mask)
    return _IMPL


@contextlib.contextmanager
def native_attention(model, impl: str | None = None) -> Iterator[None]:
    """Run attention through the HF modules with SDPA instead of the bridge.

    Nothing quadratic in the prompt is allocated: no pattern, and no dense causal mask
    (SDPA's causal path; a lower-right causal bias after cached tokens). The bridge's
    q/k/v/o linear hooks keep firing. ``impl`` names another HF attention implementation.
    """
    impl = impl or _register_impl()
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


def _bridge_swaps(hf: torch.nn.Module) -> list[tuple[torch.nn.Module, str, torch.nn.Module, torch.nn.Module]]:
    """(parent, name, bridge component, HF module it wraps) for every bridge component
    (found once per model: the walk costs milliseconds, and every prefill swaps)."""
    cached = _SWAPS.get(hf)
    if cached is not None and all(parent._modules.get(name) is bridge for parent, name, bridge, _ in cached):
        return cached
    _SWAPS[hf] = swaps = _walk_bridge(hf)
    return swaps


_SWAPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _walk_bridge(hf: torch.nn.Module) -> list[tuple[torch.nn.Module, str, torch.nn.Module, torch.nn.Module]]:
    from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent

    out = []

    def walk(parent: torch.nn.Module) -> None:
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            if isinstance(child, GeneralizedComponent):
                original = child._modules.get("_original_component")
                if original is None:
                    raise ConfigError(f"bridge component {name} wraps no HF module")
                out.append((parent, name, child, original))
                walk(original)
            else:
                walk(child)

    walk(hf)
    return out


@contextlib.contextmanager
def _swapped(hf: torch.nn.Module, replacement: Callable[[torch.nn.Module, torch.nn.Module], torch.nn.Module],
             impl: str) -> Iterator[None]:
    swaps = _bridge_swaps(hf)
    old_impl = hf.config._attn_implementation
    try:
        for parent, name, bridge, original in swaps:
            parent._modules[name] = replacement(bridge, original)
        _set_attn_impl(hf, impl)
        yield
    finally:
        for parent, name, bridge, _ in reversed(swaps):
            parent._modules[name] = bridge
        _set_attn_impl(hf, old_impl)


@contextlib.contextmanager
def native_modules(model, impl: str = "sdpa") -> Iterator[torch.nn.Module]:
    """The plain HF model: every bridge component swapped for the module it wraps.

    No TransformerLens hook fires inside; used to time HF's own ``generate`` against the
    engine on the same weights. Yields the HF model.
    """
    hf = hf_model(model)
    with _swapped(hf, lambda bridge, original: original, impl):
        yield hf


def _new_cache(hf: torch.nn.Module):
    from transformers import DynamicCache

    return DynamicCache(config=hf.config)


# Prompts are prefilled in chunks of this many tokens, counted from the prompt's start, and a
# reused prefix is cut back to a chunk boundary: a probe that reuses another's prefix then runs
# exactly the chunks (same shapes, same kernels, same rounding) it runs alone. Large, because a
# chunk that follows cached keys runs flash attention at about half the rate of one causal pass
# over the whole prompt (benchmarks/prefill_attention.py: 5.9 ms for the last 4096 of 32768
# tokens of one Llama-3-8B layer on an H100): prompts up to 32K tokens prefill in one pass, as
# HF generate does, and longer ones in chunks that bound the activations' memory.
DEFAULT_PREFILL_CHUNK = 32768


def _prefill_is_silent(model) -> bool:
    """Whether no hook attached to ``model`` would act while a prompt is prefilled.

    True when every TransformerLens hook is marked ``rhlens_prefill_inert`` (the retrieval
    recorder, decode-only head masks) and no other PyTorch hook is attached: the prefill
    then runs the plain HF modules, without the bridge's per-module wrappers (the same
    operations on the same weights; 15% of an 8K-token Llama-3-8B prefill on an H100).
    """
    from transformer_lens.hook_points import HookPoint

    internal = {h.id for block in getattr(model, "blocks", ())
                for h in getattr(block, "_capture_hook_handles", ())}
    for module in model.modules():
        if isinstance(module, HookPoint):
            handles = list(getattr(module, "fwd_hooks", ()))
            if len(handles) != len(module._forward_hooks) or module._forward_pre_hooks \
                    or getattr(module, "bwd_hooks", None):
                return False
            if not all(getattr(h.user_hook, "rhlens_prefill_inert", False) for h in handles):
                return False
        elif _has_hooks(module, internal):
            return False
    return True


@torch.no_grad()
def prefill(model, ids: Sequence[int], cache, *, chunk: int | None = None) -> None:
    """Append ``ids`` to ``cache`` through native attention, in chunks of ``chunk`` tokens.

    With no hook that acts during the prefill attached, every bridge component is swapped
    for the HF module it wraps (:func:`_prefill_is_silent`); otherwise only the attention
    modules are, and the bridge's other hooks fire.
    """
    if not ids:
        return
    hf = hf_model(model)
    device = next(hf.parameters()).device
    x = torch.tensor([list(ids)], dtype=torch.long, device=device)
    step = chunk or x.shape[1]
    plain = _prefill_is_silent(model)
    swap = native_modules(model, _register_impl()) if plain else native_attention(model)
    with phase("prefill"), swap:
        for s in range(0, x.shape[1], step):
            # logits_to_keep=1: a [T, vocab] logits matrix would dwarf the KV cache.
            hf(input_ids=x[:, s:s + step], past_key_values=cache, use_cache=True,
               logits_to_keep=1)


# ---------------------------------------------------------------------------------------
# KV storage: preallocated buffers instead of a cache re-concatenated at every step
# ---------------------------------------------------------------------------------------
@functools.cache
def _buffer_layer_class():
    from transformers.cache_utils import DynamicLayer

    class _BufferLayer(DynamicLayer):
        """A ``DynamicLayer`` that writes new keys/values into a preallocated buffer.

        ``keys``/``values`` are views of the first ``length`` positions, as HF expects;
        cropping is O(1). ``fixed`` buffers are views of the engine's batch storage and
        never reallocate.
        """

        is_sliding = False
        is_croppable = True

        def __init__(self, keys: Tensor | None = None, values: Tensor | None = None,
                     length: int = 0, reserve: int = 0, fixed: bool = False) -> None:
            super().__init__()
            self._kb, self._vb, self._n = keys, values, 0
            self.reserve, self.fixed = reserve, fixed
            if keys is not None:
                self.dtype, self.device = keys.dtype, keys.device
                self.is_initialized = True
                self._set_len(length)

        def lazy_initialization(self, key_states, value_states=None) -> None:
            self.dtype, self.device = key_states.dtype, key_states.device
            self.is_initialized = True

        def _set_len(self, n: int) -> None:
            self._n = n
            self.keys = self._kb[:, :, :n]
            self.values = self._vb[:, :, :n]

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n0 = self._n
            n1 = n0 + key_states.shape[-2]
            if (self._kb is None or n1 > self._kb.shape[-2]
                    or self._kb.shape[0] != key_states.shape[0]):
                self._grow(key_states, value_states, max(n1, self.reserve))
            if key_states.dtype != self._kb.dtype:
                raise ConfigError(f"KV cache holds {self._kb.dtype}, the model gives {key_states.dtype}")
            self._kb[:, :, n0:n1].copy_(key_states)
            self._vb[:, :, n0:n1].copy_(value_states)
            self._set_len(n1)
            if n0 == 0:  # the same values, contiguous: attention kernels see what HF gives them
                return key_states, value_states
            return self.keys, self.values

        def _grow(self, k: Tensor, v: Tensor, capacity: int) -> None:
            if self.fixed:
                raise RuntimeError("rhlens: a fixed KV buffer is too small (engine bug)")
            b, h, _, d = k.shape
            kb = k.new_empty((b, h, capacity, d))
            vb = v.new_empty((b, v.shape[1], capacity, v.shape[-1]))
            if self._n:
                if self._kb.shape[0] != b:
                    raise RuntimeError("rhlens: cannot change the batch size of a filled KV cache")
                kb[:, :, :self._n].copy_(self._kb[:, :, :self._n])
                vb[:, :, :self._n].copy_(self._vb[:, :, :self._n])
            self._kb, self._vb = kb, vb

        def get_seq_length(self) -> int:
            return self._n

        def crop(self, tokens_to_remove: int) -> None:
            if tokens_to_remove > 0:
                raise ValueError("crop takes a negative number of tokens to remove")
            if tokens_to_remove == 0 or not self.is_initialized:
                return
            self._set_len(max(0, self._n - abs(tokens_to_remove)))

        def reset(self) -> None:
            self._n = 0
            if self._kb is not None:
                self._set_len(0)

        def batch_repeat_interleave(self, repeats: int) -> None:  # pragma: no cover
            raise NotImplementedError("rhlens KV buffers do not support beam search")

        def batch_select_indices(self, indices) -> None:  # pragma: no cover
            raise NotImplementedError("rhlens KV buffers do not support beam search")

    return _BufferLayer


def _plain_cache_layers(hf: torch.nn.Module) -> int | None:
    """Number of layers if every layer of the model's cache is a plain DynamicLayer."""
    from transformers.cache_utils import DynamicLayer

    layers = _new_cache(hf).layers
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        return None  # sliding windows, linear attention, ...: no reuse, no batching
    return len(layers)


def _buffer_cache(hf: torch.nn.Module, keys: Sequence[Tensor], values: Sequence[Tensor],
                  length: int):
    """A DynamicCache whose layers are (fixed) views of the given buffers."""
    cls = _buffer_layer_class()
    cache = _new_cache(hf)
    cache.layers = [cls(k, v, length=length, fixed=True) for k, v in zip(keys, values)]
    return cache


def _kv_shape(hf: torch.nn.Module) -> tuple[int, int, int]:
    cfg = hf.config.get_text_config(decoder=True) if hasattr(hf.config, "get_text_config") else hf.config
    n_heads = int(cfg.num_attention_heads)
    n_kv = int(getattr(cfg, "num_key_value_heads", None) or n_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads)
    return n_kv, head_dim, int(getattr(cfg, "intermediate_size", 4 * cfg.hidden_size))


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class _KVPool:
    """KV buffers ``[rows, kv_heads, capacity, head_dim]`` per layer, and what each row holds.

    Row ``r`` holds the keys/values of ``self.body[r]`` (a prompt minus its last token). A
    new prompt body is prefilled into a row after copying in the prefix it shares with the
    most recently prefilled body (``self.last``), so only the rest is computed.
    """

    def __init__(self, hf: torch.nn.Module, n_layers: int) -> None:
        self.hf = hf
        self.n_layers = n_layers
        self.k: list[Tensor] = []
        self.v: list[Tensor] = []
        self.body: list[tuple[int, ...] | None] = []
        self.last: int | None = None
        self.key: Hashable = None
        p = next(hf.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.n_kv, self.head_dim, self.inter = _kv_shape(hf)

    @property
    def rows(self) -> int:
        return self.k[0].shape[0] if self.k else 0

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2] if self.k else 0

    def row_bytes(self, capacity: int) -> int:
        return 2 * self.n_layers * self.n_kv * self.head_dim * capacity * self.dtype.itemsize

    def fit_rows(self, want: int, capacity: int, chunk: int | None) -> int:
        """How many rows of ``capacity`` tokens fit on the device (at most ``want``)."""
        if want <= 1 or self.device.type != "cuda":
            return max(1, want)
        free, total = torch.cuda.mem_get_info(self.device)
        allocated = torch.cuda.memory_allocated(self.device)
        free += torch.cuda.memory_reserved(self.device) - allocated
        fraction = getattr(torch.cuda.memory, "get_per_process_memory_fraction", None)
        if fraction is not None:  # a process capped below the card's memory
            free = min(free, int(total * fraction(self.device)) - allocated)
        free += sum(t.numel() * t.element_size() for t in self.k + self.v)
        hidden = self.n_kv * self.head_dim  # a lower bound; the activations below dominate
        tokens = min(capacity, chunk or capacity)
        cfg = self.hf.config.get_text_config(decoder=True) if hasattr(self.hf.config, "get_text_config") \
            else self.hf.config
        width = 3 * self.inter + 12 * int(getattr(cfg, "hidden_size", hidden))
        margin = (2 << 30) + tokens * width * 2 * self.dtype.itemsize
        return max(1, min(want, int((free - margin) // self.row_bytes(capacity))))

    def ensure(self, rows: int, capacity: int, first: tuple[int, ...], key: Hashable,
               reuse: bool, chunk: int) -> None:
        if self.k and self.rows >= rows and self.capacity >= capacity:
            return
        carry = None
        if reuse and self.k and self.last is not None and key == self.key:
            keep = _common_prefix(self.body[self.last], first) // chunk * chunk
            if keep:
                r = self.last
                carry = ([k[r:r + 1, :, :keep].clone() for k in self.k],
                         [v[r:r + 1, :, :keep].clone() for v in self.v], first[:keep])
        self.k, self.v, self.body, self.last = [], [], [], None  # free before allocating
        shape = (rows, self.n_kv, capacity, self.head_dim)
        self.k = [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in range(self.n_layers)]
        self.v = [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in range(self.n_layers)]
        self.body = [None] * rows
        if carry is not None:
            ks, vs, ids = carry
            for dst, src in zip(self.k + self.v, ks + vs):
                dst[:1, :, :src.shape[2]].copy_(src)
            self.body[0], self.last = ids, 0

    def fill(self, model, row: int, body: tuple[int, ...], key: Hashable, reuse: bool,
             chunk: int) -> int:
        """Prefill ``body`` into ``row``; returns how many leading tokens were reused.

        The reused prefix is cut back to a multiple of ``chunk``, so the rest is prefilled in
        the chunks the body alone is prefilled in: same shapes, same kernels, same numbers.
        """
        keep = 0
        if reuse and self.last is not None and key == self.key:
            keep = _common_prefix(self.body[self.last], body) // chunk * chunk
        if keep and self.last != row:
            src = self.last
            for t in self.k + self.v:
                t[row, :, :keep].copy_(t[src, :, :keep])
        self.body[row], self.last, self.key = None, None, key
        cache = _buffer_cache(self.hf, [k[row:row + 1] for k in self.k],
                              [v[row:row + 1] for v in self.v], keep)
        prefill(model, body[keep:], cache, chunk=chunk)
        self.body[row], self.last = body, row
        return keep

    def decode_cache(self, rows: int, length: int):
        return _buffer_cache(self.hf, [k[:rows] for k in self.k], [v[:rows] for v in self.v], length)


# ---------------------------------------------------------------------------------------
# Lean decode: one decode step of a Llama-family model, firing the bridge's attention hooks
# ---------------------------------------------------------------------------------------
_LEAN_MODELS = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
_LEAN_LAYERS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer")
_LEAN_ATTENTION = ("LlamaAttention", "MistralAttention", "Qwen2Attention")
_LEAN_MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP")
_LEAN_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm")
_LEAN_BLOCKING_FLAGS = ("use_attn_result", "use_split_qkv_input", "use_attn_in", "gated_q_proj",
                        "rotary_adjacent_pairs", "rotary_interleaved_cos_sin", "qk_norm_after_rope",
                        "use_hook_mlp_in")


def _native(module: torch.nn.Module) -> torch.nn.Module:
    """The HF module a bridge component wraps (the module itself if it is not one)."""
    original = module._modules.get("_original_component") if module is not None else None
    return original if original is not None else module


def _linear(module: torch.nn.Module) -> tuple[Tensor, Tensor | None]:
    lin = _native(module)
    if type(lin) is not torch.nn.Linear:
        raise ConfigError(f"expected nn.Linear, got {type(lin).__name__}")
    return lin.weight, lin.bias


def _row_linear(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    return torch.cat([torch.nn.functional.linear(x[r:r + 1], w, b) for r in range(x.shape[0])])


def _row_matmul(a: Tensor, b: Tensor) -> Tensor:
    return torch.cat([torch.matmul(a[r:r + 1], b[r:r + 1]) for r in range(a.shape[0])])


def _row_apply2(fn: Callable[[Tensor, Tensor], Tensor], a: Tensor, b: Tensor) -> Tensor:
    return torch.cat([fn(a[r:r + 1], b[r:r + 1]) for r in range(a.shape[0])])


def _pad_rows(x: Tensor, rows: int) -> Tensor:
    """``x`` with zero rows appended up to ``rows`` (dimension 0)."""
    if x.shape[0] == rows:
        return x
    return torch.cat((x, x.new_zeros((rows - x.shape[0], *x.shape[1:]))))


def _slab_linear(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """``F.linear`` on blocks of exactly ``_LeanAttention.slab`` rows (``x`` is padded to them)."""
    slab = _LeanAttention.slab
    if x.shape[0] == slab:
        return torch.nn.functional.linear(x, w, b)
    return torch.cat([torch.nn.functional.linear(x[i:i + slab], w, b)
                      for i in range(0, x.shape[0], slab)])


class _FlatHooks:
    """The head edits of rhlens's own hooks (``rhlens_flat``, from :mod:`rhlens.ablation`)
    attached to a per-head hook point (``hook_q``, ``hook_z``), applied straight to the
    ``[batch, 1, head * d_head]`` tensor: the same values the hook point would produce through
    its reshape to ``[batch, 1, head, d_head]`` and back, without the call machinery."""

    def __init__(self, edits: list[Callable[[Tensor, int, int], Tensor]], n_heads: int, d_head: int) -> None:
        self.edits, self.n_heads, self.d_head = edits, n_heads, d_head

    def __call__(self, x: Tensor) -> Tensor:
        for edit in self.edits:
            x = edit(x, self.n_heads, self.d_head)
        return x


def _flat_hooks(point, n_heads: int, d_head: int):
    """``point`` itself, or a :class:`_FlatHooks` when everything on it is an rhlens head edit."""
    if point is None:
        return None
    handles = list(getattr(point, "fwd_hooks", ()))
    edits = [getattr(h.user_hook, "rhlens_flat", None) for h in handles]
    if (not handles or not all(edits) or len(handles) != len(point._forward_hooks)
            or point._forward_pre_hooks or getattr(point, "_forward_hooks_with_kwargs", None)):
        return point
    return _FlatHooks(edits, n_heads, d_head)


class _LeanAttention:
    """The bridge's decode-step attention, computed on the HF module's weights.

    Fires the bridge attention's hook points (``hook_in``, ``q/k/v.hook_in/out`` (=
    ``hook_q/k/v``), ``hook_cos/sin``, ``hook_rot_q/k``, ``hook_attn_scores``,
    ``hook_pattern``, ``o.hook_in/out`` (``hook_z``), ``hook_out``) on the same tensors,
    in the same order, as ``PositionEmbeddingsAttentionBridge.forward``; hook points with
    nothing attached are skipped. Under grouped-query attention the single query of a
    decode step is folded into its KV group (``[kv_head, group, d] @ [kv_head, d, keys]``)
    instead of copying K and V for every query head; the scores are the same dot products.

    The grouped product computes each score from the same numbers as the bridge's per-head
    product; in float32 the two agree to the bit (the tests check it), in bf16/fp16 a
    different kernel may round a score differently in its last bit, which can flip an
    argmax between near-tied keys. ``expand_kv = True`` (class attribute) copies K/V per
    query head as the bridge does, for bit-for-bit agreement at any precision, at the cost
    of that copy (measured in BENCHMARKS.md).
    """

    expand_kv = False
    # How the prompts of a batch share a decode step's weight products (BLAS libraries pick a
    # kernel, and so the rounding of every row, from the product's shape):
    # "slab": every product runs on blocks of exactly `slab` rows, the batch padded with zero
    #   rows and a lone prompt too, so a row's rounding never depends on the batch: each
    #   prompt bit-identical to itself answered alone, one product per block. On a GPU a
    #   product of 16 rows costs what one row costs (benchmarks/batch_invariance.py).
    # "row": products row by row (bit-identical too, one product per row; on a CPU, where a
    #   product costs by the row, the cheaper way).
    # "batch": one product for the whole batch (rows may round differently from alone).
    # None: "slab" on CUDA, "row" elsewhere. In both exact modes the attention products (each
    # row against its own keys) run row by row.
    rows: str | None = None
    slab = 16
    # How the output pattern @ V is computed. "mm": one batched product, as the bridge does
    # (bit-identical to it in float32). Under GQA its [group, keys] @ [keys, d_head] shape (a
    # huge reduction into a tiny output) gets slow cuBLAS kernels on long contexts (1 ms a
    # layer at 32K keys on an H200), so there "split" sums blocks of 1024 keys, one product
    # per block, in float32. "sdpa": the output from SDPA itself, used only while no hook
    # edited the scores or the pattern. None: "split" on CUDA under GQA from
    # split_from keys on, else "mm" (the fastest of the three in BENCHMARKS.md).
    av: str | None = None
    split_from = 16384
    av_block = 1024
    # Under GQA the scores of a KV group's queries, [group, d] @ [d, keys], are a tiny-M
    # product that cuBLAS runs slowly at many key counts (156 us a layer at 32799 keys on an
    # H100, against 36 us for the same dot products as [keys, d] @ [d, group]:
    # benchmarks/decode_scores.py). True: keys first; None: keys first on CUDA.
    keys_first: bool | None = None

    def __init__(self, bridge: torch.nn.Module) -> None:
        native = bridge.original_component
        self.bridge = bridge
        self.groups = int(getattr(native, "num_key_value_groups", 1))
        self.head_dim = int(native.head_dim)
        self.scaling = getattr(native, "scaling", self.head_dim ** -0.5)
        self.layer_idx = getattr(bridge, "_layer_idx", getattr(native, "layer_idx", None))
        self.wq, self.bq = _linear(native.q_proj)
        self.wk, self.bk = _linear(native.k_proj)
        self.wv, self.bv = _linear(native.v_proj)
        self.wo, self.bo = _linear(native.o_proj)

        def hooked(point):
            return point if point is not None and point.has_hooks() else None

        b = bridge
        n_heads = int(native.config.num_attention_heads)
        self.h_in, self.h_out = hooked(b.hook_in), hooked(b.hook_out)
        self.q_in, self.q_out = hooked(b.q.hook_in), _flat_hooks(hooked(b.q.hook_out), n_heads, self.head_dim)
        self.k_in, self.k_out = hooked(b.k.hook_in), hooked(b.k.hook_out)
        self.v_in, self.v_out = hooked(b.v.hook_in), hooked(b.v.hook_out)
        self.o_in = _flat_hooks(hooked(b.o.hook_in), n_heads, self.head_dim)
        self.o_out = hooked(b.o.hook_out)
        self.cos, self.sin = hooked(getattr(b, "hook_cos", None)), hooked(getattr(b, "hook_sin", None))
        self.rot_q = hooked(getattr(b, "hook_rot_q", None))
        self.rot_k = hooked(getattr(b, "hook_rot_k", None))
        self.scores, self.pattern = hooked(b.hook_attn_scores), hooked(b.hook_pattern)

    def _av_mode(self, q: Tensor, n: int) -> str:
        mode = type(self).av
        if mode is None:
            mode = "split" if (q.is_cuda and not self.expand_kv and self.groups > 1
                               and n >= self.split_from) else "mm"
        if mode == "sdpa" and _LeanAttention._sdpa_failed:
            mode = "mm"
        return mode

    def _keys_first(self, q: Tensor) -> bool:
        flag = type(self).keys_first
        return q.is_cuda if flag is None else bool(flag)

    def _use_sdpa(self, q: Tensor, n: int) -> bool:
        return self._av_mode(q, n) == "sdpa"

    def _split_av(self, weights: Tensor, v: Tensor) -> Tensor:
        """``[b, kv, g, n] @ [b, kv, n, d]`` in blocks of keys, partial sums in float32."""
        b, kv, g, n = weights.shape
        c = self.av_block
        m = n // c
        if m < 2:
            return torch.matmul(weights, v)
        main = m * c
        w = weights[..., :main].reshape(b, kv, g, m, c).transpose(2, 3)  # [b, kv, m, g, c]
        parts = torch.matmul(w, v[:, :, :main].reshape(b, kv, m, c, v.shape[-1]))
        out = parts.sum(2, dtype=torch.float32)
        if main < n:
            out += torch.matmul(weights[..., main:], v[:, :, main:])
        return out.to(weights.dtype)

    _sdpa_failed = False

    def _sdpa(self, q: Tensor, k: Tensor, v: Tensor, split: bool) -> Tensor | None:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        F = torch.nn.functional
        gqa = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}
        try:
            # Flash (split-KV decoding) or memory-efficient kernels: cuDNN's re-plans for
            # every new key length, which costs milliseconds of CPU per call.
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
                if split:  # row by row: the kernel's split of the keys depends on the batch
                    return torch.cat([F.scaled_dot_product_attention(
                        q[r:r + 1], k[r:r + 1], v[r:r + 1], scale=self.scaling, **gqa)
                        for r in range(q.shape[0])])
                return F.scaled_dot_product_attention(q, k, v, scale=self.scaling, **gqa)
        except RuntimeError:  # no kernel for this layout: pattern @ V from now on
            _LeanAttention._sdpa_failed = True
            return None

    @classmethod
    def batch_mode(cls, device: torch.device, rows: int) -> str:
        mode = cls.rows or ("slab" if device.type == "cuda" else "row")
        if mode not in ("slab", "row", "batch"):
            raise ConfigError(f"_LeanAttention.rows must be 'slab', 'row', 'batch' or None, got {mode!r}")
        return mode if rows > 1 or mode == "slab" else "batch"

    @staticmethod
    def hook_points(bridge: torch.nn.Module) -> list[torch.nn.Module]:
        names = ("hook_in", "hook_out", "hook_cos", "hook_sin", "hook_rot_q", "hook_rot_k",
                 "hook_attn_scores", "hook_pattern")
        points = [getattr(bridge, n) for n in names if getattr(bridge, n, None) is not None]
        for sub in ("q", "k", "v", "o"):
            points += [getattr(bridge, sub).hook_in, getattr(bridge, sub).hook_out]
        return points

    def forward(self, hidden_states: Tensor, cos: Tensor, sin: Tensor, cache,
                rows: int | None = None) -> Tensor:
        """``[batch, 1, d_model]`` -> the attention output (after ``o_proj``).

        With ``rows`` ("slab" mode) ``hidden_states`` holds ``rows`` prompts padded to whole
        slabs; the hooks and the attention see the ``rows`` real ones, the products all of
        them, and the output is padded like the input.
        """
        from transformers.models.llama.modeling_llama import rotate_half

        F = torch.nn.functional
        padded = hidden_states.shape[0]
        b = padded if rows is None else rows
        x = self.h_in(hidden_states[:b]) if self.h_in else hidden_states
        if rows is not None:
            mode = "slab"
        else:  # called on its own: no padding here
            mode = "row" if type(self).batch_mode(x.device, b) == "row" else "batch"
        # Each row's attention products (over its own keys) run row by row in "row" and "slab"
        # modes: cuBLAS picks their kernels by the number of rows too (scores at 12 of 141 key
        # counts round differently for 1 and 10 rows on an H100, benchmarks/batch_invariance.py).
        split = b > 1 and mode in ("row", "slab")
        if mode == "slab":
            def lin(t: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
                return _slab_linear(_pad_rows(t, padded), w, bias)[:b]
        else:
            lin = _row_linear if split else F.linear
        mm = _row_matmul if split else torch.matmul
        if mode == "slab" and (self.q_in or self.k_in or self.v_in):
            x = x[:b]  # the input hooks see the real rows
        q = lin(self.q_in(x) if self.q_in else x, self.wq, self.bq)
        q = self.q_out(q) if self.q_out else q
        k = lin(self.k_in(x) if self.k_in else x, self.wk, self.bk)
        k = self.k_out(k) if self.k_out else k
        v = lin(self.v_in(x) if self.v_in else x, self.wv, self.bv)
        v = self.v_out(v) if self.v_out else v
        q = q.view(b, 1, -1, self.head_dim).transpose(1, 2)
        k = k.view(b, 1, -1, self.head_dim).transpose(1, 2)
        v = v.view(b, 1, -1, self.head_dim).transpose(1, 2)
        if self.cos:
            cos = self.cos(cos)
        if self.sin:
            sin = self.sin(sin)
        # HF's apply_rotary_pos_emb, elementwise, on q and k at once (same ops per element).
        h = q.shape[1]
        qk = torch.cat((q, k), dim=1)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        qk = (qk * cos) + (rotate_half(qk) * sin)
        q, k = qk[:, :h], qk[:, h:]
        if self.rot_q:
            q = self.rot_q(q)
        if self.rot_k:
            k = self.rot_k(k)
        k, v = cache.update(k, v, self.layer_idx)
        n = k.shape[-2]
        g = self.groups
        if g > 1 and self.expand_kv:
            from transformers.models.llama.modeling_llama import repeat_kv

            k, v, g = repeat_kv(k, g), repeat_kv(v, g), 1
        if not (self.scores or self.pattern) and self._use_sdpa(q, n):
            out = self._sdpa(q, k, v, split)  # nobody looks at the pattern: skip it
            if out is not None:
                return self._output(out, b, lin, padded if mode == "slab" else None)
        if g > 1:
            qg = q.reshape(b, h // g, g, self.head_dim)
            if self._keys_first(q):  # the same dot products as [keys, d] @ [d, group]
                scores = mm(k, qg.transpose(-2, -1)).transpose(-2, -1)
            else:
                scores = mm(qg, k.transpose(-2, -1))
            scores = scores.reshape(b, h, 1, n) * self.scaling
        else:
            scores = mm(q, k.transpose(-2, -1)) * self.scaling
        changed = False
        if self.scores:
            version = scores._version
            hooked = self.scores(scores)
            changed = hooked is not scores or scores._version != version
            scores = hooked
        weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        if self.pattern:
            version = weights._version
            hooked = self.pattern(weights)
            changed = changed or hooked is not weights or weights._version != version
            weights = hooked
        out = None
        if not changed and self._use_sdpa(q, n):
            out = self._sdpa(q, k, v, split)
        if out is None:  # grouped heads share their K/V: one product per group, no repeat_kv
            av = self._split_av if self._av_mode(q, n) == "split" else torch.matmul
            # The blocked product stays batched in "slab" mode: on an H100 it rounded each row
            # as alone at all 141 key counts tried (1K-33K), where the scores product did not.
            if split and not (mode == "slab" and av == self._split_av):
                av = functools.partial(_row_apply2, av)
            out = av(weights.reshape(b, h // g, g, n), v).reshape(b, h, 1, -1) if g > 1 \
                else av(weights, v)
        return self._output(out, b, lin, padded if mode == "slab" else None)

    def _output(self, out: Tensor, b: int, lin, padded: int | None) -> Tensor:
        """``[batch, head, 1, d_head]`` -> ``hook_z`` -> ``o_proj`` -> ``hook_out``.

        ``lin``: the step's weight product; ``padded``: "slab" mode, the output padded to that
        many rows (see :meth:`forward`).
        """
        out = out.transpose(1, 2).contiguous().reshape(b, 1, -1)
        if self.wo.dtype.is_floating_point and out.dtype != self.wo.dtype:
            out = out.to(dtype=self.wo.dtype)
        out = self.o_in(out) if self.o_in else out
        if padded is not None:
            out = _slab_linear(_pad_rows(out, padded), self.wo, self.bo)
            if not (self.o_out or self.h_out):
                return out
            out = out[:b]
        else:
            out = lin(out, self.wo, self.bo)
        if self.o_out:
            out = self.o_out(out)
        if self.h_out:
            out = self.h_out(out)
        return out if padded is None else _pad_rows(out, padded)


class _LeanDecoder:
    """One greedy decode step of a Llama-family model, as HF computes it, minus the calls.

    HF's decode step is bound by Python: every ``nn.Module`` call, decorator and keyword
    dispatch costs microseconds, ~20 ms a token for a 32-layer model on a GPU host, which is
    far more than the GPU needs. This step runs the same tensor operations on the same
    modules' weights (RMSNorm's and the rotary embedding's own ``forward``; ``F.linear`` for
    ``nn.Linear``; the MLP's ``down(act(gate(x)) * up(x))``; residual adds as in the decoder
    layer) with the attention of :class:`_LeanAttention`, so every attention hook fires.
    """

    def __init__(self, model) -> None:
        hf = hf_model(model)
        inner = hf.model
        self.embed = _native(inner.embed_tokens)
        self.rotary = _native(inner.rotary_emb)
        self.norm = _native(inner.norm)
        self.lm_w, self.lm_b = _linear(hf.lm_head)
        self.layers = []
        for block in model.blocks:
            layer = block.original_component
            mlp = _native(layer.mlp)
            self.layers.append((_native(layer.input_layernorm).forward, _LeanAttention(block.attn),
                                _native(layer.post_attention_layernorm).forward,
                                _linear(mlp.gate_proj), _linear(mlp.up_proj), _linear(mlp.down_proj),
                                _native(mlp.act_fn).forward))

    @staticmethod
    def eligible(model) -> bool:
        hf = hf_model(model)
        inner = getattr(hf, "model", None)
        if type(hf).__name__ not in _LEAN_MODELS or inner is None:
            return False
        if getattr(hf.config, "final_logit_softcapping", None) or type(_native(inner.embed_tokens)) \
                is not torch.nn.Embedding:
            return False
        if type(_native(inner.norm)).__name__ not in _LEAN_NORMS:
            return False
        for block in model.blocks:
            layer = block.original_component
            if (type(layer).__name__ not in _LEAN_LAYERS
                    or type(_native(layer.mlp)).__name__ not in _LEAN_MLPS
                    or type(_native(layer.input_layernorm)).__name__ not in _LEAN_NORMS
                    or type(_native(layer.post_attention_layernorm)).__name__ not in _LEAN_NORMS):
                return False
        return len(model.blocks) == int(hf.config.num_hidden_layers)

    def __call__(self, input_ids: Tensor, cache, position: int) -> Tensor:
        B = input_ids.shape[0]
        mode = _LeanAttention.batch_mode(input_ids.device, B)
        h = self.embed.forward(input_ids)  # [B, 1, d_model]
        pos = torch.full((1, 1), position, dtype=torch.long, device=input_ids.device)
        cos, sin = self.rotary(h, pos)
        rows = None
        if mode == "slab":  # the residual stream padded to whole slabs; zero rows stay finite
            lin, rows = _slab_linear, B
            h = _pad_rows(h, -(-B // _LeanAttention.slab) * _LeanAttention.slab)
        else:
            lin = _row_linear if mode == "row" else torch.nn.functional.linear
        for ln1, attn, ln2, (gw, gb), (uw, ub), (dw, db), act in self.layers:
            h = h + attn.forward(ln1(h), cos, sin, cache, rows=rows)
            x = ln2(h)
            h = h + lin(act(lin(x, gw, gb)) * lin(x, uw, ub), dw, db)
        return lin(self.norm.forward(h), self.lm_w, self.lm_b)[:B]


def _is_output_capture(fn) -> bool:
    """transformers' output-recording hooks: inert unless outputs are requested."""
    return getattr(fn, "__qualname__", "").endswith("output_capturing_hook")


def _has_hooks(module: torch.nn.Module, allowed: set[int] = frozenset()) -> bool:
    """Whether ``module`` has PyTorch hooks other than the handles ``allowed``."""
    return bool(any(not _is_output_capture(f) for f in module._forward_hooks.values())
                or module._backward_hooks or getattr(module, "_backward_pre_hooks", None)
                or any(k not in allowed for k in module._forward_pre_hooks))


def _lean_ok(model) -> bool:
    """Whether the lean decode step is exact here (else the step runs through the bridge).

    False when the architecture is not a plain Llama-family model the lean step reproduces,
    or when a hook is attached anywhere but the attention hook points it fires (residual,
    MLP, norm hooks need the bridge's own forward).
    """
    from transformer_lens.hook_points import HookPoint
    from transformer_lens.model_bridge.generalized_components.position_embeddings_attention import (
        PositionEmbeddingsAttentionBridge,
    )

    cfg = model.cfg
    if any(bool(getattr(cfg, f, False)) for f in _LEAN_BLOCKING_FLAGS):
        return False
    if not _LeanDecoder.eligible(model):
        return False
    fired: set[int] = set()
    # BlockBridge's own pre-hooks on ln1/ln2: they keep the pre-LN residual for the split-qkv
    # inputs and fire hook_mlp_in, both off here (flags above; hooked points are checked below).
    internal = {h.id for block in model.blocks for h in getattr(block, "_capture_hook_handles", ())}
    for block in model.blocks:
        b = block.attn
        native = b.original_component
        if (type(b) is not PositionEmbeddingsAttentionBridge or b.training
                or getattr(b, "compatibility_mode", False)
                or type(native).__name__ not in _LEAN_ATTENTION
                or any(s in b.submodules for s in ("q_norm", "k_norm", "gate"))
                or getattr(native, "sliding_window", None) is not None
                or getattr(native, "attn_logit_softcapping", None) is not None
                or getattr(native, "sinks", None) is not None
                or getattr(native, "key_multiplier", None) is not None
                or hasattr(native, "_hf_hook")):
            return False
        rope = getattr(getattr(native, "config", None), "rope_parameters", None)
        if isinstance(rope, dict) and rope.get("llama_4_scaling_beta") is not None:
            return False
        if float(getattr(native.config, "partial_rotary_factor", 1.0) or 1.0) != 1.0:
            return False
        fired.update(id(p) for p in _LeanAttention.hook_points(b))
    for module in model.modules():
        if isinstance(module, HookPoint):
            if id(module) not in fired and module.has_hooks():
                return False
        elif _has_hooks(module, internal):
            return False
    return True


def _decode_step(model, lean: bool) -> Callable[[Tensor, Any, int], Tensor]:
    """``step(input_ids [batch, 1], cache, position) -> logits [batch, 1, vocab]``."""
    if lean and _lean_ok(model):
        return _LeanDecoder(model)
    hf = hf_model(model)

    def step(input_ids: Tensor, cache, position: int) -> Tensor:
        return hf(input_ids=input_ids, past_key_values=cache, use_cache=True).logits

    return step


# ---------------------------------------------------------------------------------------
# Greedy decoding
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GenerationConfig:
    """How the engine answers.

    Attributes:
        max_new_tokens: decode steps at most (the paper: 50).
        stop_at_newline: stop at the first generated token containing a newline.
        stop_at_eos: stop at the tokenizer's end-of-sequence token(s).
        prefill_chunk: prefill this many tokens at a time (``None``:
            :data:`DEFAULT_PREFILL_CHUNK`, 32768). Bounds activation memory on long prompts;
            a reused prefix is cut back to a multiple of it, so that reuse changes no result.
        reuse_prefix: in :func:`generate_many`, keep the KV cache of the tokens a prompt
            shares with the previous one instead of prefilling them again.
        batch_size: in :func:`generate_many`, answer up to this many consecutive prompts of
            equal length together (one forward per decode step for all of them). On a GPU
            fewer are batched when their KV caches would not fit. Hooks then see a batch
            dimension of that size. ``1``: one prompt at a time.
        lean_decode: decode through the HF modules plus a lean copy of the bridge's
            attention when only attention hooks are attached (same hooks, same tensors);
            ``False`` always decodes through the bridge.
    """

    max_new_tokens: int = 50
    stop_at_newline: bool = True
    stop_at_eos: bool = True
    prefill_chunk: int | None = None
    reuse_prefix: bool = True
    batch_size: int = 1
    lean_decode: bool = True

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.prefill_chunk is not None and self.prefill_chunk < 1:
            raise ConfigError("prefill_chunk must be a positive number of tokens or None")

    @property
    def chunk(self) -> int:
        return self.prefill_chunk or DEFAULT_PREFILL_CHUNK
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass
class Generation:
    """A greedy answer to one prompt.

    ``response_ids`` holds every generated token, the stopping token included (its step was
    observed like the others); ``response`` is the text without the stopping token.
    ``info["batch_row"]`` is the prompt's row in the batch it was decoded with.
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
    """What decode-time hooks may read: the step index and how many tokens were seen.

    ``rows`` is the number of prompts decoded together (the hooks' batch dimension).
    """

    def __init__(self) -> None:
        self.step = -1  # index of the running decode step
        self.n_seen = 0  # tokens in the sequence including the one being fed now
        self.rows = 1

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


def _crop(cache, keep: int) -> None:
    """Cut ``cache`` back to its first ``keep`` tokens."""
    # Sliding-window layers keep only the last window of keys: cutting into a dropped part
    # would silently lose context, so those caches are never reused.
    if any(getattr(layer, "is_sliding", False) for layer in getattr(cache, "layers", ())):
        raise NotImplementedError("sliding-window cache")
    drop = cache.get_seq_length() - keep
    if drop > 0:
        cache.crop(-drop)  # transformers 5: a negative value removes that many tokens


class _Runner:
    """Prefills and decodes batches of equal-length prompts for :func:`generate_many`."""

    def __init__(self, model, tokenizer, config: GenerationConfig, state: StepState) -> None:
        self.model, self.tokenizer, self.config, self.state = model, tokenizer, config, state
        self.hf = hf_model(model)
        self.device = next(self.hf.parameters()).device
        n_layers = _plain_cache_layers(self.hf)
        self.pool = _KVPool(self.hf, n_layers) if n_layers else None
        self.eos = _eos_ids(tokenizer) if config.stop_at_eos else set()
        self._newline: dict[int, bool] = {}

    def max_rows(self, n_tokens: int) -> int:
        if self.pool is None:
            return 1
        cap = n_tokens - 1 + self.config.max_new_tokens
        return self.pool.fit_rows(self.config.batch_size, cap, self.config.chunk)

    def _has_newline(self, tok: int) -> bool:
        hit = self._newline.get(tok)
        if hit is None:
            hit = self._newline[tok] = "\n" in self.tokenizer.decode([tok])
        return hit

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
        if self.pool is None:  # sliding-window caches: a fresh cache, one prompt at a time
            if rows != 1:
                raise RuntimeError("rhlens: batching needs a plain KV cache (engine bug)")
            cache = _new_cache(self.hf)
            prefill(self.model, bodies[0], cache, chunk=config.chunk)
            kept = [0]
        else:
            self.pool.ensure(rows, n - 1 + config.max_new_tokens, bodies[0], items[0][2],
                             config.reuse_prefix, config.chunk)
            kept = [self.pool.fill(self.model, r, bodies[r], items[r][2], config.reuse_prefix,
                                   config.chunk) for r in range(rows)]
            cache = self.pool.decode_cache(rows, n - 1)
        outs = self._decode(cache, [ids[-1] for _, ids, _ in items], n)
        gens = []
        for r, ((_, ids, _), (out, stop)) in enumerate(zip(items, outs)):
            text_ids = out[:-1] if stop != "length" else out
            response = self.tokenizer.decode(text_ids, skip_special_tokens=True).strip()
            gens.append(Generation(prompt_ids=ids, response_ids=out, response=response,
                                   stop_reason=stop, reused_prefix=kept[r],
                                   info={"batch_row": r, "batch_size": rows}))
        return gens

    def _decode(self, cache, last: list[int], n_prompt: int) -> list[tuple[list[int], str]]:
        config, state = self.config, self.state
        rows = len(last)
        inp = torch.tensor([[t] for t in last], dtype=torch.long, device=self.device)
        outs: list[list[int]] = [[] for _ in range(rows)]
        stops: list[str | None] = [None] * rows
        state.rows = rows
        forward = _decode_step(self.model, config.lean_decode)
        with phase("decode"):
            for step in range(config.max_new_tokens):
                state.step = step
                state.n_seen = n_prompt + step
                logits = forward(inp, cache, n_prompt - 1 + step)
                nxt = logits[:, -1].argmax(-1)
                toks = nxt.tolist()  # the one host sync per step: needed to decide whether to stop
                for r, tok in enumerate(toks):
                    if stops[r] is not None:
                        continue
                    outs[r].append(tok)
                    if tok in self.eos:
                        stops[r] = "eos"
                    elif config.stop_at_newline and self._has_newline(tok):
                        stops[r] = "newline"
                if all(s is not None for s in stops):
                    break
                inp = nxt.view(rows, 1)
        return [(o, s or "length") for o, s in zip(outs, stops)]


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
    runner = _Runner(model, tokenizer, config, state)
    hook_list = list(hooks)

    def run(items, extra: Sequence[HookPair] = ()) -> list[Generation]:
        # Hooks are attached while the model runs and removed before anything is yielded:
        # a caller that stops iterating early (zip, next) leaves nothing attached.
        pairs = [*hook_list, *extra]
        with model.hooks(fwd_hooks=pairs) if pairs else contextlib.nullcontext():
            return runner.run(items, on_start)

    batch: list[tuple[int, tuple[int, ...], Hashable]] = []
    limit = 1
    for i, prompt in enumerate(prompts):
        ids = _as_ids(prompt)
        key = prefill_keys[i] if prefill_keys is not None else None
        if item_hooks is not None:
            yield from run([(i, ids, key)], list(item_hooks(i)))
            continue
        if batch and (len(ids) != len(batch[0][1]) or key != batch[0][2]):
            yield from run(batch)
            batch = []
        if not batch:
            limit = runner.max_rows(len(ids)) if config.batch_size > 1 else 1
        batch.append((i, ids, key))
        if len(batch) >= limit:
            yield from run(batch)
            batch = []
    if batch:
        yield from run(batch)


def _as_ids(prompt: Sequence[int] | Int[Tensor, " seq"]) -> tuple[int, ...]:
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
