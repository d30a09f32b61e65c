"""A packed KV cache for Llama-family models: streaming heads really hold only sink + window keys.

After the prompt is read (one prefill pass, full attention, as the mask policy does), each
layer keeps two groups of KV heads:

* the heads kept whole: ``[batch, n_full, capacity, d]`` buffers, one position written a step;
* the streaming heads: ``[batch, n_stream, sink + window, d]``, the first ``sink`` slots for the
  sink tokens and a ring of ``window`` slots for the most recent ones (position ``p >= sink``
  lives in slot ``sink + (p - sink) % window``).

The prefill stores only what the policy keeps: the attention of the prefill pass reads the
prompt's keys as they are computed, layer by layer, so the full cache of the streaming heads
never exists (peak memory is the packed cache plus one layer's keys). A decode step
(:class:`PackedAttention`, in the engine's lean step :class:`~rhlens.engine.lean.LeanDecoder`)
computes q/k/v for every head, writes the new key into its group, and attends each group over
its own keys as the engine computes a decode step's attention (:func:`group_attention`:
grouped score products, a float32 softmax, pattern @ V in blocks of keys on long contexts).
Softmax does not depend on the order of the keys, so the ring needs no reordering. The packed
cache fires no TransformerLens hooks: it is for measuring memory and time (and it answers
as the mask policy does: the tests check the tokens in float32).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from rhlens.compress.policy import CacheLayout, HeadPolicy
from rhlens.engine import GenerationConfig, StepState, hf_model, prefill
from rhlens.engine.attention import LeanAttention, grouped_scores, split_av
from rhlens.engine.bridge import new_cache
from rhlens.engine.lean import LeanDecoder
from rhlens.engine.policy import KernelPolicy
from rhlens.engine.runner import Generation, _as_ids, _Runner
from rhlens.errors import ConfigError

__all__ = ["PackedAttention", "group_attention", "packed_cache", "packed_generate"]


@functools.cache
def _packed_layer_class():
    from transformers.cache_utils import DynamicLayer

    class PackedLayer(DynamicLayer):
        """One layer of the packed cache (see the module's docstring)."""

        is_sliding = False
        is_croppable = False

        def __init__(self, full: Sequence[int], stream: Sequence[int], sink: int, window: int,
                     reserve: int) -> None:
            super().__init__()
            self.full, self.stream = list(full), list(stream)
            self.sink, self.window, self.reserve = sink, window, reserve
            self.n = 0  # tokens seen
            self.kf = self.vf = self.ks = self.vs = None

        def lazy_initialization(self, key_states, value_states=None) -> None:
            self.dtype, self.device = key_states.dtype, key_states.device
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            """The prefill: keep what the policy keeps, give the attention every key."""
            if self.n:
                raise ConfigError("the packed cache reads a prompt in one prefill pass "
                                  "(no chunked prefill, no reused prefix)")
            self.lazy_initialization(key_states)
            b, _, t, d = key_states.shape
            full = torch.tensor(self.full, dtype=torch.long, device=key_states.device)
            stream = torch.tensor(self.stream, dtype=torch.long, device=key_states.device)
            self.full_index, self.stream_index = full, stream
            self.kf = key_states.new_empty((b, len(self.full), t + self.reserve, d))
            self.vf = value_states.new_empty((b, len(self.full), t + self.reserve, value_states.shape[-1]))
            self.kf[:, :, :t] = key_states.index_select(1, full)
            self.vf[:, :, :t] = value_states.index_select(1, full)
            held = self.sink + self.window
            self.ks = key_states.new_zeros((b, len(self.stream), held, d))
            self.vs = value_states.new_zeros((b, len(self.stream), held, value_states.shape[-1]))
            if self.stream:
                keep = [*range(min(t, self.sink)), *range(max(self.sink, t - self.window), t)]
                slots = torch.tensor([self.slot(p) for p in keep], device=key_states.device)
                pos = torch.tensor(keep, dtype=torch.long, device=key_states.device)
                # the kept positions first (a few hundred), then the streaming heads
                self.ks[:, :, slots] = key_states.index_select(2, pos).index_select(1, stream)
                self.vs[:, :, slots] = value_states.index_select(2, pos).index_select(1, stream)
            self.n = t
            return key_states, value_states

        def slot(self, p: int) -> int:
            return p if p < self.sink else self.sink + (p - self.sink) % self.window

        def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
            """A decode step's key/value ``[b, kv, 1, d]`` written; the keys/values each group
            attends over: ``[b, n_full, n, d]`` twice, ``[b, n_stream, min(n, held), d]`` twice."""
            p = self.n
            if p >= self.kf.shape[2]:
                raise ConfigError(f"the packed cache holds {self.kf.shape[2]} positions; make it "
                                  "with a larger reserve")
            if self.full:
                self.kf[:, :, p] = k[:, self.full_index, 0] if self.stream else k[:, :, 0]
                self.vf[:, :, p] = v[:, self.full_index, 0] if self.stream else v[:, :, 0]
            if self.stream:
                s = self.slot(p)
                self.ks[:, :, s] = k[:, self.stream_index, 0] if self.full else k[:, :, 0]
                self.vs[:, :, s] = v[:, self.stream_index, 0] if self.full else v[:, :, 0]
            self.n = p + 1
            m = min(self.n, self.sink + self.window)
            return (self.kf[:, :, :self.n], self.vf[:, :, :self.n], self.ks[:, :, :m], self.vs[:, :, :m])

        def get_seq_length(self) -> int:
            return self.n

        def nbytes(self) -> int:
            """Bytes of this layer's buffers (capacity included)."""
            return sum(t.numel() * t.element_size() for t in (self.kf, self.vf, self.ks, self.vs)
                       if t is not None)

    return PackedLayer


def packed_cache(model, policy: HeadPolicy, *, reserve: int, layout: CacheLayout | None = None):
    """An empty packed cache for ``policy``; ``reserve``: decode positions after the prompt."""
    layout = layout or CacheLayout.of(model)
    policy.check(layout)
    if any(w is not None for w in layout.sliding):
        raise ConfigError("the packed cache takes models whose every layer is global attention "
                          "(Llama family); run a sliding-window model with the mask policy")
    cls = _packed_layer_class()
    hf = hf_model(model)
    cache = new_cache(hf)
    kept = set(policy.full)
    cache.layers = [cls([h for h in range(layout.n_kv) if (la, h) in kept],
                        [h for h in range(layout.n_kv) if (la, h) not in kept],
                        policy.sink, policy.window, reserve) for la in range(layout.n_layers)]
    return cache


def cache_bytes(cache) -> int:
    """Bytes of a packed cache's buffers."""
    return sum(layer.nbytes() for layer in cache.layers)


def group_attention(qg: Tensor, k: Tensor, v: Tensor, scaling: float, policy: KernelPolicy,
                    invalid: Tensor | None = None) -> Tensor:
    """The grouped queries ``qg [b, n, g, d]`` (the ``g`` query heads of each of ``n`` KV heads)
    over their KV heads' keys and values ``k, v [b, n, m, d]`` -> ``[b, n, g, d]``.

    As the engine computes a decode step's attention (``policy`` resolved): the scores as
    grouped products (``[g, d] @ [d, m]``, or ``[m, d] @ [d, g]`` under ``keys_first``), a
    float32 softmax cast to the dtype, pattern @ V as sums of blocks of ``av_block`` keys
    (:func:`~rhlens.engine.attention.split_av`) under ``av="split"`` from ``split_from`` keys
    on, else one product. ``invalid`` (True for a masked key, broadcast to ``[b, n, g, m]``):
    keys not written yet.
    """
    scores = grouped_scores(qg, k, policy.keys_first) * scaling  # [b, n, g, m]
    if invalid is not None:
        scores = scores.masked_fill(invalid, float("-inf"))
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(qg.dtype)
    if policy.av == "split" and k.shape[-2] >= policy.split_from:
        return split_av(weights, v, policy.av_block)
    return torch.matmul(weights, v)  # [b, n, g, d]


class PackedAttention(LeanAttention):
    """The lean decode step's attention over a packed cache (fires no hooks)."""

    def __init__(self, bridge: torch.nn.Module, policy: KernelPolicy) -> None:
        super().__init__(bridge, policy)
        points = (self.h_in, self.h_out, self.q_in, self.q_out, self.k_in, self.k_out, self.v_in,
                  self.v_out, self.o_in, self.o_out, self.cos, self.sin, self.rot_q, self.rot_k,
                  self.scores, self.pattern)
        if any(p is not None for p in points):
            raise ConfigError("the packed cache fires no TransformerLens hooks: detach them, or run "
                              "the policy as a mask (rhlens.compress.policy_hooks)")

    def _attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """``q [b, n, g, d]`` (the ``g`` query heads of ``n`` KV heads) over ``k, v [b, n, m, d]``."""
        return group_attention(q, k, v, self.scaling, self.policy)

    def forward(self, hidden_states: Tensor, cos: Tensor, sin: Tensor, cache,
                rows: int | None = None) -> Tensor:
        from transformers.models.llama.modeling_llama import rotate_half

        if rows is not None:
            raise ConfigError("the packed cache runs without slab padding (KernelPolicy rows='batch')")
        b = hidden_states.shape[0]
        x = hidden_states
        q = F.linear(x, self.wq, self.bq).view(b, 1, -1, self.head_dim).transpose(1, 2)  # [b, h, 1, d]
        k = F.linear(x, self.wk, self.bk).view(b, 1, -1, self.head_dim).transpose(1, 2)  # [b, kv, 1, d]
        v = F.linear(x, self.wv, self.bv).view(b, 1, -1, self.head_dim).transpose(1, 2)
        h = q.shape[1]
        qk = torch.cat((q, k), dim=1)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        qk = (qk * cos) + (rotate_half(qk) * sin)
        q, k = qk[:, :h], qk[:, h:]
        layer = cache.layers[self.layer_idx]
        kf, vf, ks, vs = layer.append(k, v)
        g = self.groups
        qg = q.reshape(b, h // g, g, self.head_dim)  # [b, kv, g, d]
        if not layer.stream:
            out = self._attend(qg, kf, vf)
        elif not layer.full:
            out = self._attend(qg, ks, vs)
        else:
            out = torch.empty_like(qg)
            out[:, layer.full_index] = self._attend(qg[:, layer.full_index], kf, vf)
            out[:, layer.stream_index] = self._attend(qg[:, layer.stream_index], ks, vs)
        return self._output(out.reshape(b, h, 1, self.head_dim), b, F.linear, None)


class _PackedRunner(_Runner):
    """The engine's runner with a packed cache: one prompt at a time, one prefill pass."""

    def __init__(self, model, tokenizer, config: GenerationConfig, state: StepState,
                 policy: HeadPolicy, layout: CacheLayout) -> None:
        super().__init__(model, tokenizer, config, state)
        self.policy = dataclasses.replace(self.policy, rows="batch")  # no slab padding
        self.head_policy, self.layout = policy, layout
        self.last_cache = None

    def _path(self) -> str:
        return "lean"  # the packed cache's own lean step (never the captured one)

    def _prefill(self, items, bodies, capacity, want_cache=True):
        if len(items) != 1:
            raise ConfigError("the packed cache answers one prompt at a time")
        cache = packed_cache(self.model, self.head_policy, reserve=self.config.max_new_tokens,
                             layout=self.layout)
        prefill(self.model, bodies[0], cache, chunk=None)  # one pass: see PackedLayer.update
        self.last_cache = cache
        return cache, [0]

    def step(self, path):
        return LeanDecoder(self.model, self.policy, attention=PackedAttention)


def packed_generate(model, tokenizer, prompts: Iterable[Sequence[int] | Tensor], policy: HeadPolicy, *,
                    config: GenerationConfig | None = None) -> Iterator[Generation]:
    """Greedy answers with ``policy`` as a packed cache (Llama-family models; no hooks attached).

    ``Generation.info["kv_bytes"]`` holds the bytes of the packed cache's buffers (the
    reserve for the answer included).
    """
    config = config or GenerationConfig()
    if not LeanDecoder.eligible(model):
        raise ConfigError("the packed cache runs Llama-family models (the lean decode step); "
                          "run other models with the mask policy")
    layout = CacheLayout.of(model)
    runner = _PackedRunner(model, tokenizer, config, StepState(), policy, layout)
    for i, prompt in enumerate(prompts):
        (gen,) = runner.run([(i, _as_ids(prompt), None)], None)
        gen.info["kv_bytes"] = cache_bytes(runner.last_cache)
        yield gen


def describe_cache(cache) -> dict[str, Any]:
    """Per-layer group sizes and bytes of a packed cache (JSON-ready)."""
    return {"bytes": cache_bytes(cache),
            "layers": [{"full": layer.full, "stream": layer.stream, "bytes": layer.nbytes()}
                       for layer in cache.layers]}
