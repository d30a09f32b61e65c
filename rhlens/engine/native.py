"""Prefill: reading a prompt into the KV cache through HF's own SDPA attention, or the plain HF modules.

TransformerBridge computes attention as matmul + softmax so that ``hook_pattern`` can fire:
over a prompt of n tokens that is an n x n pattern per head. The engine prefills without it:

* :func:`native_attention` swaps each block's HF attention module in for the bridge's, so the
  bridge's linear hooks (``hook_q/k/v/z``: masks with ``phase="all"``) still fire, and
  ``hook_pattern`` does not;
* with no hook that acts during the prefill attached (only :class:`EngineHook` s with
  ``phase="decode"``, :func:`prefill_is_silent`), every bridge component is swapped for the HF
  module it wraps (:func:`native_modules`): the same operations on the same weights without
  the wrappers (15% of an 8K-token Llama-3-8B prefill on an H100).

A chunk that follows cached keys (chunked prefill, a reused prefix) never gets a dense
``[chunk, keys]`` mask (:func:`_rhlens_sdpa`), so nothing quadratic in the context is
allocated; ``KernelPolicy.prefill_attn`` says how it is computed: SDPA with a lower-right
causal bias (PyTorch sends it to its flash-attention-2 kernel, K/V copied per query head),
that kernel called on the grouped K/V, or (``"split"``) as one SDPA call over the cached keys
(no mask) and one over the chunk itself (causal, square: the kernels a one-pass prefill
runs), merged by their log-sum-exp (:func:`attention_lse`, :func:`merge_attention`).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

from rhlens.engine.bridge import attention_slots, hf_model, native_modules, set_attn_impl
from rhlens.engine.hooks import engine_hooks, has_torch_hooks, internal_handles, phase

__all__ = ["DEFAULT_PREFILL_CHUNK", "GPU_PREFILL_CHUNK", "attention_lse", "default_prefill_chunk",
           "merge_attention", "native_attention", "prefill", "prefill_is_silent"]

# Prompts are prefilled in chunks of this many tokens, counted from the prompt's start, and a
# reused prefix is cut back to a chunk boundary: a probe that reuses another's prefix then runs
# exactly the chunks (same shapes, same kernels, same rounding) it runs alone. Smaller chunks let
# a grid reuse more of its haystacks; what a chunk after cached keys costs decides how small.
# Through SDPA's lower-right causal bias (PyTorch's flash-attention-2 kernel) it runs at about
# half the rate of one causal pass (an H100: 5.9 ms for the last 4096 of 32768 tokens of one
# Llama-3-8B layer; an H200, 2026-11-29: 320-350 TFLOP/s against 580-690 for the one pass,
# benchmarks/bench_speed.py --sections prefill): there, 32768-token chunks, prompts up to 32K in
# one pass as HF generate does. Split into the chunk against the cached keys plus the chunk
# against itself (KernelPolicy.prefill_attn="split", the GPU's default), a chunk costs what the
# same rows cost in one pass (580-610 TFLOP/s; a 2-layer 131K prefill in 8192-token chunks
# 1.02x one pass, 32K in 8192-token chunks 1.08x): on a GPU, 16384-token chunks.
DEFAULT_PREFILL_CHUNK = 32768
GPU_PREFILL_CHUNK = 16384


def default_prefill_chunk(device: torch.device | str) -> int:
    """The prefill chunk of a run on ``device`` when none is set (see above)."""
    return GPU_PREFILL_CHUNK if torch.device(device).type == "cuda" else DEFAULT_PREFILL_CHUNK

# A chunk of queries that follows cached keys needs a causal mask aligned to the lower right
# (query i sees keys 0..offset+i). HF builds it densely ([batch, 1, chunk, keys]: quadratic
# in the context for a long chunk) and then cannot use the flash kernel. Registered under
# this name, the engine's prefill gets no mask from HF when nothing is padded, and SDPA gets
# a lower-right causal bias object that the flash / memory-efficient kernels apply on the fly.
_IMPL = "rhlens_sdpa"


# How a chunk after cached keys computes its attention (KernelPolicy.prefill_attn), set by
# prefill() for the chunks it runs.
_CHUNK_ATTN: contextvars.ContextVar[str] = contextvars.ContextVar("rhlens_chunk_attn", default="lower_right")


def _expand(x: Tensor, heads: int) -> Tensor:
    """K or V ``[b, kv, n, d]`` copied for each of ``heads`` query heads (a no-op without GQA)."""
    groups = heads // x.shape[1]
    if groups == 1:
        return x
    from transformers.models.llama.modeling_llama import repeat_kv

    return repeat_kv(x, groups)


def attention_lse(query: Tensor, key: Tensor, value: Tensor, causal: bool, scale: float | None,
                  backend: str = "auto") -> tuple[Tensor, Tensor]:
    """``(softmax(q k^T * scale) v [b, h, q, d], its log-sum-exp [b, h, q] float32)`` from one of
    PyTorch's fused kernels (``causal``: aligned to the upper left, so call it on square
    problems). ``backend``: ``"cudnn"``, ``"flash"``, ``"efficient"`` or ``"auto"`` (the first
    of them that takes the inputs; on the CPU, PyTorch's CPU flash kernel). K/V with fewer heads
    than q (GQA) are expanded where the kernel needs it."""
    b, heads, q_len, d = query.shape
    groups = heads // key.shape[1]
    if not causal and groups > 1:
        # Grouped-query attention without a causal mask: each K/V head's query heads folded
        # into one longer run of queries ([b, kv, groups * q, d]) instead of K/V copied for
        # every query head. Each query row's softmax is its own, so the rows are the same; at a
        # million cached keys the copy would be 15 GiB (a Qwen2.5-7B-1M layer's K and V).
        folded = query.reshape(b, key.shape[1], groups * q_len, d)
        out, lse = attention_lse(folded, key, value, False, scale, backend)
        return out.reshape(b, heads, q_len, d), lse.reshape(b, heads, q_len)
    ops = torch.ops.aten
    if query.device.type != "cuda":
        key, value = _expand(key, query.shape[1]), _expand(value, query.shape[1])
        out, lse = ops._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, causal,
                                                                   scale=scale)[:2]
        return out, lse
    order = ("cudnn", "flash", "efficient") if backend == "auto" else (backend,)
    for name in order:
        try:
            if name == "flash":  # flash-attention 2 takes grouped K/V as they are
                out, lse = ops._scaled_dot_product_flash_attention(query, key, value, 0.0, causal, False,
                                                                   scale=scale)[:2]
            elif name == "cudnn":
                k, v = _expand(key, query.shape[1]), _expand(value, query.shape[1])
                out, lse = ops._scaled_dot_product_cudnn_attention(query, k, v, None, True, 0.0, causal,
                                                                   False, scale=scale)[:2]
            else:
                k, v = _expand(key, query.shape[1]), _expand(value, query.shape[1])
                out, lse = ops._scaled_dot_product_efficient_attention(query, k, v, None, True, 0.0,
                                                                       causal, scale=scale)[:2]
        except (RuntimeError, NotImplementedError, TypeError):
            if name == order[-1]:
                raise
            continue
        return out, lse.reshape(lse.shape[0], lse.shape[1], -1)[..., :query.shape[2]].float()
    raise RuntimeError("no fused attention kernel")  # pragma: no cover


def merge_attention(a: tuple[Tensor, Tensor], b: tuple[Tensor, Tensor]) -> Tensor:
    """The attention over the union of two disjoint key sets from each set's ``(output,
    log-sum-exp)``: the outputs weighted by their shares of the total softmax mass."""
    (out_a, lse_a), (out_b, lse_b) = a, b
    share_a = torch.sigmoid(lse_a - lse_b).unsqueeze(-1)  # = e^lse_a / (e^lse_a + e^lse_b)
    return torch.lerp(out_b.float(), out_a.float(), share_a).to(out_a.dtype)


def _chunk_attention(query: Tensor, key: Tensor, value: Tensor, scale: float | None, mode: str) -> Tensor:
    """Attention of ``q_len`` queries that follow ``kv_len - q_len`` cached keys (query ``i``
    sees keys ``<= kv_len - q_len + i``), ``[b, h, q, d]``, computed as ``mode`` says."""
    q_len, kv_len = query.shape[2], key.shape[2]
    if mode == "split":
        try:
            cached = kv_len - q_len
            return merge_attention(
                attention_lse(query, key[:, :, :cached], value[:, :, :cached], False, scale),
                attention_lse(query, key[:, :, cached:], value[:, :, cached:], True, scale))
        except (RuntimeError, NotImplementedError, TypeError):
            pass  # no fused kernel with a log-sum-exp here: the lower-right bias below
    elif mode == "flash_gqa" and query.device.type == "cuda":
        try:  # flash-attention 2 aligns a causal mask to the lower right when q_len != kv_len
            return torch.ops.aten._scaled_dot_product_flash_attention(
                query, key, value, 0.0, True, False, scale=scale)[0]
        except (RuntimeError, NotImplementedError, TypeError):
            pass
    from torch.nn.attention.bias import causal_lower_right

    # The lower-right causal flash kernel takes equal head counts: K/V are expanded for this
    # call (a transient copy of one layer, linear in the context).
    heads = query.shape[1]
    return torch.nn.functional.scaled_dot_product_attention(
        query, _expand(key, heads), _expand(value, heads), attn_mask=causal_lower_right(q_len, kv_len),
        scale=scale)


# Queries per block of the softcapped attention below: its scores are [b, h, block, keys].
_SOFTCAP_BLOCK = 512


def softcap_attention(query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                      scaling: float | None, softcap: float,
                      sliding_window: int | None = None) -> Tensor:
    """Attention with Gemma-2's logit softcap (``tanh(s / cap) * cap`` before the mask), which
    no fused SDPA kernel computes: ``[b, h, q, d]``, in blocks of queries so that nothing
    quadratic in the prompt is held. ``attention_mask``: HF's SDPA mask (bool, True where a
    key is seen, or additive floats); ``None``: causal, aligned to the lower right (query
    ``i`` sees keys ``<= kv_len - q_len + i``; within ``sliding_window`` keys when given)."""
    heads, q_len, kv_len = query.shape[1], query.shape[2], key.shape[2]
    key, value = _expand(key, heads), _expand(value, heads)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    offset = kv_len - q_len
    keys = torch.arange(kv_len, device=query.device)
    outs = []
    for s in range(0, q_len, _SOFTCAP_BLOCK):
        q = query[:, :, s:s + _SOFTCAP_BLOCK]
        scores = torch.matmul(q, key.transpose(2, 3)) * scale
        scores = torch.tanh(scores / softcap) * softcap
        if attention_mask is not None:
            mask = attention_mask[..., s:s + q.shape[2], :]
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        else:
            rows = torch.arange(s, s + q.shape[2], device=query.device).unsqueeze(1) + offset
            hide = keys > rows
            if sliding_window is not None:
                hide |= keys <= rows - sliding_window
            scores = scores.masked_fill(hide, float("-inf"))
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        outs.append(torch.matmul(weights, value))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def _rhlens_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                 is_causal=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q_len, kv_len = query.shape[2], key.shape[2]
    softcap = kwargs.get("softcap")
    if softcap is not None:  # Gemma-2: no SDPA kernel takes a softcap
        out = softcap_attention(query, key, value, attention_mask, scaling, float(softcap),
                                kwargs.get("sliding_window"))
        return out.transpose(1, 2).contiguous(), None
    if (attention_mask is not None or q_len == 1 or q_len == kv_len or kv_len < q_len
            or (dropout and module.training)):
        # The cases HF's SDPA handles without a dense causal mask: no cached keys (is_causal),
        # a single query, or a mask that the caller really needs (padding, sliding window).
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    out = _chunk_attention(query, key, value, scaling, _CHUNK_ATTN.get())
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
    slots = attention_slots(model)
    old_impl = hf.config._attn_implementation
    bridged = [getattr(layer, name) for layer, name, _ in slots]
    try:
        for layer, name, module in slots:
            layer._modules[name] = module
        set_attn_impl(hf, impl)
        yield
    finally:
        for (layer, name, _), module in zip(slots, bridged):
            layer._modules[name] = module
        set_attn_impl(hf, old_impl)


def prefill_is_silent(model) -> bool:
    """Whether no hook attached to ``model`` would act while a prompt is prefilled.

    True when every TransformerLens hook is an :class:`EngineHook` with ``phase="decode"``
    (the retrieval recorder, decode-only head masks, a user's decode-time hook) and no other
    PyTorch hook is attached: the prefill then runs the plain HF modules.
    """
    from transformer_lens.hook_points import HookPoint

    internal = internal_handles(model)
    for module in model.modules():
        if isinstance(module, HookPoint):
            if (not module._forward_hooks and not module._forward_pre_hooks
                    and not getattr(module, "bwd_hooks", None)):
                continue
            hooks = engine_hooks(module)
            if hooks is None or not all(h.inert_in_prefill for h in hooks):
                return False
        elif has_torch_hooks(module, internal):
            return False
    return True


@torch.no_grad()
def prefill(model, ids: Sequence[int], cache, *, chunk: int | None = None,
            attn: str = "lower_right", on_chunk: Callable[[int], None] | None = None) -> None:
    """Append ``ids`` to ``cache`` through native attention, in chunks of ``chunk`` tokens.

    With no hook that acts during the prefill attached (:func:`prefill_is_silent`), every
    bridge component is swapped for the HF module it wraps; otherwise only the attention
    modules are, and the bridge's other hooks fire. ``attn``: how a chunk after cached keys
    computes its attention (``KernelPolicy.prefill_attn``). ``on_chunk(tokens)``: called
    after each chunk (a progress bar: a million-token prefill takes minutes).
    """
    if not ids:
        return
    hf = hf_model(model)
    device = next(hf.parameters()).device
    x = torch.tensor([list(ids)], dtype=torch.long, device=device)  # [1, seq]
    step = chunk or x.shape[1]
    swap = native_modules(model, _register_impl()) if prefill_is_silent(model) else native_attention(model)
    token = _CHUNK_ATTN.set(attn)
    try:
        _prefill_chunks(hf, x, cache, step, swap, on_chunk)
    finally:
        _CHUNK_ATTN.reset(token)


def _prefill_chunks(hf, x: Tensor, cache, step: int, swap, on_chunk=None) -> None:
    with phase("prefill"), swap:
        for s in range(0, x.shape[1], step):
            # logits_to_keep=1: a [T, vocab] logits matrix would dwarf the KV cache.
            hf(input_ids=x[:, s:s + step], past_key_values=cache, use_cache=True,
               logits_to_keep=1)
            if on_chunk is not None:
                on_chunk(min(step, x.shape[1] - s))
