"""The lean decode step's attention: the bridge's attention hooks fired on HF's weights, without its calls.

One decode step's query is a single row per prompt, so its attention is a handful of small
products; in HF and the bridge the Python around them (module calls, hook dispatch) costs more
than the GPU work. :class:`LeanAttention` computes the same tensors from the HF module's
weights and fires the bridge attention's hook points on them, in the bridge's order. How it
computes the products is a resolved :class:`~rhlens.engine.policy.KernelPolicy`.

Shapes below: ``b`` prompts (rows), ``h`` query heads, ``kv`` key/value heads, ``g = h // kv``
queries per KV group, ``n`` keys, ``d`` head dim. Plain views, not ``einops``: this is the
hot path (a ``rearrange`` costs ~3x a ``view`` on the CPU, per call).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

from rhlens.engine.bridge import linear_weights, native
from rhlens.engine.hooks import EngineHook, engine_hooks

__all__ = ["LeanAttention"]

F = torch.nn.functional


# ---------------------------------------------------------------------------------------
# Products that round each row as it rounds alone
# ---------------------------------------------------------------------------------------
def row_linear(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    return torch.cat([F.linear(x[r:r + 1], w, b) for r in range(x.shape[0])])


def row_matmul(a: Tensor, b: Tensor) -> Tensor:
    return torch.cat([torch.matmul(a[r:r + 1], b[r:r + 1]) for r in range(a.shape[0])])


def row_apply2(fn: Callable[[Tensor, Tensor], Tensor], a: Tensor, b: Tensor) -> Tensor:
    return torch.cat([fn(a[r:r + 1], b[r:r + 1]) for r in range(a.shape[0])])


def pad_rows(x: Tensor, rows: int) -> Tensor:
    """``x`` with zero rows appended up to ``rows`` (dimension 0)."""
    if x.shape[0] == rows:
        return x
    return torch.cat((x, x.new_zeros((rows - x.shape[0], *x.shape[1:]))))


def slab_linear(x: Tensor, w: Tensor, b: Tensor | None, slab: int) -> Tensor:
    """``F.linear`` on blocks of exactly ``slab`` rows (``x`` is padded to them)."""
    if x.shape[0] == slab:
        return F.linear(x, w, b)
    return torch.cat([F.linear(x[i:i + slab], w, b) for i in range(0, x.shape[0], slab)])


def batch_products(policy, h: Tensor) -> tuple[Tensor, int | None, Callable]:
    """``(h, rows, lin)`` for a decode step of ``h`` ``[B, 1, d_model]`` as ``policy``'s rows
    mode says: the residual stream (padded to whole slabs in ``"slab"`` mode, whose zero rows
    stay finite), the real row count where it was padded (else ``None``), and the weight
    product ``lin(x, w, b)`` (slab, row by row, or one ``F.linear``)."""
    B = h.shape[0]
    mode = policy.batch_mode(B)
    if mode == "slab":
        slab = policy.slab

        def lin(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
            return slab_linear(x, w, b, slab)

        return pad_rows(h, -(-B // slab) * slab), B, lin
    return h, None, (row_linear if mode == "row" else torch.nn.functional.linear)


def split_av(weights: Tensor, v: Tensor, block: int) -> Tensor:
    """``[b, kv, g, n] @ [b, kv, n, d]`` in blocks of ``block`` keys, partial sums in float32."""
    b, kv, g, n = weights.shape
    m = n // block
    if m < 2:
        return torch.matmul(weights, v)
    main = m * block
    w = weights[..., :main].reshape(b, kv, g, m, block).transpose(2, 3)  # [b, kv, m, g, block]
    parts = torch.matmul(w, v[:, :, :main].reshape(b, kv, m, block, v.shape[-1]))  # [b, kv, m, g, d]
    out = parts.sum(2, dtype=torch.float32)
    if main < n:
        out += torch.matmul(weights[..., main:], v[:, :, main:])
    return out.to(weights.dtype)


def grouped_scores(qg: Tensor, k: Tensor, keys_first: bool,
                   mm: Callable[[Tensor, Tensor], Tensor] | None = None) -> Tensor:
    """Unscaled scores of the grouped queries ``qg [b, kv, g, d]`` against their KV heads' keys
    ``k [b, kv, n, d]``: ``[b, kv, g, n]``. ``keys_first`` (``KernelPolicy.keys_first``):
    computed as ``[n, d] @ [d, g]`` and transposed, the same dot products as ``[g, d] @ [d, n]``.
    ``mm``: the product (``None``: ``torch.matmul``)."""
    mm = mm or torch.matmul
    if keys_first:
        return mm(k, qg.transpose(-2, -1)).transpose(-2, -1)
    return mm(qg, k.transpose(-2, -1))


# ---------------------------------------------------------------------------------------
# Hook points the step calls straight
# ---------------------------------------------------------------------------------------
class DirectHooks:
    """The :class:`EngineHook` s on one hook point, called without the point's machinery.

    ``flat`` edits are applied to the ``[batch, 1, head * d_head]`` tensor the model holds (the
    values the point would give through its reshape to ``[batch, 1, head, d_head]`` and back);
    read-only hooks get what the point would pass them (its user layout, converted) and their
    result is not used.
    """

    def __init__(self, point: torch.nn.Module, hooks: list[EngineHook], n_heads: int, d_head: int) -> None:
        self.point, self.hooks, self.n_heads, self.d_head = point, hooks, n_heads, d_head
        conversion = getattr(point, "hook_conversion", None)
        self.convert = conversion.convert if conversion is not None else None

    def __call__(self, x: Tensor) -> Tensor:
        for hook in self.hooks:
            if hook.flat is not None:
                x = hook.apply_flat(x, self.n_heads, self.d_head)
            elif hook.active():
                hook(self.convert(x) if self.convert else x, hook=self.point)
        return x


def direct_hooks(point: torch.nn.Module | None, n_heads: int, d_head: int, flat_ok: bool):
    """``point`` with hooks attached, as the step should call it: a :class:`DirectHooks` when
    every hook there is an EngineHook the step can call straight (read-only, or a ``flat``
    edit where ``flat_ok``), else the hook point itself; ``None`` when nothing is attached."""
    if point is None or not point.has_hooks():
        return None
    hooks = engine_hooks(point)
    if not hooks or not all(h.reads_only or (flat_ok and h.flat is not None) for h in hooks):
        return point
    return DirectHooks(point, hooks, n_heads, d_head)


# ---------------------------------------------------------------------------------------
# The attention
# ---------------------------------------------------------------------------------------
def _norm_forward(module: torch.nn.Module) -> Callable:
    norm = native(module)
    return getattr(norm, "_old_forward", None) or norm.forward


class LeanAttention:
    """The bridge's decode-step attention, computed on the HF module's weights.

    Fires the bridge attention's hook points (``hook_in``, ``q/k/v.hook_in/out`` (=
    ``hook_q/k/v``), ``hook_cos/sin``, ``hook_rot_q/k``, ``hook_attn_scores``,
    ``hook_pattern``, ``o.hook_in/out`` (``hook_z``), ``hook_out``) on the same tensors,
    in the same order, as ``PositionEmbeddingsAttentionBridge.forward``; hook points with
    nothing attached are skipped. Under grouped-query attention the single query of a
    decode step is folded into its KV group (``[kv, g, d] @ [kv, d, n]``) instead of
    copying K and V for every query head; the scores are the same dot products.

    The grouped product computes each score from the same numbers as the bridge's per-head
    product; in float32 the two agree to the bit (the tests check it), in bf16/fp16 a
    different kernel may round a score differently in its last bit, which can flip an
    argmax between near-tied keys. ``policy.expand_kv`` copies K/V per query head as the
    bridge does, for bit-for-bit agreement at any precision, at the cost of that copy.
    """

    # KernelPolicy (rhlens.engine.policy) is named, not imported: the policy imports the steps.
    def __init__(self, bridge: torch.nn.Module, policy: KernelPolicy) -> None:  # noqa: F821
        module = bridge.original_component
        self.bridge, self.policy = bridge, policy
        self.groups = int(getattr(module, "num_key_value_groups", 1))
        self.head_dim = int(getattr(module, "head_dim", None) or module.head_size)  # GPT-NeoX: head_size
        self.scaling = getattr(module, "scaling", self.head_dim ** -0.5)
        self.layer_idx = getattr(bridge, "_layer_idx", getattr(module, "layer_idx", None))
        # The bridge's q/k/v/o linears: HF's own, or (fused qkv: Phi-3, GPT-NeoX) the bridge's
        # split of them, views of the fused weight whose outputs the q/k/v hooks see
        self.wq, self.bq = linear_weights(bridge.q)
        self.wk, self.bk = linear_weights(bridge.k)
        self.wv, self.bv = linear_weights(bridge.v)
        self.wo, self.bo = linear_weights(bridge.o)
        # Qwen3's adapter: an RMSNorm of each head's query and key before the rotary embedding
        # (lean.head_norms_ok admits only those); None for Llama-family models. OLMo-2's
        # (rhlens.engine.adapters): one RMSNorm over all heads, before the split into heads.
        q_norm, k_norm = getattr(module, "q_norm", None), getattr(module, "k_norm", None)
        self.q_norm = _norm_forward(q_norm) if q_norm is not None else None
        self.k_norm = _norm_forward(k_norm) if k_norm is not None else None
        q_weight = getattr(native(q_norm), "weight", None) if q_norm is not None else None
        self.flat_norms = q_weight is not None and tuple(q_weight.shape) == (int(self.wq.shape[0]),)
        # Gemma-2's adapter: the attention-logit softcap, tanh(s / cap) * cap after the scaling
        self.softcap = getattr(module, "attn_logit_softcapping", None)
        self.sdpa_ok = self.softcap is None  # this step's own: set False when SDPA has no kernel for a call

        n_heads = int(module.config.num_attention_heads)
        n_kv = n_heads // self.groups

        def point(p, heads: int = n_heads, flat: bool = False):
            return direct_hooks(p, heads, self.head_dim, flat)

        b = bridge
        self.h_in, self.h_out = point(b.hook_in), point(b.hook_out)
        self.q_in, self.q_out = point(b.q.hook_in), point(b.q.hook_out, n_heads, True)
        self.k_in, self.k_out = point(b.k.hook_in), point(b.k.hook_out, n_kv, True)
        self.v_in, self.v_out = point(b.v.hook_in), point(b.v.hook_out, n_kv, True)
        self.o_in, self.o_out = point(b.o.hook_in, n_heads, True), point(b.o.hook_out)
        self.cos, self.sin = point(getattr(b, "hook_cos", None)), point(getattr(b, "hook_sin", None))
        self.rot_q = point(getattr(b, "hook_rot_q", None))
        self.rot_k = point(getattr(b, "hook_rot_k", None))
        self.scores, self.pattern = point(b.hook_attn_scores), point(b.hook_pattern)

    @staticmethod
    def hook_points(bridge: torch.nn.Module) -> list[torch.nn.Module]:
        """Every hook point this step fires."""
        names = ("hook_in", "hook_out", "hook_cos", "hook_sin", "hook_rot_q", "hook_rot_k",
                 "hook_attn_scores", "hook_pattern")
        points = [getattr(bridge, n) for n in names if getattr(bridge, n, None) is not None]
        for sub in ("q", "k", "v", "o"):
            points += [getattr(bridge, sub).hook_in, getattr(bridge, sub).hook_out]
        return points

    def _av_mode(self, n: int) -> str:
        mode = self.policy.av
        if mode == "split" and n < self.policy.split_from:
            return "mm"
        if mode == "sdpa" and not self.sdpa_ok:
            return "mm"
        return mode

    def _sdpa(self, q: Tensor, k: Tensor, v: Tensor, split: bool) -> Tensor | None:
        from torch.nn.attention import SDPBackend, sdpa_kernel

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
        except RuntimeError:  # no kernel for this layout: pattern @ V for the rest of this decode
            self.sdpa_ok = False
            return None

    def forward(self, hidden_states: Tensor, cos: Tensor, sin: Tensor, cache,
                rows: int | None = None) -> Tensor:
        """``[batch, 1, d_model]`` -> the attention output (after ``o_proj``).

        With ``rows`` ("slab" mode) ``hidden_states`` holds ``rows`` prompts padded to whole
        slabs; the hooks and the attention see the ``rows`` real ones, the products all of
        them, and the output is padded like the input.
        """
        from transformers.models.llama.modeling_llama import rotate_half

        padded = hidden_states.shape[0]
        b = padded if rows is None else rows
        x = self.h_in(hidden_states[:b]) if self.h_in else hidden_states
        # "slab" when the decoder pads; called on its own, no padding here
        mode = "slab" if rows is not None else "row" if self.policy.batch_mode(b) == "row" else "batch"
        # Each row's attention products (over its own keys) run row by row in "row" and "slab"
        # modes: cuBLAS picks their kernels by the number of rows too (scores at 12 of 141 key
        # counts round differently for 1 and 10 rows on an H100, benchmarks/batch_invariance.py).
        split = b > 1 and mode in ("row", "slab")
        if mode == "slab":
            slab = self.policy.slab

            def lin(t: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
                return slab_linear(pad_rows(t, padded), w, bias, slab)[:b]
        else:
            lin = row_linear if split else F.linear
        mm = row_matmul if split else torch.matmul
        if mode == "slab" and (self.q_in or self.k_in or self.v_in):
            x = x[:b]  # the input hooks see the real rows
        q = lin(self.q_in(x) if self.q_in else x, self.wq, self.bq)  # [b, 1, h * d]
        q = self.q_out(q) if self.q_out else q
        k = lin(self.k_in(x) if self.k_in else x, self.wk, self.bk)  # [b, 1, kv * d]
        k = self.k_out(k) if self.k_out else k
        v = lin(self.v_in(x) if self.v_in else x, self.wv, self.bv)
        v = self.v_out(v) if self.v_out else v
        if self.flat_norms:  # OLMo-2: over all heads' [h * d] at once
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(b, 1, -1, self.head_dim).transpose(1, 2)  # [b, h, 1, d]
        k = k.view(b, 1, -1, self.head_dim).transpose(1, 2)  # [b, kv, 1, d]
        v = v.view(b, 1, -1, self.head_dim).transpose(1, 2)
        if self.q_norm is not None and not self.flat_norms:  # over each head's d, as HF's [b, 1, h, d]
            q, k = self.q_norm(q), self.k_norm(k)
        if self.cos:
            cos = self.cos(cos)
        if self.sin:
            sin = self.sin(sin)
        # HF's apply_rotary_pos_emb, elementwise, on q and k at once (same ops per element).
        h = q.shape[1]
        qk = torch.cat((q, k), dim=1)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        r = cos.shape[-1]
        if r < self.head_dim:  # partial rotary (GPT-NeoX, Phi): the first r dims of each head
            rot = qk[..., :r]
            qk = torch.cat(((rot * cos) + (rotate_half(rot) * sin), qk[..., r:]), dim=-1)
        else:
            qk = (qk * cos) + (rotate_half(qk) * sin)
        if qk.dtype != q.dtype:  # OLMo-2's float32 tables: rotated in float32, cast back as HF does
            qk = qk.to(q.dtype)
        q, k = qk[:, :h], qk[:, h:]
        if self.rot_q:
            q = self.rot_q(q)
        if self.rot_k:
            k = self.rot_k(k)
        k, v = cache.update(k, v, self.layer_idx)  # [b, kv, n, d]
        n = k.shape[-2]
        g = self.groups
        if g > 1 and self.policy.expand_kv:
            from transformers.models.llama.modeling_llama import repeat_kv

            k, v, g = repeat_kv(k, g), repeat_kv(v, g), 1
        if not (self.scores or self.pattern) and self._av_mode(n) == "sdpa":
            out = self._sdpa(q, k, v, split)  # nobody looks at the pattern: skip it
            if out is not None:
                return self._output(out, b, lin, padded if mode == "slab" else None)
        if g > 1:
            qg = q.reshape(b, h // g, g, self.head_dim)  # [b, kv, g, d]
            scores = grouped_scores(qg, k, self.policy.keys_first, mm)  # [b, kv, g, n]
            scores = scores.reshape(b, h, 1, n) * self.scaling
        else:
            scores = mm(q, k.transpose(-2, -1)) * self.scaling  # [b, h, 1, n]
        if self.softcap is not None:  # as HF's eager attention: / cap, tanh, * cap
            scores = torch.tanh(scores / self.softcap) * self.softcap
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
        if not changed and self._av_mode(n) == "sdpa":
            out = self._sdpa(q, k, v, split)
        if out is None:  # grouped heads share their K/V: one product per group, no repeat_kv
            blocked = self._av_mode(n) == "split"
            av = functools.partial(split_av, block=self.policy.av_block) if blocked else torch.matmul
            # The blocked product stays batched in "slab" mode: on an H100 it rounded each row
            # as alone at all 141 key counts tried (1K-33K), where the scores product did not.
            if split and not (mode == "slab" and blocked):
                av = functools.partial(row_apply2, av)
            out = (av(weights.reshape(b, h // g, g, n), v).reshape(b, h, 1, -1) if g > 1
                else av(weights, v))  # [b, h, 1, d]
        return self._output(out, b, lin, padded if mode == "slab" else None)

    def _output(self, out: Tensor, b: int, lin, padded: int | None) -> Tensor:
        """``[b, h, 1, d]`` -> ``hook_z`` -> ``o_proj`` -> ``hook_out``.

        ``lin``: the step's weight product; ``padded``: "slab" mode, the output padded to that
        many rows (see :meth:`forward`).
        """
        out = out.transpose(1, 2).contiguous().reshape(b, 1, -1)  # [b, 1, h * d]
        if self.wo.dtype.is_floating_point and out.dtype != self.wo.dtype:
            out = out.to(dtype=self.wo.dtype)
        out = self.o_in(out) if self.o_in else out
        if padded is not None:
            out = slab_linear(pad_rows(out, padded), self.wo, self.bo, self.policy.slab)
            if not (self.o_out or self.h_out):
                return out
            out = out[:b]
        else:
            out = lin(out, self.wo, self.bo)
        if self.o_out:
            out = self.o_out(out)
        if self.h_out:
            out = self.h_out(out)
        return out if padded is None else pad_rows(out, padded)
