"""The fast runner of one pair's z patches: exact patching batched per layer, and attribution patching.

Cost, and why it is built this way:

* every forward runs through HF's SDPA attention (:func:`rhlens.engine.native_attention`);
  no O(n²) attention pattern is ever allocated, and the logits are kept only at the answer
  positions (``logits_to_keep``);
* the source run's cache holds ``hook_z`` of the patched layers only, and with
  ``positions="answer"`` only at the answer positions;
* ``positions="answer"``: the patch cannot change anything before the answer position, so the
  target prompt up to there is prefilled once into a KV cache and each patched copy runs
  just the few answer tokens on top of it (exact patching of long contexts is cheap);
* ``positions="all"``: copies that patch layer ``L`` share layers ``0..L-1`` with the
  unpatched run, so the batch runs those layers once and is widened to one copy per head at
  ``blocks.{L}.hook_in``;
* ``mode="attribution"`` (Nanda's attribution patching) replaces the per-head runs by one
  forward and one backward per pair: effect ≈ grad(metric) · (z_source − z_target), summed
  over the patched positions.

The patch itself is TransformerLens' ``layer_head_vector_patch_setter``. TransformerLens'
``generic_activation_patch`` runs one full bridge forward with full logits per head, which is
what the above avoids; the tests check that both agree.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping, Sequence

import einops
import torch
from jaxtyping import Float
from torch import Tensor

from rhlens.engine import hf_model, native_attention
from rhlens.errors import ConfigError
from rhlens.patching.config import PatchConfig, pair_metric, run_length
from rhlens.patching.pairs import PatchPair

__all__ = ["PairRunner"]


@contextlib.contextmanager
def _frozen(module: torch.nn.Module) -> Iterator[None]:
    """No weight gradients: attribution needs d metric / d z only, and frozen weights keep
    autograd from saving every layer's input for weight gradients."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


