"""The decode step: the lean step of a Llama-family model where it is exact, else the bridge's own forward.

HF's decode step is bound by Python: every ``nn.Module`` call, decorator and keyword dispatch
costs microseconds, ~20 ms a token for a 32-layer model on a GPU host, far more than the GPU
needs. :class:`LeanDecoder` runs the same tensor operations on the same modules' weights
(RMSNorm's and the rotary embedding's own ``forward``; ``F.linear`` for ``nn.Linear``; the
MLP's ``down(act(gate(x)) * up(x))``; residual adds as in the decoder layer) with
:class:`~rhlens.engine.attention.LeanAttention`, so every attention hook fires.

:func:`decode_step` picks the step: lean when the architecture is one the lean step
reproduces and only attention hooks are attached (:func:`lean_ok`), else the bridge. The
captured step (:mod:`~rhlens.engine.captured`) is chosen before either where it applies.

A model spread over devices by an accelerate device map (weights resident, not offloaded)
takes the lean step too: the residual stream moves to each layer's device as HF's hooks
would move it, and each layer's keys and values stay on that layer's device
(:class:`~rhlens.engine.kv.KVPool`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from rhlens.engine import adapters
from rhlens.engine.attention import LeanAttention, batch_products, pad_rows
from rhlens.engine.bridge import hf_model, layer_devices, linear_weights, native
from rhlens.engine.hooks import has_torch_hooks, internal_handles
from rhlens.engine.kv import plain_cache_layers

__all__ = ["DecodeStep", "LeanDecoder", "lean_ok", "plain_forward", "resident_hooks"]

DecodeStep = Callable[[Tensor, Any, int], Tensor]

_LEAN_MODELS = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                "MixtralForCausalLM", "Qwen3MoeForCausalLM")
_LEAN_LAYERS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer",
                "MixtralDecoderLayer", "Qwen3MoeDecoderLayer")
_LEAN_ATTENTION = ("LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention",
                   "MixtralAttention", "Qwen3MoeAttention")
_LEAN_MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "Qwen3MoeMLP")
# Mixture-of-experts blocks (Mixtral, Qwen3-MoE): the adapter calls the block's own forward
# (HF's router: top-k experts per token, and its experts), one row at a time where rows must
# round as alone (the experts' products batch the tokens routed to them).
_MOE_BLOCKS = ("MixtralSparseMoeBlock", "Qwen3MoeSparseMoeBlock")
_LEAN_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MixtralRMSNorm",
               "Qwen3MoeRMSNorm")
# Gemma-2 / Gemma-3 (text): the same step through the family's adapter: sandwich norms (each
# sublayer's output normed before its residual add), per-layer-type rotary tables (Gemma-3),
# attention-logit and final-logit softcaps (Gemma-2), per-head q/k norms (Gemma-3); the
# scaled embedding, the (1 + w) RMSNorm and the GELU are the modules' own forwards.
_GEMMA_MODELS = ("Gemma2ForCausalLM", "Gemma3ForCausalLM")
_GEMMA_LAYERS = ("Gemma2DecoderLayer", "Gemma3DecoderLayer")
_GEMMA_ATTENTION = ("Gemma2Attention", "Gemma3Attention")
_GEMMA_MLPS = ("Gemma2MLP", "Gemma3MLP")
_GEMMA_NORMS = ("Gemma2RMSNorm", "Gemma3RMSNorm")
_HEAD_NORMS = ("Qwen3RMSNorm", "Qwen3MoeRMSNorm", "Gemma3RMSNorm")
_LEAN_BLOCKING_FLAGS = ("use_attn_result", "use_split_qkv_input", "use_attn_in", "gated_q_proj",
                        "rotary_adjacent_pairs", "rotary_interleaved_cos_sin", "qk_norm_after_rope",
                        "use_hook_mlp_in")


class LeanDecoder:
    """One greedy decode step of a Llama-family model, as HF computes it, minus the calls.

    ``step(input_ids [batch, 1], cache, position) -> logits [batch, 1, vocab]``. ``attention``
    makes each layer's attention from its bridge component and the policy
    (:class:`~rhlens.engine.attention.LeanAttention`, or a subclass with its own cache, such as
    :class:`rhlens.compress.packed.PackedAttention`).
    """

    # KernelPolicy (rhlens.engine.policy) is named, not imported: the policy imports the steps.
    def __init__(self, model, policy: KernelPolicy,  # noqa: F821
                 attention: Callable[[torch.nn.Module, KernelPolicy], LeanAttention] = LeanAttention  # noqa: F821
                 ) -> None:
        hf = hf_model(model)
        self.policy = policy
        self.family = adapters.family_of(hf)  # Phi-3, OLMo-2, Granite, GPT-NeoX: their adapter
        if self.family is not None:
            adapters.build(self, model, attention)
            return
        inner = hf.model
        self.embed = native(inner.embed_tokens)
        self.rotary = native(inner.rotary_emb)
        self.norm = native(inner.norm)
        self.lm_w, self.lm_b = linear_weights(hf.lm_head)
        self.gemma = type(hf).__name__ in _GEMMA_MODELS  # the family's adapter (see above)
        self.final_softcap = getattr(hf.config, "final_logit_softcapping", None)
        self.layers, self.sandwich, self.layer_types = [], [], []
        for block in model.blocks:
            layer = block.original_component
            mlp = native(layer.mlp)
            ln1 = plain_forward(native(layer.input_layernorm))
            ln2 = plain_forward(native(layer.pre_feedforward_layernorm if self.gemma
                                       else layer.post_attention_layernorm))
            if type(mlp).__name__ in _MOE_BLOCKS:  # the MoE adapter: (None, None, None, the block)
                self.layers.append((ln1, attention(block.attn, policy), ln2, None, None, None,
                                    plain_forward(mlp)))
                continue
            self.layers.append((ln1, attention(block.attn, policy), ln2,
                                linear_weights(mlp.gate_proj), linear_weights(mlp.up_proj),
                                linear_weights(mlp.down_proj), plain_forward(native(mlp.act_fn))))
            if self.gemma:  # the norms of the attention's and the MLP's outputs
                self.sandwich.append((plain_forward(native(layer.post_attention_layernorm)),
                                      plain_forward(native(layer.post_feedforward_layernorm))))
                self.layer_types.append(getattr(native(layer.self_attn), "layer_type", None))
        # Gemma-3: one rotary table per layer type (local and global bases)
        self.typed_rotary = self.gemma and "layer_type" in inspect.signature(self.rotary.forward).parameters
        # A model split over devices: where each layer runs (None: all on one device).
        self.devices = layer_devices(hf, len(self.layers))

    @staticmethod
    def _moe(block: Callable, x: Tensor, rows: int, mode: str) -> Tensor:
        """An MoE block on ``x [padded, 1, d]`` (``rows`` real): row by row in the exact modes
        (the tokens routed to one expert share its products), zeros for padding rows."""
        if mode == "batch" or x.shape[0] == 1:
            return block(x)
        out = torch.cat([block(x[r:r + 1]) for r in range(rows)])
        return pad_rows(out, x.shape[0])

    @staticmethod
    def eligible(model) -> bool:
        """Whether ``model``'s architecture is one this step reproduces."""
        hf = hf_model(model)
        family = adapters.family_of(hf)
        if family is not None:
            return family.eligible(model, hf)
        inner = getattr(hf, "model", None)
        if inner is None:
            return False
        if type(hf).__name__ in _GEMMA_MODELS:
            return LeanDecoder._gemma_eligible(model, hf)
        if type(hf).__name__ not in _LEAN_MODELS:
            return False
        if (getattr(hf.config, "final_logit_softcapping", None) or type(native(inner.embed_tokens))
                is not torch.nn.Embedding):
            return False
        if type(native(inner.norm)).__name__ not in _LEAN_NORMS:
            return False
        for block in model.blocks:
            layer = block.original_component
            if (type(layer).__name__ not in _LEAN_LAYERS
                    or type(native(layer.mlp)).__name__ not in (*_LEAN_MLPS, *_MOE_BLOCKS)
                    or type(native(layer.input_layernorm)).__name__ not in _LEAN_NORMS
                    or type(native(layer.post_attention_layernorm)).__name__ not in _LEAN_NORMS):
                return False
        return len(model.blocks) == int(hf.config.num_hidden_layers)

    @staticmethod
    def _gemma_eligible(model, hf) -> bool:
        inner = hf.model
        if type(native(inner.norm)).__name__ not in _GEMMA_NORMS or layer_devices(hf, len(model.blocks)):
            return False
        norms = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm")
        for block in model.blocks:
            layer = block.original_component
            if (type(layer).__name__ not in _GEMMA_LAYERS
                    or type(native(layer.mlp)).__name__ not in _GEMMA_MLPS
                    or any(type(native(getattr(layer, n, None) or layer)).__name__ not in _GEMMA_NORMS
                           for n in norms)):
                return False
        return len(model.blocks) == int(hf.config.num_hidden_layers)

    def __call__(self, input_ids: Tensor, cache, position: int) -> Tensor:
        if self.family is not None:
            return adapters.step(self, input_ids, cache, position)
        B = input_ids.shape[0]
        mode = self.policy.batch_mode(B)
        h = plain_forward(self.embed)(input_ids)  # [B, 1, d_model]
        pos = torch.full((1, 1), position, dtype=torch.long, device=input_ids.device)
        if self.typed_rotary:  # Gemma-3: each layer type's table
            tables = {t: self.rotary(h, pos, t) for t in dict.fromkeys(self.layer_types)}
            cos, sin = tables[self.layer_types[0]]
        else:
            cos, sin = self.rotary(h, pos)
        h, rows, lin = batch_products(self.policy, h)
        rope = {cos.device: (cos, sin)}  # a split model: the rotary tables on each layer's device
        for i, (ln1, attn, ln2, gate, up, down, act) in enumerate(self.layers):
            c, s = cos, sin
            if self.devices is not None:
                if h.device != self.devices[i]:  # the next device
                    h = h.to(self.devices[i])
                if h.device not in rope:  # the rotary embedding may sit on another device
                    rope[h.device] = (cos.to(h.device), sin.to(h.device))
                c, s = rope[h.device]
            if self.gemma:  # sandwich norms around both sublayers (no device map here)
                (gw, gb), (uw, ub), (dw, db) = gate, up, down
                if self.typed_rotary:
                    c, s = tables[self.layer_types[i]]
                post_attn, post_ff = self.sandwich[i]
                h = h + post_attn(attn.forward(ln1(h), c, s, cache, rows=rows))
                x = ln2(h)
                h = h + post_ff(lin(act(lin(x, gw, gb)) * lin(x, uw, ub), dw, db))
                continue
            h = h + attn.forward(ln1(h), c, s, cache, rows=rows)
            x = ln2(h)
            if gate is None:  # mixture of experts: the block itself (act), exact per row
                h = h + self._moe(act, x, B, mode)
                continue
            (gw, gb), (uw, ub), (dw, db) = gate, up, down
            h = h + lin(act(lin(x, gw, gb)) * lin(x, uw, ub), dw, db)
        if h.device != self.lm_w.device:
            h = h.to(self.lm_w.device)
        logits = lin(plain_forward(self.norm)(h), self.lm_w, self.lm_b)[:B]
        if self.final_softcap:  # Gemma-2, as HF: / cap, tanh, * cap
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits


def plain_forward(module: torch.nn.Module) -> Callable:
    """``module.forward`` without accelerate's device hook around it (the lean step moves the
    residual stream itself), or the forward itself when there is none."""
    return getattr(module, "_old_forward", None) or module.forward


def resident_hooks(module: torch.nn.Module) -> bool:
    """Whether ``module``'s accelerate hook (if any) only moves tensors to the device its
    weights sit on (no offloading, which the lean step's direct weight reads would miss)."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return True
    hooks = getattr(hook, "hooks", None) or [hook]  # a SequentialHook holds several
    return all(type(h).__name__ == "AlignDevicesHook" and not getattr(h, "offload", True)
               and not getattr(h, "offload_buffers", False) for h in hooks)


def lean_ok(model) -> bool:
    """Whether the lean decode step is exact here (else the step runs through the bridge).

    False when the architecture is not a plain Llama-family model the lean step reproduces,
    when a hook is attached anywhere but the attention hook points it fires (residual,
    MLP, norm hooks need the bridge's own forward), or when accelerate offloads weights
    (a device map that only places them is fine).
    """
    from transformer_lens.hook_points import HookPoint
    from transformer_lens.model_bridge.generalized_components.position_embeddings_attention import (
        PositionEmbeddingsAttentionBridge,
    )

    cfg = model.cfg
    if any(bool(getattr(cfg, f, False)) for f in _LEAN_BLOCKING_FLAGS):
        return False
    if not LeanDecoder.eligible(model):
        return False
    # A sliding-window layer's decode attends over what its HF cache layer keeps (the window);
    # the engine's plain KV buffers keep everything, so such a model must not be pooled.
    pooled = plain_cache_layers(hf_model(model)) is not None
    family = adapters.family_of(hf_model(model))
    fired: set[int] = set()
    # BlockBridge's own pre-hooks on ln1/ln2 keep the pre-LN residual for the split-qkv inputs
    # and fire hook_mlp_in, both off here (flags above; hooked points are checked below).
    internal = internal_handles(model)
    for block in model.blocks:
        b = block.attn
        module = b.original_component
        if family is not None:  # the family's adapter (rhlens.engine.adapters)
            if not family.attention_ok(b, pooled):
                return False
            fired.update(id(p) for p in LeanAttention.hook_points(b))
            continue
        if (type(b) is not PositionEmbeddingsAttentionBridge or b.training
                or getattr(b, "compatibility_mode", False)
                or type(module).__name__ not in (*_LEAN_ATTENTION, *_GEMMA_ATTENTION)
                or "gate" in b.submodules or not head_norms_ok(module)
                or (getattr(module, "sliding_window", None) is not None and pooled)
                or getattr(module, "sinks", None) is not None
                or getattr(module, "key_multiplier", None) is not None):
            return False
        rope = getattr(getattr(module, "config", None), "rope_parameters", None)
        if isinstance(rope, dict) and rope.get("llama_4_scaling_beta") is not None:
            return False
        if float(getattr(module.config, "partial_rotary_factor", 1.0) or 1.0) != 1.0:
            return False
        fired.update(id(p) for p in LeanAttention.hook_points(b))
    for module in model.modules():
        if isinstance(module, HookPoint):
            if id(module) not in fired and module.has_hooks():
                return False
        elif has_torch_hooks(module, internal) or not resident_hooks(module):
            return False
    return True


def head_norms_ok(module: torch.nn.Module) -> bool:
    """Whether an attention module's q/k norms (if any) are ones the lean and captured steps
    apply: Qwen3's, an RMSNorm of each head's query and key before the rotary embedding (the
    adapter of :meth:`LeanAttention.forward`). OLMo-2's norm over all heads at once is not."""
    q_norm, k_norm = getattr(module, "q_norm", None), getattr(module, "k_norm", None)
    if q_norm is None and k_norm is None:
        return True
    head_dim = int(module.head_dim)
    return all(n is not None and type(native(n)).__name__ in _HEAD_NORMS
               and tuple(native(n).weight.shape) == (head_dim,) for n in (q_norm, k_norm))
