"""The lean decode step's per-family adapters: Phi-3, OLMo-2, Granite, GPT-NeoX.

Each family here differs from a Llama in a few places only, and each adapter is those places:
how a decoder layer adds its sublayers to the residual stream, which norms sit where, how the
MLP is laid out, and the scalars around the stack. The attention is the engine's own
:class:`~rhlens.engine.attention.LeanAttention` (every attention hook fires as on the bridge),
which reads the bridge's q/k/v/o linears (the bridge's split of a fused ``qkv_proj``), applies a
partial rotary embedding to the first dims of each head, and OLMo-2's q/k RMSNorm over all
heads before the split into heads.

================  =========================================================================
family            differences from the Llama step
================  =========================================================================
Phi-3             ``gate_up_proj`` fused: ``down(up * act(gate))`` from one product, chunked as
                  HF does; fused ``qkv_proj`` (the bridge's split); partial rotary where set
OLMo-2            no pre-norms: ``h + post_attn_norm(attn(h))``, ``h + post_ff_norm(mlp(h))``;
                  q/k RMSNorm over all heads (in the attention)
Granite           ``embed * embedding_multiplier``; ``h + sublayer * residual_multiplier``;
                  attention scale ``attention_multiplier`` (the module's ``scaling``);
                  ``logits / logits_scaling``
GPT-NeoX          fused ``query_key_value`` interleaved per head (the bridge's split) with
                  biases; partial rotary; LayerNorm; ``mlp + attn + h`` (parallel residual,
                  else sequential); ``dense_4h_to_h(act(dense_h_to_4h(x)))``
================  =========================================================================

Every operation is HF's, in HF's order (the modules' own ``forward`` for norms, activations,
embeddings and the rotary table; ``F.linear`` on their weights), so the step computes what HF's
decoder computes; ``tests/test_engine_families.py`` checks it against a plain HF eager loop.
These families take the lean step only (the captured step serves the Llama layout). A model
split over devices, or one whose layers are not the family's plain modules, stays on the bridge.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from rhlens.engine.attention import LeanAttention, batch_products
from rhlens.engine.bridge import hf_model, layer_devices, linear_weights, native

__all__ = ["Adapter", "family_of"]

F = torch.nn.functional


def _forward(module: torch.nn.Module) -> Callable:
    """The HF module's own ``forward`` (without accelerate's hook around it)."""
    m = native(module)
    return getattr(m, "_old_forward", None) or m.forward


class Adapter:
    """One family's differences from the Llama step (a subclass per family, no state)."""

    name = ""
    model_class = ""  # the ...ForCausalLM class
    layer_class = ""  # the decoder layer class
    attention_class = ""  # the HF attention class
    bridges: tuple[str, ...] = ("PositionEmbeddingsAttentionBridge",)
    norm = ""  # the RMSNorm / LayerNorm class of every norm
    mlp = ""
    inner = "model"  # the decoder stack's attribute on the ...ForCausalLM
    embed = "embed_tokens"
    final_norm = "norm"
    layer_norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")

    # -- which models --------------------------------------------------------------------
    def eligible(self, model, hf) -> bool:
        """The plain modules of the family on one device (else the bridge)."""
        inner = getattr(hf, self.inner, None)
        if inner is None or layer_devices(hf, len(model.blocks)) is not None:
            return False
        if (type(native(getattr(inner, self.embed, None))) is not torch.nn.Embedding
                or type(native(getattr(inner, self.final_norm, None))).__name__ != self.norm
                or getattr(inner, "rotary_emb", None) is None):
            return False
        for block in model.blocks:
            layer = block.original_component
            if (type(layer).__name__ != self.layer_class or type(native(layer.mlp)).__name__ != self.mlp
                    or any(type(native(getattr(layer, n, None))).__name__ != self.norm
                           for n in self.layer_norms)):
                return False
        return len(model.blocks) == int(hf.config.num_hidden_layers)

    def attention_ok(self, bridge, pooled: bool) -> bool:
        """Whether the lean attention reproduces ``bridge``'s (a block's attention) here."""
        module = bridge.original_component
        if (type(bridge).__name__ not in self.bridges or bridge.training
                or getattr(bridge, "compatibility_mode", False)
                or type(module).__name__ != self.attention_class or "gate" in bridge.submodules
                or getattr(module, "sinks", None) is not None
                or getattr(module, "key_multiplier", None) is not None):
            return False
        cfg = getattr(module, "config", None)
        # a sliding window keeps only the window in HF's cache, which pooled buffers do not model
        window = getattr(module, "sliding_window", None) or getattr(cfg, "sliding_window", None)
        if window is not None and pooled:
            return False
        if getattr(cfg, "clip_qkv", None) is not None:
            return False
        # the bridge's fused-qkv forward fires no hook_rot_q/k (the lean step would)
        return not (type(bridge).__name__.startswith("JointQKV") and any(
            getattr(bridge, n).has_hooks() for n in ("hook_rot_q", "hook_rot_k")
            if getattr(bridge, n, None) is not None))

    # -- the step ------------------------------------------------------------------------
    def scales(self, hf) -> tuple[float | None, float | None]:
        """(embedding multiplier, logits divisor), ``None`` where the family has none."""
        return None, None

    def parts(self, block, attention: LeanAttention) -> tuple:
        """What :meth:`layer` needs of one decoder layer (read once)."""
        layer, mlp = block.original_component, native(block.original_component.mlp)
        return (_forward(layer.input_layernorm), attention, _forward(layer.post_attention_layernorm),
                linear_weights(mlp.gate_proj), linear_weights(mlp.up_proj),
                linear_weights(mlp.down_proj), _forward(mlp.act_fn))

    def layer(self, parts: tuple, h: Tensor, cos: Tensor, sin: Tensor, cache, rows: int | None,
              lin: Callable) -> Tensor:
        """One decoder layer on the residual stream ``h [b, 1, d]``."""
        raise NotImplementedError

    @staticmethod
    def gated_mlp(x: Tensor, gate, up, down, act: Callable, lin: Callable) -> Tensor:
        """``down(act(gate(x)) * up(x))``, as LlamaMLP."""
        (gw, gb), (uw, ub), (dw, db) = gate, up, down
        return lin(act(lin(x, gw, gb)) * lin(x, uw, ub), dw, db)


