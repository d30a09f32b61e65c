"""The captured decode step: a Llama-family step on static buffers, one CUDA graph, hooks as tensor ops.

The lean step (:mod:`~rhlens.engine.lean`) still launches every kernel from Python and reads
each step's token back to decide whether to stop: on a GPU host that costs more than the
GPU's work (~1,400 kernels a step for a 32-layer model). Here every operation of a step works
on preallocated tensors whose addresses never change:

* the KV buffers of the engine's :class:`~rhlens.engine.kv.KVPool`, written at a position
  held in a device tensor; attention runs over a fixed number of keys (the prompt plus the
  new tokens rounded up to ``KernelPolicy.bucket``) with the keys past the current one masked;
* the next token is the argmax of the logits, written on the device into the next step's
  input and a token log; the position and step counters are incremented on the device;
* the built-in hooks run as tensor ops from their declarations (:class:`TopKeySpec`: the
  retrieval recorder's argmax written into its buffer at the device step;
  :class:`HeadEditSpec`: ``ablate_heads`` masks as a per-layer multiplier and replacement,
  ``x * keep + fill``, whose values are copied in before each decode, so another masked set
  needs no new capture).

On CUDA the step is captured once per (rows, keys, steps, which edits) as a CUDA graph and
replayed; the host reads the token log every :data:`SYNC_EVERY` steps to check the EOS /
newline stops, and the steps run past a stop are cropped from the records. Elsewhere the same
step runs eagerly (what the CPU tests exercise). Exactness: batched rows equal the same
prompts alone, as on the lean step (weight products on blocks of a fixed number of rows,
each row's attention on its own, compiled functions always called on one block); against
the lean step the numbers may differ in the last bits (a softmax over more, masked keys;
fused kernels under ``KernelPolicy.compile``), so bf16 runs can flip near-tied argmaxes.

The recorder's argmax is taken, as on the lean step, over the pattern the hook would see (the
float32 softmax cast to the model's dtype), first index on ties.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from rhlens.engine.adapters import family_of
from rhlens.engine.attention import LeanAttention, split_av
from rhlens.engine.bridge import attention_shape, hf_model, layer_devices, linear_weights, native
from rhlens.engine.hooks import EngineHook, HeadEditSpec, TopKeySpec, engine_hooks
from rhlens.engine.lean import lean_ok

__all__ = ["SYNC_EVERY", "CapturedDecoder", "captured_decoder", "captured_ok", "decode_path"]

F = torch.nn.functional

# The host reads the generated tokens back (one sync) every this many steps when a stop
# (EOS, newline) is checked; the steps run past a stop are discarded.
SYNC_EVERY = 4

_ACTIVATIONS = ("SiLUActivation", "SiLU")


# ---------------------------------------------------------------------------------------
# When the captured step applies
# ---------------------------------------------------------------------------------------
def _points(block) -> tuple:
    """(hook_pattern, hook_q, hook_z) of a block's attention: the points the step can serve."""
    attn = block.attn
    return attn.hook_pattern, attn.q.hook_out, attn.o.hook_in


def _decode_hooks(point) -> list[EngineHook] | None:
    """The EngineHooks on ``point`` that act at decode steps; ``None`` if any hook there is not
    an EngineHook."""
    if not point.has_hooks():
        return []
    hooks = engine_hooks(point)
    return None if hooks is None else [h for h in hooks if h.acts_in("decode")]