# ---------------------------------------------------------------------------------------
# Running one pair
# ---------------------------------------------------------------------------------------
class PairRunner:
    """The forward passes of one pair: capture the source, run the (patched) target."""

    def __init__(self, model, pair: PatchPair, config: PatchConfig) -> None:
        self.model, self.hf, self.pair, self.config = model, hf_model(model), pair, config
        self.device = next(self.hf.parameters()).device
        self.end = run_length(pair, config.metric)
        self.n_keep = self.end - pair.answer_pos
        denoise = config.direction == "denoise"
        self.target = (pair.corrupted_ids if denoise else pair.clean_ids)[:self.end]
        self.source = (pair.clean_ids if denoise else pair.corrupted_ids)[:self.end]
        self.segment = config.positions == "answer"
        # The patched positions are always the last n_src ones of whatever z a hook sees:
        # the whole prompt (all), the answer positions of a full run or the cached segment.
        self.n_src = self.n_keep if self.segment else self.end
        self._prefix = None

    def _ids(self, ids: Sequence[int]) -> Tensor:
        return torch.tensor([list(ids)], dtype=torch.long, device=self.device)

    def _forward(self, x: Tensor, hooks: list, cache=None) -> Tensor:
        ctx = self.model.hooks(fwd_hooks=hooks) if hooks else contextlib.nullcontext()
        with ctx, native_attention(self.model):
            return self.hf(input_ids=x, past_key_values=cache, use_cache=cache is not None,
                           logits_to_keep=self.n_keep).logits

    @torch.no_grad()
    def capture(self, layers: Sequence[int]) -> tuple[float, dict[int, Tensor]]:
        """The source run's metric and its ``z`` at the patched positions of ``layers``."""
        zs: dict[int, Tensor] = {}

        def make(layer: int):
            def hook(z: Float[Tensor, "batch pos head d_head"], hook=None):
                zs[layer] = z[:, z.shape[1] - self.n_src:].detach().clone()

            return hook

        hooks = [(f"blocks.{layer}.attn.hook_z", make(layer)) for layer in layers]
        logits = self._forward(self._ids(self.source), hooks)
        return float(pair_metric(logits, self.pair, self.config.metric)[0]), zs

    def prefix_cache(self):
        """KV cache of the target up to the answer position, computed once."""
        if self._prefix is None:
            from transformers import DynamicCache

            cache = DynamicCache(config=self.hf.config)
            a = self.pair.answer_pos
            if a > 0:
                with torch.no_grad(), native_attention(self.model):
                    self.hf(input_ids=self._ids(self.target[:a]), past_key_values=cache,
                            use_cache=True, logits_to_keep=1)
            self._prefix = cache
        return self._prefix

    def _patch_hook(self, layer: int, items: list[tuple[int, list[int]]], src: Tensor):
        from transformer_lens.patching import layer_head_vector_patch_setter

        def hook(z: Float[Tensor, "batch pos head d_head"], hook=None):
            z = z.clone()  # never write into a tensor another hook may hold
            tail = z[:, z.shape[1] - self.n_src:]  # a view: the setter writes through it
            source = src.to(device=z.device, dtype=z.dtype)
            for copy_idx, heads in items:
                layer_head_vector_patch_setter(tail[copy_idx:copy_idx + 1], [layer, heads], source)
            return z

        return hook

    @torch.no_grad()
    def run(self, patches: Sequence[Mapping[int, Sequence[int]]],
            src: Mapping[int, Tensor]) -> Float[Tensor, " copy"]:
        """The metric of one target run per entry of ``patches`` ({layer: heads} each)."""
        k = len(patches)
        layers = sorted({layer for p in patches for layer in p})
        hooks = []
        for layer in layers:
            items = [(j, list(p[layer])) for j, p in enumerate(patches) if layer in p]
            hooks.append((f"blocks.{layer}.attn.hook_z", self._patch_hook(layer, items, src[layer])))
        # Copies are identical below the first patched layer: run those layers once and
        # widen the batch to one copy per patch at that layer's input.
        first = layers[0] if layers else 0
        widen = (f"blocks.{first}.hook_in",
                 lambda t, hook=None: einops.repeat(t, "one pos d -> (copy one) pos d", copy=k))
        if self.segment:
            cache = copy.deepcopy(self.prefix_cache())  # the run appends to it
            x = self._ids(self.target[self.pair.answer_pos:])
            per_layer = getattr(cache, "layers", None)
            if k > 1 and per_layer is not None and len(per_layer) == int(self.model.cfg.n_layers):
                for layer_cache in per_layer[first:]:  # only the widened layers need k copies
                    layer_cache.batch_repeat_interleave(k)
                hooks.insert(0, widen)
            elif k > 1:
                cache.batch_repeat_interleave(k)
                x = x.expand(k, -1)
            logits = self._forward(x, hooks, cache)
        else:
            if k > 1:
                hooks.insert(0, widen)
            logits = self._forward(self._ids(self.target), hooks)
        return pair_metric(logits, self.pair, self.config.metric).float().cpu()

    def attribution(self, layers: Sequence[int], src: Mapping[int, Tensor],
                    n_heads: int) -> tuple[float, Float[Tensor, "layer head"]]:
        """Target metric and grad · (z_source − z_target) per head of ``layers``."""
        deltas: dict[int, Tensor] = {}
        ztgt: dict[int, Tensor] = {}

        def make(layer: int):
            def hook(z: Float[Tensor, "batch pos head d_head"], hook=None):
                cut = z.shape[1] - self.n_src
                # A zero leaf added to z: its gradient is the metric's total derivative with
                # respect to this z, through every later layer.
                delta = torch.zeros_like(z[:, cut:], requires_grad=True)
                deltas[layer], ztgt[layer] = delta, z[:, cut:].detach()
                return torch.cat([z[:, :cut], z[:, cut:] + delta], dim=1)

            return hook

        hooks = [(f"blocks.{layer}.attn.hook_z", make(layer)) for layer in layers]
        cache = copy.deepcopy(self.prefix_cache()) if self.segment else None
        with torch.enable_grad(), _frozen(self.hf):
            if self.segment:
                x = self._ids(self.target[self.pair.answer_pos:])
                logits = self._forward(x, hooks, cache)
            else:
                logits = self._forward(self._ids(self.target), hooks)
            value = pair_metric(logits, self.pair, self.config.metric)[0]
            grads = torch.autograd.grad(value, [deltas[layer] for layer in layers])
        attr = torch.stack([
            einops.reduce(g * (src[layer].to(g.dtype) - ztgt[layer]),
                          "batch pos head d_head -> head", "sum")
            for layer, g in zip(layers, grads)
        ]).float().cpu()
        if attr.shape[1] != n_heads:  # pragma: no cover - bridge invariant
            raise ConfigError(f"hook_z has {attr.shape[1]} heads, the model {n_heads}")
        return float(value.detach()), attr