class _Phi3(Adapter):
    name, model_class = "phi3", "Phi3ForCausalLM"
    layer_class, attention_class = "Phi3DecoderLayer", "Phi3Attention"
    bridges = ("JointQKVPositionEmbeddingsAttentionBridge",)
    norm, mlp = "Phi3RMSNorm", "Phi3MLP"

    def parts(self, block, attention):
        layer, mlp = block.original_component, native(block.original_component.mlp)
        return (_forward(layer.input_layernorm), attention, _forward(layer.post_attention_layernorm),
                linear_weights(mlp.gate_up_proj), linear_weights(mlp.down_proj),
                _forward(mlp.activation_fn))

    def layer(self, parts, h, cos, sin, cache, rows, lin):
        ln1, attn, ln2, (guw, gub), (dw, db), act = parts
        h = h + attn.forward(ln1(h), cos, sin, cache, rows=rows)  # dropouts: identity in eval
        gate, up = lin(ln2(h), guw, gub).chunk(2, dim=-1)  # Phi3MLP: one product, chunked
        return h + lin(up * act(gate), dw, db)


class _Olmo2(Adapter):
    name, model_class = "olmo2", "Olmo2ForCausalLM"
    layer_class, attention_class = "Olmo2DecoderLayer", "Olmo2Attention"
    norm, mlp = "Olmo2RMSNorm", "Olmo2MLP"
    layer_norms = ("post_attention_layernorm", "post_feedforward_layernorm")

    def attention_ok(self, bridge, pooled):
        module = bridge.original_component
        q_norm, k_norm = getattr(module, "q_norm", None), getattr(module, "k_norm", None)
        if q_norm is None or k_norm is None or any(  # one norm over all heads (LeanAttention.flat_norms)
                type(native(n)).__name__ != self.norm for n in (q_norm, k_norm)):
            return False
        n_q, n_k = (int(linear_weights(p)[0].shape[0]) for p in (bridge.q, bridge.k))
        if (tuple(native(q_norm).weight.shape), tuple(native(k_norm).weight.shape)) != ((n_q,), (n_k,)):
            return False
        return super().attention_ok(bridge, pooled)

    def parts(self, block, attention):
        layer, mlp = block.original_component, native(block.original_component.mlp)
        return (attention, _forward(layer.post_attention_layernorm),
                _forward(layer.post_feedforward_layernorm),
                linear_weights(mlp.gate_proj), linear_weights(mlp.up_proj),
                linear_weights(mlp.down_proj), _forward(mlp.act_fn))

    def layer(self, parts, h, cos, sin, cache, rows, lin):
        attn, post_attn, post_ff, gate, up, down, act = parts
        h = h + post_attn(attn.forward(h, cos, sin, cache, rows=rows))
        return h + post_ff(self.gated_mlp(h, gate, up, down, act, lin))