def captured_ok(model) -> bool:
    """Whether the captured step computes this model's decode with the hooks attached now
    (call where :func:`~rhlens.engine.lean.lean_ok` holds): a plain rotary embedding, SiLU
    MLPs, and on the attention hook points only EngineHooks whose spec the step runs
    (:class:`TopKeySpec` on ``hook_pattern``, :class:`HeadEditSpec` on ``hook_q``/``hook_z``)."""
    hf = hf_model(model)
    if family_of(hf) is not None:  # Phi-3, OLMo-2, Granite, GPT-NeoX: the lean step's adapters
        return False
    devices = layer_devices(hf, len(model.blocks))
    if devices is not None and len(set(devices)) > 1:  # a model split over devices: the lean step
        return False
    rotary = native(hf.model.rotary_emb)
    rope = str(getattr(rotary, "rope_type", "default"))
    if "dynamic" in rope or rope == "longrope":
        return False
    n_heads, _, head_dim = attention_shape(hf)
    for block in model.blocks:
        mlp = native(block.original_component.mlp)
        if not hasattr(mlp, "gate_proj"):  # a mixture of experts: moe_post_attention, where it applies
            if moe_block(mlp, next(hf.parameters()).device) is None:
                return False
        elif type(native(mlp.act_fn)).__name__ not in _ACTIVATIONS:
            return False
        pattern, q, z = _points(block)
        for point, kind in ((pattern, TopKeySpec), (q, HeadEditSpec), (z, HeadEditSpec)):
            hooks = _decode_hooks(point)
            if hooks is None or not all(isinstance(h.spec, kind) for h in hooks):
                return False
            for h in hooks:
                if kind is HeadEditSpec and (tuple(h.spec.heads.shape) != (n_heads,) or (
                        h.spec.fill is not None and tuple(h.spec.fill.shape) != (n_heads, head_dim))):
                    return False
        # Every other hook point of the attention must be free (lean_ok let them be hooked).
        served = {id(p) for p in _points(block)}
        if any(p.has_hooks() and id(p) not in served for p in LeanAttention.hook_points(block.attn)):
            return False
    return True


def decode_path(model, wanted: str) -> str:
    """The decode step a run of ``model`` takes with the hooks attached now: ``wanted``
    (``"captured"``, ``"lean"``, ``"bridge"``) or the next slower one that applies."""
    if wanted == "bridge" or not lean_ok(model):
        return "bridge"
    if wanted == "lean":
        return "lean"
    return "captured" if captured_ok(model) else "lean"


