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
computes q/k/v for every head, writes the new key into its group, and attends each group over
its own keys as the engine computes a decode step's attention (:func:`group_attention`:
grouped score products, a float32 softmax, pattern @ V in blocks of keys on long contexts).
Softmax does not depend on the order of the keys, so the ring needs no reordering. Two steps:

* :class:`PackedDecoder`, the engine's captured step (:mod:`~rhlens.engine.captured`: static
  buffers, the position on the device, one CUDA graph replayed a step on a GPU, run eagerly
  elsewhere) writing and reading the two groups; where ``KernelPolicy.decode`` resolves to
  ``"captured"`` (a GPU's default);
* :class:`PackedAttention` in the engine's lean step :class:`~rhlens.engine.lean.LeanDecoder`
  (kernels launched from Python), elsewhere.

``Generation.info["decode"]`` says which ran. The packed cache fires no TransformerLens hooks:
it is for measuring memory and time (and it answers as the mask policy does: the tests check
the tokens in float32).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from rhlens.compress.policy import CacheLayout, HeadPolicy
from rhlens.engine import GenerationConfig, StepState, hf_model, phase, prefill
from rhlens.engine.attention import LeanAttention, grouped_scores, split_av
from rhlens.engine.bridge import new_cache
from rhlens.engine.captured import SYNC_EVERY, CapturedDecoder, decode_path
from rhlens.engine.lean import LeanDecoder
from rhlens.engine.policy import KernelPolicy
from rhlens.engine.runner import Generation, Runner, as_ids
from rhlens.errors import ConfigError

__all__ = ["PackedAttention", "PackedDecoder", "group_attention", "packed_cache", "packed_generate"]

_NO_HOOKS = ("the packed cache fires no TransformerLens hooks: detach them, or run the policy as "
             "a mask (rhlens.compress.policy_hooks)")


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


def layer_heads(layout: CacheLayout, policy: HeadPolicy) -> list[tuple[list[int], list[int]]]:
    """Per layer, (the KV heads ``policy`` keeps whole, the streaming ones)."""
    policy.check(layout)
    if any(w is not None for w in layout.sliding):
        raise ConfigError("the packed cache takes models whose every layer is global attention "
                          "(Llama family); run a sliding-window model with the mask policy")
    kept = set(policy.full)
    return [([h for h in range(layout.n_kv) if (la, h) in kept],
             [h for h in range(layout.n_kv) if (la, h) not in kept]) for la in range(layout.n_layers)]


def packed_cache(model, policy: HeadPolicy, *, reserve: int, layout: CacheLayout | None = None):
    """An empty packed cache for ``policy``; ``reserve``: decode positions after the prompt."""
    heads = layer_heads(layout or CacheLayout.of(model), policy)
    cls = _packed_layer_class()
    cache = new_cache(hf_model(model))
    cache.layers = [cls(full, stream, policy.sink, policy.window, reserve) for full, stream in heads]
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
            raise ConfigError(_NO_HOOKS)

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


class PackedDecoder(CapturedDecoder):
    """The engine's captured decode step over a packed cache: one prompt, no hooks.

    Each layer's KV heads fall in up to two groups, fixed at construction from the head policy
    (index tensors on the device): the heads kept whole, whose buffers ``kf/vf`` are the
    step's KV buffers (the new key written at ``st.pos``; attention over the first
    ``st.keys`` keys, those past ``st.pos`` masked), and the streaming heads, whose ring
    ``ks/vs`` gets the new key at the slot of ``st.pos``, computed on the device (attention
    over all ``sink + window`` slots, those not written yet masked). Each group's output goes
    to its query heads' places in ``st.z``. Nothing in a step reads the position back to the
    host, so on a GPU the whole step is one CUDA graph, as the engine's.
    """

    def __init__(self, model, policy: KernelPolicy, head_policy: HeadPolicy,
                 layout: CacheLayout | None = None) -> None:
        heads = layer_heads(layout or CacheLayout.of(model), head_policy)
        super().__init__(model, dataclasses.replace(policy, rows="batch"))  # one prompt: no slab padding
        dev = self.device
        self.full = [full for full, _ in heads]  # what a packed cache for this policy holds
        self.sink, self.window = head_policy.sink, head_policy.window
        self.ring_idx = torch.arange(self.sink + self.window, device=dev)  # [held]
        # Per layer, the groups it has: ("full" | "stream", their KV heads [n_group] on the device,
        # None when the group is every KV head of the layer: no gather, no scatter).
        self.groups_of: list[tuple[tuple[str, Tensor | None], ...]] = []
        for full, stream in heads:
            groups = []
            for kind, kv_heads in (("full", full), ("stream", stream)):
                if kv_heads:
                    idx = (None if len(kv_heads) == self.n_kv
                           else torch.tensor(kv_heads, dtype=torch.long, device=dev))
                    groups.append((kind, idx))
            self.groups_of.append(tuple(groups))
        self._rings: list[tuple[Tensor, Tensor]] = []  # per layer (ks, vs) of the cache being decoded
        self._ring_ptrs: tuple[int, ...] | None = None  # their addresses, which the graphs hold
        self._slot = self._unwritten = None  # this step's ring slot [1], ring slots not written [held]

    @torch.no_grad()
    def decode_cache(self, cache, last: int, max_new: int, on_tokens: Callable[[list[list[int]]], bool],
                     check_every: int | None = SYNC_EVERY) -> int:
        """Decode the prompt whose body ``cache`` holds (a packed cache for this head policy,
        prefilled), feeding ``last`` first; as :meth:`CapturedDecoder.decode` (``on_tokens``
        gets ``[steps][1]`` tokens; returns the steps run). The full groups' buffers must hold
        the body plus ``max_new`` tokens rounded up to ``KernelPolicy.bucket``."""
        if any(any(specs) for per_layer in self._specs() for specs in per_layer):
            raise ConfigError(_NO_HOOKS)
        if [layer.full for layer in cache.layers] != self.full:
            raise ConfigError("this packed cache was made for another head policy")
        n_body = cache.layers[0].n
        keys = -(-(n_body + max_new) // self.policy.bucket) * self.policy.bucket
        if keys > cache.layers[0].kf.shape[2]:
            raise ConfigError(f"the packed cache holds {cache.layers[0].kf.shape[2]} positions; the "
                              f"captured step attends over {keys} (the prompt and the answer rounded "
                              "up to KernelPolicy.bucket): make it with a larger reserve")
        rings = [(layer.ks, layer.vs) for layer in cache.layers]
        ptrs = tuple(t.data_ptr() for pair in rings for t in pair)
        if ptrs != self._ring_ptrs:  # the graphs captured so far write and read other rings
            self._graphs, self._pool = {}, None
        self._rings, self._ring_ptrs = rings, ptrs
        try:
            ran = self.decode([layer.kf for layer in cache.layers], [layer.vf for layer in cache.layers],
                              1, n_body + 1, [last], max_new, on_tokens, check_every)
        finally:
            self._rings = []
        for layer in cache.layers:  # every step wrote its fed token's key
            layer.n = n_body + ran
        return ran

    def _write_kv(self, st, li: int, s0: int, real: int, k: Tensor, v: Tensor, kb: Tensor,
                  vb: Tensor) -> None:
        """``k, v [1, kv, 1, d]``: the full group's at ``st.pos`` of ``kb, vb [1, n_full,
        capacity, d]``, the streaming group's at its ring slot."""
        if li == 0:  # once a step, on the device: where this position goes in the rings
            p = st.pos  # [1]
            self._slot = torch.where(p < self.sink, p, self.sink + (p - self.sink) % self.window)
            # slot j holds position j until the ring wraps: the slots past p are not written yet
            self._unwritten = self.ring_idx > p  # [held]
        for kind, idx in self.groups_of[li]:
            kg = k[:real] if idx is None else k[:real].index_select(1, idx)  # [1, n_group, 1, d]
            vg = v[:real] if idx is None else v[:real].index_select(1, idx)
            if kind == "full":
                kb[s0:s0 + real].index_copy_(2, st.pos, kg)
                vb[s0:s0 + real].index_copy_(2, st.pos, vg)
            else:
                ks, vs = self._rings[li]  # [1, n_stream, held, d]
                ks[s0:s0 + real].index_copy_(2, self._slot, kg)
                vs[s0:s0 + real].index_copy_(2, self._slot, vg)

    def _attend(self, st, li: int, s0: int, real: int, q: Tensor, kb: Tensor, vb: Tensor,
                scaling: float, split: bool, invalid: Tensor) -> None:
        """Each group of ``q [1, h, 1, d]`` over its own keys, into ``st.z`` (``split`` is
        decided per group, from its number of keys, by :func:`group_attention`)."""
        kv, g, d, C = self.n_kv, self.groups, self.head_dim, st.keys
        qg = q[:real].reshape(real, kv, g, d)  # [1, kv, g, d]: the g query heads of each KV head
        z = st.z[s0:s0 + real].view(real, kv, g, d)  # their places in st.z [1, 1, h * d]
        for kind, idx in self.groups_of[li]:
            if kind == "full":  # the first C keys, those past st.pos masked
                keys, values, masked = kb[s0:s0 + real, :, :C], vb[s0:s0 + real, :, :C], invalid
            else:  # every ring slot, those not written yet masked
                ks, vs = self._rings[li]
                keys, values, masked = ks[s0:s0 + real], vs[s0:s0 + real], self._unwritten
            if idx is None:
                z.copy_(group_attention(qg, keys, values, scaling, self.policy, masked))
            else:
                out = group_attention(qg.index_select(1, idx), keys, values, scaling, self.policy, masked)
                z.index_copy_(1, idx, out)  # [1, n_group, g, d] to the group's query heads


class _PackedRunner(Runner):
    """The engine's runner with a packed cache: one prompt at a time, one prefill pass."""

    def __init__(self, model, tokenizer, config: GenerationConfig, state: StepState,
                 policy: HeadPolicy, layout: CacheLayout) -> None:
        super().__init__(model, tokenizer, config, state)
        self.packed_policy = dataclasses.replace(self.policy, rows="batch")  # one prompt: no slab padding
        self.head_policy, self.layout = policy, layout
        self.last_cache = None
        self._captured: PackedDecoder | None = None

    def _path(self) -> str:
        """The packed cache's own steps: captured where ``KernelPolicy.decode`` resolves to it
        with the hooks attached now, else lean (never the bridge, which cannot read the cache)."""
        if self.policy.decode == "captured" and decode_path(self.model, "captured") == "captured":
            return "captured"
        return "lean"

    def _prefill(self, items, bodies, capacity, want_cache=True):
        if len(items) != 1:
            raise ConfigError("the packed cache answers one prompt at a time")
        # capacity: the body + the answer, rounded up to the captured step's bucket for it
        cache = packed_cache(self.model, self.head_policy, reserve=capacity - len(bodies[0]),
                             layout=self.layout)
        prefill(self.model, bodies[0], cache, chunk=None)  # one pass: see PackedLayer.update
        self.last_cache = cache
        return cache, [0]

    def step(self, path):
        return LeanDecoder(self.model, self.packed_policy, attention=PackedAttention)

    def _captured_decoder(self) -> PackedDecoder:
        if self._captured is None:
            self._captured = PackedDecoder(self.model, self.packed_policy, self.head_policy, self.layout)
        return self._captured

    def _decode_captured(self, decoder: PackedDecoder, rows: int, last: list[int],
                         n_prompt: int) -> list[tuple[list[int], str]]:
        """The captured packed step on the prefilled packed cache."""
        stops = self._stops(rows)
        self.state.rows = rows
        check = SYNC_EVERY if (self.eos or self.config.stop_at_newline) else None
        with phase("decode", self.state):
            decoder.decode_cache(self.last_cache, last[0], self.config.max_new_tokens, stops.add_steps, check)
        return stops.result()


def packed_generate(model, tokenizer, prompts: Iterable[Sequence[int] | Tensor], policy: HeadPolicy, *,
                    config: GenerationConfig | None = None) -> Iterator[Generation]:
    """Greedy answers with ``policy`` as a packed cache (Llama-family models; no hooks attached).

    The decode step is the captured packed step (:class:`PackedDecoder`) where
    ``config.policy``'s ``decode`` resolves to ``"captured"`` (a GPU's default), else the lean
    one (:class:`PackedAttention`); ``Generation.info["decode"]`` says which ran.
    ``info["kv_bytes"]`` holds the bytes of the packed cache's buffers (the reserve for the
    answer included, rounded up to ``KernelPolicy.bucket`` on the captured step).
    """
    config = config or GenerationConfig()
    if not LeanDecoder.eligible(model):
        raise ConfigError("the packed cache runs Llama-family models (the lean decode step); "
                          "run other models with the mask policy")
    layout = CacheLayout.of(model)
    runner = _PackedRunner(model, tokenizer, config, StepState(), policy, layout)
    for i, prompt in enumerate(prompts):
        (gen,) = runner.run([(i, as_ids(prompt), None)], None)
        gen.info["kv_bytes"] = cache_bytes(runner.last_cache)
        yield gen


def describe_cache(cache) -> dict[str, Any]:
    """Per-layer group sizes and bytes of a packed cache (JSON-ready)."""
    return {"bytes": cache_bytes(cache),
            "layers": [{"full": layer.full, "stream": layer.stream, "bytes": layer.nbytes()}
                       for layer in cache.layers]}