class _Granite(Adapter):
    name, model_class = "granite", "GraniteForCausalLM"
    layer_class, attention_class = "GraniteDecoderLayer", "GraniteAttention"
    norm, mlp = "GraniteRMSNorm", "GraniteMLP"

    def scales(self, hf):
        return float(hf.config.embedding_multiplier), float(hf.config.logits_scaling)

    def parts(self, block, attention):
        return (*super().parts(block, attention), float(block.original_component.residual_multiplier))

    def layer(self, parts, h, cos, sin, cache, rows, lin):
        ln1, attn, ln2, gate, up, down, act, m = parts
        h = h + attn.forward(ln1(h), cos, sin, cache, rows=rows) * m
        return h + self.gated_mlp(ln2(h), gate, up, down, act, lin) * m


class _GPTNeoX(Adapter):
    name, model_class = "gpt_neox", "GPTNeoXForCausalLM"
    layer_class, attention_class = "GPTNeoXLayer", "GPTNeoXAttention"
    bridges = ("JointQKVPositionEmbeddingsAttentionBridge",)
    norm, mlp = "LayerNorm", "GPTNeoXMLP"
    inner, embed, final_norm = "gpt_neox", "embed_in", "final_layer_norm"

    def parts(self, block, attention):
        layer, mlp = block.original_component, native(block.original_component.mlp)
        return (_forward(layer.input_layernorm), attention, _forward(layer.post_attention_layernorm),
                linear_weights(mlp.dense_h_to_4h), linear_weights(mlp.dense_4h_to_h), _forward(mlp.act),
                bool(layer.use_parallel_residual))

    def layer(self, parts, h, cos, sin, cache, rows, lin):
        ln1, attn, ln2, (w1, b1), (w2, b2), act, parallel = parts
        a = attn.forward(ln1(h), cos, sin, cache, rows=rows)
        if parallel:  # GPTNeoXLayer: mlp_output + attn_output + hidden_states
            return lin(act(lin(ln2(h), w1, b1)), w2, b2) + a + h
        a = a + h
        return lin(act(lin(ln2(a), w1, b1)), w2, b2) + a


_ADAPTERS = {a.model_class: a for a in (_Phi3(), _Olmo2(), _Granite(), _GPTNeoX())}


def family_of(hf: torch.nn.Module) -> Adapter | None:
    """The adapter of an HF model's family (``None``: the Llama step's own families, or none)."""
    return _ADAPTERS.get(type(hf).__name__)


# ---------------------------------------------------------------------------------------
# The step (LeanDecoder delegates here for these families)
# ---------------------------------------------------------------------------------------
def build(dec: Any, model, attention: Callable) -> None:
    """Fill a :class:`~rhlens.engine.lean.LeanDecoder` for an adapted family."""
    hf = hf_model(model)
    fam = family_of(hf)
    inner = getattr(hf, fam.inner)
    dec.family = fam
    dec.embed = _forward(getattr(inner, fam.embed))
    dec.rotary = native(inner.rotary_emb)
    dec.norm = _forward(getattr(inner, fam.final_norm))
    dec.lm_w, dec.lm_b = linear_weights(hf.get_output_embeddings())
    dec.embed_scale, dec.logits_scale = fam.scales(hf)
    dec.final_softcap, dec.gemma, dec.typed_rotary, dec.devices = None, False, False, None
    dec.sandwich, dec.layer_types = [], []
    dec.layers = [fam.parts(block, attention(block.attn, dec.policy)) for block in model.blocks]


def step(dec: Any, input_ids: Tensor, cache, position: int) -> Tensor:
    """One decode step of an adapted family: ``[batch, 1]`` ids -> ``[batch, 1, vocab]`` logits
    (the weight products as the policy's rows mode says, as in ``LeanDecoder.__call__``)."""
    B = input_ids.shape[0]
    h = dec.embed(input_ids)  # [B, 1, d_model]
    if dec.embed_scale is not None:  # Granite
        h = h * dec.embed_scale
    pos = torch.full((1, 1), position, dtype=torch.long, device=input_ids.device)
    cos, sin = dec.rotary(h, pos)
    h, rows, lin = batch_products(dec.policy, h)
    for parts in dec.layers:
        h = dec.family.layer(parts, h, cos, sin, cache, rows, lin)
    logits = lin(dec.norm(h), dec.lm_w, dec.lm_b)[:B]
    if dec.logits_scale is not None:  # Granite, as HF: logits / logits_scaling
        logits = logits / dec.logits_scale
    return logits