# ---------------------------------------------------------------------------------------
# The step's functions (module level, so that torch.compile compiles each once)
# ---------------------------------------------------------------------------------------
def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """HF's LlamaRMSNorm, operation for operation."""
    dtype = x.dtype
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(dtype)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def pre_attention(h: Tensor, ln: Tensor, eps: float, wq: Tensor, bq: Tensor | None, wk: Tensor,
                  bk: Tensor | None, wv: Tensor, bv: Tensor | None, qn: Tensor | None, kn: Tensor | None,
                  qk_eps: float, cos: Tensor, sin: Tensor,
                  q_keep: Tensor | None, q_fill: Tensor | None, n_heads: int,
                  head_dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """``[rows, 1, d_model]`` -> rotated q ``[rows, h, 1, d]``, rotated k and v ``[rows, kv, 1, d]``.
    ``qn``/``kn``: Qwen3's per-head q/k RMSNorm weights (``None``: none)."""
    x = rms_norm(h, ln, eps)
    q = F.linear(x, wq, bq)
    if q_keep is not None:  # ablate_heads' hook_q edit
        q = torch.addcmul(q_fill, q, q_keep)
    k = F.linear(x, wk, bk)
    v = F.linear(x, wv, bv)
    rows = h.shape[0]
    q = q.view(rows, 1, -1, head_dim).transpose(1, 2)
    k = k.view(rows, 1, -1, head_dim).transpose(1, 2)
    v = v.view(rows, 1, -1, head_dim).transpose(1, 2)
    if qn is not None:  # Qwen3: each head's query and key normalised before the rotation
        q, k = rms_norm(q, qn, qk_eps), rms_norm(k, kn, qk_eps)
    qk = torch.cat((q, k), dim=1)  # HF's apply_rotary_pos_emb, element for element
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    qk = (qk * cos) + (_rotate_half(qk) * sin)
    return qk[:, :n_heads], qk[:, n_heads:], v


def post_attention(h: Tensor, z: Tensor, z_keep: Tensor | None, z_fill: Tensor | None, wo: Tensor,
                   bo: Tensor | None, ln: Tensor, eps: float, wg: Tensor, bg: Tensor | None,
                   wu: Tensor, bu: Tensor | None, wd: Tensor, bd: Tensor | None) -> Tensor:
    """The residual stream after o_proj and the MLP (``z``: ``[rows, 1, h * d]``)."""
    if z_keep is not None:  # ablate_heads' hook_z edit
        z = torch.addcmul(z_fill, z, z_keep)
    h = h + F.linear(z, wo, bo)
    x = rms_norm(h, ln, eps)
    return h + F.linear(F.silu(F.linear(x, wg, bg)) * F.linear(x, wu, bu), wd, bd)


def moe_post_attention(h: Tensor, z: Tensor, z_keep: Tensor | None, z_fill: Tensor | None, wo: Tensor,
                       bo: Tensor | None, ln: Tensor, eps: float, block: Callable) -> Tensor:
    """:func:`post_attention` with a mixture-of-experts MLP (Mixtral, Qwen3-MoE) in the place of
    the dense one: the HF block's own forward (its router: top-k experts per token; its experts,
    under transformers' ``grouped_mm`` implementation device ops only, no host sync), one row at
    a time so that a row's experts round as alone. Not compiled: HF's code as it runs."""
    if z_keep is not None:  # ablate_heads' hook_z edit
        z = torch.addcmul(z_fill, z, z_keep)
    h = h + F.linear(z, wo, bo)
    x = rms_norm(h, ln, eps)
    out = block(x) if x.shape[0] == 1 else torch.cat([block(x[r:r + 1]) for r in range(x.shape[0])])
    return h + out


def moe_block(mlp: torch.nn.Module, device: torch.device) -> Callable | None:
    """The forward of a Mixtral or Qwen3-MoE block that :func:`moe_post_attention` may run in a
    captured step on ``device`` (on CUDA: experts under ``grouped_mm``, whose routing needs no
    host sync; transformers' eager loop over the hit experts syncs); ``None`` for others."""
    if type(mlp).__name__ not in _MOE_BLOCKS:
        return None
    experts = native(getattr(mlp, "experts", None))
    if experts is None or type(native(getattr(mlp, "gate", None))).__name__ not in _MOE_ROUTERS:
        return None
    impl = getattr(getattr(experts, "config", None), "_experts_implementation", None) or "eager"
    if device.type == "cuda" and impl != "grouped_mm":
        return None
    return getattr(mlp, "_old_forward", None) or mlp.forward


_MOE_BLOCKS = ("MixtralSparseMoeBlock", "Qwen3MoeSparseMoeBlock")
_MOE_ROUTERS = ("MixtralTopKRouter", "Qwen3MoeTopKRouter")


def head(h: Tensor, ln: Tensor, eps: float, w: Tensor, b: Tensor | None) -> Tensor:
    return F.linear(rms_norm(h, ln, eps), w, b)


@functools.cache
def _compiled(fn: Callable) -> Callable:
    options = {}
    from torch._inductor import config as inductor

    if hasattr(inductor, "emulate_precision_casts"):
        # round where eager rounds (each bf16 intermediate HF's ops produce), not only at the end
        # of a fused kernel: the compiled step's numbers stay near the lean step's
        options["emulate_precision_casts"] = True
    return torch.compile(fn, dynamic=False, fullgraph=True, options=options)


def _clear_cublas_workspaces() -> None:
    """Drop cuBLAS's cached workspaces (the next product on each stream allocates its own)."""
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None:
        clear()


# ---------------------------------------------------------------------------------------
# The decoder
# ---------------------------------------------------------------------------------------
@dataclass
class _Static:
    """The tensors one captured step reads and writes (their addresses are the graph's)."""

    rows: int
    padded: int
    block: int
    keys: int
    steps: int
    tok: Tensor  # [padded] the token each row feeds
    pos: Tensor  # [1] absolute position of the fed token
    step: Tensor  # [1] index of the running step
    key_idx: Tensor  # [keys]
    out: Tensor  # [steps, rows] generated tokens
    z: Tensor  # [padded, 1, h * d] attention outputs (padding rows stay zero)
    top: Tensor | None  # [layers, rows, heads] this step's top keys
    top_log: Tensor | None  # [steps, layers, rows, heads] every step's, copied to the recorders after
    q_edit: tuple[Tensor, Tensor] | None  # ([layers, h * d] keep, fill)
    z_edit: tuple[Tensor, Tensor] | None
    graph: object = None
    stepped: bool = False  # the first step ran (on CUDA: the graph is captured after it)


class CapturedDecoder:
    """Greedy decode of a batch of prompts on the captured step (see the module's doc).

    ``decode(k, v, rows, n_prompt, last, max_new, on_tokens)`` runs up to ``max_new`` steps
    on the KV buffers ``k``/``v`` (one ``[rows_alloc, kv, capacity, d]`` tensor per layer,
    prompt bodies prefilled in rows ``[:rows]``); ``on_tokens(new)`` gets each read-back batch
    of tokens (``[steps][rows]``) and returns True when every row has stopped.

    A KV layout other than one buffer per layer is served by a subclass overriding
    :meth:`_write_kv` (where a step's keys and values go) and :meth:`_attend` (what each query
    head attends over): :class:`rhlens.compress.packed.PackedDecoder`.
    """

    # KernelPolicy (rhlens.engine.policy) is named, not imported: the policy imports the steps.
    def __init__(self, model, policy: KernelPolicy) -> None:  # noqa: F821
        hf = hf_model(model)
        inner = hf.model
        self.policy = policy  # no reference to the model: the cache below is keyed by it, weakly
        param = next(hf.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.n_heads, self.n_kv, self.head_dim = attention_shape(hf)
        self.groups = self.n_heads // self.n_kv
        self.embed = native(inner.embed_tokens)
        self.rotary = native(inner.rotary_emb)
        norm = native(inner.norm)
        self.norm = (norm.weight, float(norm.variance_epsilon))
        self.lm = linear_weights(hf.lm_head)
        self.points = [_points(block) for block in model.blocks]
        self.layers = []
        self.moe_layers: set[int] = set()  # layers whose MLP is a mixture of experts
        for block in model.blocks:
            layer = block.original_component
            attn = block.attn.original_component
            mlp = native(layer.mlp)
            ln1, ln2 = native(layer.input_layernorm), native(layer.post_attention_layernorm)
            qn, kn = (native(n) if n is not None else None
                      for n in (getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)))
            moe = (moe_block(mlp, self.device),) if not hasattr(mlp, "gate_proj") else None
            if moe is not None:
                self.moe_layers.add(len(self.layers))
            self.layers.append((
                (ln1.weight, float(ln1.variance_epsilon), *linear_weights(attn.q_proj),
                 *linear_weights(attn.k_proj), *linear_weights(attn.v_proj),
                 qn.weight if qn is not None else None, kn.weight if kn is not None else None,
                 float(qn.variance_epsilon) if qn is not None else 0.0),
                (*linear_weights(attn.o_proj), ln2.weight, float(ln2.variance_epsilon),
                 *(moe if moe is not None else (*linear_weights(mlp.gate_proj), *linear_weights(mlp.up_proj),
                                                *linear_weights(mlp.down_proj)))),
                float(getattr(attn, "scaling", self.head_dim ** -0.5))))
        fns = (pre_attention, post_attention, head)
        self.compiled = bool(policy.compile)
        if self.compiled:
            fns = tuple(_compiled(fn) for fn in fns)
        self._pre, self._post, self._head = fns
        self._moe_post = moe_post_attention  # HF's MoE block inside: never compiled
        self.capture = self.device.type == "cuda"
        self._graphs: dict[tuple, _Static] = {}
        self._pool = None
        self.last_path = "captured" if self.capture else "static"

    # -- what the hooks ask for --------------------------------------------------------
    def _specs(self) -> tuple[list[list[TopKeySpec]], list[list[HeadEditSpec]], list[list[HeadEditSpec]]]:
        tops, qs, zs = [], [], []
        for points in self.points:
            got = [[h.spec for h in (_decode_hooks(p) or [])] for p in points]
            tops.append(got[0])
            qs.append(got[1])
            zs.append(got[2])
        return tops, qs, zs

    def _edit_values(self, specs: list[list[HeadEditSpec]]) -> tuple[Tensor, Tensor]:
        """Per layer ``keep`` (0 for an edited head) and ``fill`` (its new values), flat
        ``[layers, h * d]`` in the model's dtype; later edits win where two overlap."""
        n, d = self.n_heads, self.head_dim
        keep = torch.ones(len(specs), n, 1, dtype=self.dtype, device=self.device)
        fill = torch.zeros(len(specs), n, d, dtype=self.dtype, device=self.device)
        for layer, edits in enumerate(specs):
            for spec in edits:
                heads = spec.heads.to(self.device).view(n, 1)
                keep[layer].masked_fill_(heads, 0)
                new = (spec.fill.to(device=self.device, dtype=self.dtype) if spec.fill is not None
                       else torch.zeros(n, d, dtype=self.dtype, device=self.device))
                fill[layer] = torch.where(heads, new, fill[layer])
        return keep.expand(-1, -1, d).reshape(len(specs), n * d).contiguous(), fill.reshape(len(specs), n * d)

    # -- the step ------------------------------------------------------------------------
    def _step(self, st: _Static, k_bufs: Sequence[Tensor], v_bufs: Sequence[Tensor]) -> None:
        B, P, blk, C = st.rows, st.padded, st.block, st.keys
        d, n = self.head_dim, self.n_heads
        policy = self.policy
        h = self.embed(st.tok.view(P, 1))  # [P, 1, d_model]
        cos, sin = self.rotary(h, st.pos.view(1, 1))
        split = policy.av == "split" and policy.split_from <= C
        invalid = st.key_idx > st.pos  # keys not written yet
        for li, (pre_w, post_w, scaling) in enumerate(self.layers):
            kb, vb = k_bufs[li], v_bufs[li]
            q_keep = q_fill = z_keep = z_fill = None
            if st.q_edit is not None:
                q_keep, q_fill = st.q_edit[0][li], st.q_edit[1][li]
            if st.z_edit is not None:
                z_keep, z_fill = st.z_edit[0][li], st.z_edit[1][li]
            parts = []
            for s0 in range(0, P, blk):
                hb = h[s0:s0 + blk]
                q, k, v = self._pre(hb, *pre_w, cos, sin, q_keep, q_fill, n, d)
                real = min(B, s0 + blk) - s0
                if real > 0:
                    self._write_kv(st, li, s0, real, k, v, kb, vb)
                    self._attend(st, li, s0, real, q, kb, vb, scaling, split, invalid)
                post = self._moe_post if li in self.moe_layers else self._post
                parts.append(post(hb, st.z[s0:s0 + blk], z_keep, z_fill, *post_w))
            h = parts[0] if len(parts) == 1 else torch.cat(parts)
        logits = [self._head(h[s0:s0 + blk], *self.norm, *self.lm) for s0 in range(0, P, blk)]
        logits = logits[0] if len(logits) == 1 else torch.cat(logits)
        nxt = logits[:B, -1].argmax(-1)  # [B]
        st.out.index_copy_(0, st.step, nxt.view(1, B))
        st.tok[:B].copy_(nxt)
        if st.top_log is not None:
            st.top_log.index_copy_(0, st.step, st.top.unsqueeze(0))
        st.pos += 1
        st.step += 1

    def _write_kv(self, st: _Static, li: int, s0: int, real: int, k: Tensor, v: Tensor, kb: Tensor,
                  vb: Tensor) -> None:
        """This step's keys and values ``k, v [block, kv, 1, d]`` of rows ``s0 .. s0 + real``
        written into layer ``li``'s buffers ``kb, vb [rows, kv, capacity, d]`` at ``st.pos``."""
        kb[s0:s0 + real].index_copy_(2, st.pos, k[:real])
        vb[s0:s0 + real].index_copy_(2, st.pos, v[:real])

    def _attend(self, st: _Static, li: int, s0: int, real: int, q: Tensor, kb: Tensor, vb: Tensor,
                scaling: float, split: bool, invalid: Tensor) -> None:
        """Rows ``s0 .. s0 + real`` of a block attend over their first ``st.keys`` keys; the
        outputs go to ``st.z``. The products run row by row (a GEMM's kernel, and so its
        rounding, depends on its batch size); the masking, softmax and argmax are row-wise
        kernels, run once for the rows together."""
        kv, g, d, n, C = self.n_kv, self.groups, self.head_dim, self.n_heads, st.keys
        keys_first = self.policy.keys_first
        parts = []
        for r in range(real):
            keys = kb[s0 + r:s0 + r + 1, :, :C]  # [1, kv, C, d]
            if g == 1:
                parts.append(torch.matmul(q[r:r + 1], keys.transpose(-2, -1)))  # [1, h, 1, C]
                continue
            qg = q[r:r + 1].reshape(1, kv, g, d)
            parts.append(torch.matmul(keys, qg.transpose(-2, -1)) if keys_first  # [1, kv, C, g]
                         else torch.matmul(qg, keys.transpose(-2, -1)))  # [1, kv, g, C]
        scores = parts[0] if real == 1 else torch.cat(parts)
        if g > 1 and keys_first:
            scores = scores.transpose(-2, -1)
        scores = scores.reshape(real, n, 1, C) * scaling
        scores = scores.masked_fill(invalid, float("-inf"))
        weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(self.dtype)
        if st.top is not None:
            torch.argmax(weights[:, :, -1], dim=-1, out=st.top[li, s0:s0 + real])
        weights = weights.reshape(real, kv, g, C)
        if split and self.policy.rows == "slab" and 2 * self.policy.av_block <= C:
            # The blocked product for the block's rows at once: it rounds each row as alone (on
            # an H100 at all 141 key counts tried, 1K-33K, as LeanAttention's slab mode relies
            # on), and one launch reads the rows' values at a far better rate than one a row.
            out = split_av(weights, vb[s0:s0 + real, :, :C], self.policy.av_block)
        else:
            outs = []
            for r in range(real):
                w, values = weights[r:r + 1], vb[s0 + r:s0 + r + 1, :, :C]
                outs.append(split_av(w, values, self.policy.av_block) if split else torch.matmul(w, values))
            out = outs[0] if real == 1 else torch.cat(outs)  # [real, kv, g, d]
        st.z[s0:s0 + real].copy_(out.reshape(real, n, 1, d).transpose(1, 2).reshape(real, 1, n * d))

    # -- one decode ----------------------------------------------------------------------
    def _static(self, rows: int, keys: int, steps: int, k_bufs, v_bufs, tops, qs, zs) -> _Static:
        mode = self.policy.batch_mode(rows)
        block = self.policy.slab if mode == "slab" else 1 if mode == "row" else rows
        padded = -(-rows // block) * block
        record = any(tops)
        # What the graph's kernels point at besides its own tensors: the KV buffers.
        key = (rows, keys, steps, record, any(qs), any(zs),
               tuple(t.data_ptr() for t in (*k_bufs, *v_bufs)), tuple(k_bufs[0].stride()))
        st = self._graphs.get(key)
        if st is not None:
            return st
        dev, L = self.device, len(self.layers)
        st = _Static(
            rows=rows, padded=padded, block=block, keys=keys, steps=steps,
            tok=torch.zeros(padded, dtype=torch.long, device=dev),
            pos=torch.zeros(1, dtype=torch.long, device=dev),
            step=torch.zeros(1, dtype=torch.long, device=dev),
            key_idx=torch.arange(keys, device=dev),
            out=torch.full((steps, rows), -1, dtype=torch.long, device=dev),
            z=torch.zeros(padded, 1, self.n_heads * self.head_dim, dtype=self.dtype, device=dev),
            top=torch.zeros(L, rows, self.n_heads, dtype=torch.long, device=dev) if record else None,
            top_log=(torch.zeros(steps, L, rows, self.n_heads, dtype=torch.long, device=dev)
                     if record else None),
            q_edit=self._edit_values(qs) if any(qs) else None,
            z_edit=self._edit_values(zs) if any(zs) else None)
        # One set of graphs per KV layout: buffers of another layout are another run's.
        kept = {k: v for k, v in self._graphs.items() if k[-2:] == key[-2:]}
        if self._graphs and not kept:
            # The graphs sharing the memory pool are gone, and with them the pool: the next
            # capture needs a new one (the allocator refuses to share a pool nobody holds).
            self._pool = None
        self._graphs = kept
        self._graphs[key] = st
        return st

    def _check(self, tops, rows: int, steps: int) -> bool:
        """Whether every recorder buffer holds these rows and steps on this device (else the
        lean step runs, where the recorder refuses with a clear error)."""
        for specs in tops:
            for spec in specs:
                buf = spec.buffer
                if (buf.device != self.device or buf.dtype != torch.long or buf.ndim != 4
                        or buf.shape[0] < steps or buf.shape[2] < rows or buf.shape[3] != self.n_heads
                        or not 0 <= spec.layer < buf.shape[1]):
                    return False
        return True

    def applies(self, rows: int, steps: int) -> bool:
        return self._check(self._specs()[0], rows, steps)

    @torch.no_grad()
    def decode(self, k_bufs: Sequence[Tensor], v_bufs: Sequence[Tensor], rows: int, n_prompt: int,
               last: Sequence[int], max_new: int, on_tokens: Callable[[list[list[int]]], bool],
               check_every: int | None = SYNC_EVERY,
               on_step: Callable[[], None] | None = None) -> int:
        """Decode; returns the number of steps run (``check_every=None``: no stop to check,
        one read-back at the end). ``on_step()``: called on the host after each step is
        launched (a progress bar), with no sync: it runs ahead of the device by at most
        ``check_every`` steps."""
        keys = -(-(n_prompt - 1 + max_new) // self.policy.bucket) * self.policy.bucket
        if keys > k_bufs[0].shape[2]:
            raise RuntimeError("rhlens: the KV buffers are shorter than the captured step's keys "
                               "(engine bug)")
        tops, qs, zs = self._specs()
        st = self._static(rows, keys, max_new, k_bufs, v_bufs, tops, qs, zs)
        # Per-run values: the inputs, the counters, the masks; keys past the prompt zeroed (a
        # masked key still meets its value in pattern @ V, where 0 * NaN would be NaN).
        st.tok.zero_()
        st.tok[:rows].copy_(torch.as_tensor(list(last), dtype=torch.long), non_blocking=True)
        st.pos.fill_(n_prompt - 1)
        st.step.zero_()
        if st.q_edit is not None:
            for dst, src in zip(st.q_edit, self._edit_values(qs)):
                dst.copy_(src)
        if st.z_edit is not None:
            for dst, src in zip(st.z_edit, self._edit_values(zs)):
                dst.copy_(src)
        for t in (*k_bufs, *v_bufs):
            t[:rows, :, n_prompt - 1:keys].zero_()
        done = 0
        while done < max_new:
            n = max_new - done if check_every is None else min(check_every, max_new - done)
            for _ in range(n):
                self._advance(st, k_bufs, v_bufs)
                if on_step is not None:
                    on_step()
            new = st.out[done:done + n].tolist()  # the one host sync of these n steps
            done += n
            if on_tokens(new):
                break
        for li, specs in enumerate(tops):  # the recorders' buffers get what their hooks would write
            for spec in specs:
                spec.buffer[:done, spec.layer, :rows] = st.top_log[:done, li]
        return done

    def _uncompile(self, exc: Exception) -> None:
        """``torch.compile`` failed here (no compiler, an unsupported op): the step's plain
        functions from now on, said in a warning and in :attr:`last_path`."""
        import warnings

        warnings.warn(f"rhlens: torch.compile failed for the captured decode step ({type(exc).__name__}: "
                      f"{str(exc)[:200]}); running it uncompiled", stacklevel=3)
        self._pre, self._post, self._head = pre_attention, post_attention, head
        self.compiled = False
        self.last_path += " (uncompiled: compile failed)"

    def _first_step(self, st: _Static, k_bufs, v_bufs) -> None:
        """The first step of a new static set, eagerly (under ``KernelPolicy.compile``: compiling)."""
        if not self.compiled:
            self._step(st, k_bufs, v_bufs)
            return
        pos, step = st.pos.clone(), st.step.clone()
        try:
            self._step(st, k_bufs, v_bufs)
        except Exception as exc:  # torch._dynamo / inductor errors: run the step uncompiled
            if isinstance(exc, torch.OutOfMemoryError) or (
                    "dynamo" not in type(exc).__module__ and "inductor" not in type(exc).__module__
                    and not isinstance(exc, (RuntimeError, ImportError, OSError))):
                raise  # out of memory is not a compile failure
            self._uncompile(exc)
            st.pos.copy_(pos)  # the failed step may have moved the counters
            st.step.copy_(step)
            self._step(st, k_bufs, v_bufs)

    def _advance(self, st: _Static, k_bufs, v_bufs) -> None:
        if st.graph is not None:
            st.graph.replay()
            return
        if not self.capture:
            if not st.stepped:
                st.stepped = True
                self._first_step(st, k_bufs, v_bufs)
                return
            self._step(st, k_bufs, v_bufs)
            return
        # The first step runs eagerly on a side stream (it warms up cuBLAS handles and, under
        # KernelPolicy.compile, compiles); the next is captured, without running, and replayed.
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self._first_step(st, k_bufs, v_bufs)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        try:
            # cuBLAS keeps one workspace per (handle, stream), allocated on first use and freed
            # by anyone who clears the workspaces (torch.compile's CUDA graphs do, around every
            # recording: HF's compiled static-cache generate). A graph captured on a workspace
            # allocated before the capture would keep writing to it after it is freed, into
            # memory that is someone else's or unmapped (issue 26: an illegal memory access on
            # a later replay). Cleared before, the capture allocates its workspace in the
            # graph's own pool, which lives as long as the graph; cleared after, no eager
            # product uses the pool's memory.
            _clear_cublas_workspaces()
            with torch.cuda.graph(graph, pool=self._pool):
                self._step(st, k_bufs, v_bufs)
        except RuntimeError as exc:  # a kernel that cannot be captured here: stay eager
            import warnings

            warnings.warn(f"rhlens: the decode step could not be captured ({exc}); running it eagerly",
                          stacklevel=2)
            self.capture = False
            self.last_path = "static"
            return
        finally:
            _clear_cublas_workspaces()
        st.graph = graph

    def crop(self, steps_run: int, n_steps: Sequence[int]) -> None:
        """Forget what the steps past each row's stop recorded (row ``r`` made ``n_steps[r]``
        tokens; ``steps_run`` steps ran)."""
        for specs in self._specs()[0]:
            for spec in specs:
                for r, n in enumerate(n_steps):
                    if n < steps_run:
                        spec.buffer[n:steps_run, spec.layer, r] = -1


_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def forget_decoders(hf: torch.nn.Module) -> None:
    """Drop the captured steps (and their graphs) kept for the HF model ``hf``."""
    _DECODERS.pop(hf, None)


def _weights(hf: torch.nn.Module) -> tuple[int, ...]:
    return tuple(p.data_ptr() for p in hf.parameters())


def captured_decoder(model, policy: KernelPolicy) -> CapturedDecoder:  # noqa: F821
    """The model's :class:`CapturedDecoder` for ``policy`` (a resolved policy), kept with the
    model so that its graphs serve later runs on buffers at the same addresses; made anew
    when the weights moved."""
    hf = hf_model(model)
    mine = _DECODERS.setdefault(hf, {})
    fingerprint = _weights(hf)
    got = mine.get(policy)
    if got is None or got[0] != fingerprint:
        mine.clear()  # one decoder per model: its graphs hold device memory
        got = mine[policy] = (fingerprint, CapturedDecoder(model, policy))
    return got[1]
