"""Head-selective cache policies run as decode-time attention masks, on any bridged model.

:class:`PolicyMask` attaches one :class:`~rhlens.engine.EngineHook` (``phase="decode"``) per
layer at ``hook_attn_scores`` and sets the scores of the keys a streaming head no longer holds
to ``-inf``: a streaming query head at absolute position ``q`` sees the keys at positions
``p < sink`` or ``p > q - window`` (its KV head's sink and its last ``window`` tokens, the one
being decoded included); a query head whose KV head is kept whole sees every key. Under
grouped-query attention every query head of a KV head gets the same mask.

Inside the engine the prompt is prefilled with full attention and the policy acts only while the
model answers: the cache is compressed after the prompt is read, as HeadKV, SnapKV and
RazorAttention do. (DuoAttention also streams its streaming heads while reading the prompt; this
does not.) Because nothing changes during the prefill, policies share a prompt's KV cache: the
engine prefills a prompt once however many policies answer it.

Outside the engine (``model.hooks``, ``run_with_hooks``, a hand-written loop) every forward is
masked, the prompt included, with key ``j`` at absolute position ``j``: that is DuoAttention's
prefill.

One mask can hold several policies, one per batch row (:meth:`PolicyMask.assign`), so that the
engine answers one prompt under several policies in one batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from rhlens.compress.policy import CacheLayout, HeadPolicy
from rhlens.engine import EngineHook, HookPair, current_phase, current_step
from rhlens.errors import ConfigError

__all__ = ["BatchItems", "PolicyMask", "policy_hooks"]


class BatchItems:
    """Which prompt each row of the engine's running batch answers: pass :meth:`on_start` to
    ``generate_many`` (called for every prompt of a batch, in row order, before it decodes)
    and read :meth:`current` from a decode hook."""

    def __init__(self) -> None:
        self.rows: list[int] = []
        self._collecting = False

    def on_start(self, index: int) -> None:
        if not self._collecting:  # the first prompt of a new batch
            self.rows, self._collecting = [], True
        self.rows.append(index)

    def current(self) -> list[int]:
        """The prompt index of each row of the batch being decoded."""
        self._collecting = False
        return self.rows


class PolicyMask:
    """Decode-time masks of ``policies``, one policy per batch row.

    With one policy every row runs it. With several, either :meth:`assign` the rows' policies
    by hand, or set ``items`` (prompt index -> policy index) and pass :meth:`on_start` to
    ``generate_many``: each row then runs its prompt's policy (how
    :func:`~rhlens.compress.sweep.compress_sweep` answers one prompt under many policies in one
    batch)::

        mask = PolicyMask(model, [retrieval, streaming])
        mask.items = {0: 0, 1: 1}
        gens = generate_many(model, tok, [ids, ids], config=GenerationConfig(batch_size=2),
                             hooks=mask.hooks(), on_start=mask.on_start)
    """

    def __init__(self, model, policies: Sequence[HeadPolicy], layout: CacheLayout | None = None) -> None:
        self.layout = layout or CacheLayout.of(model)
        self.policies = [p.check(self.layout) for p in policies]
        if not self.policies:
            raise ConfigError("a PolicyMask needs at least one policy")
        n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
        if (n_layers, n_heads) != (self.layout.n_layers, self.layout.n_heads):
            raise ConfigError("the cache layout is not this model's")
        P, H = len(self.policies), n_heads
        # [layer, policy, query head]: does this head stream under this policy?
        self.stream = torch.zeros(n_layers, P, H, dtype=torch.bool)
        for i, p in enumerate(self.policies):
            for layer in self.layout.global_layers:
                self.stream[layer, i, p.streaming_query_heads(self.layout, layer)] = True
        self.sink = torch.tensor([p.sink for p in self.policies])
        self.window = torch.tensor([p.window for p in self.policies])
        self.rows: list[int] | None = None  # None: every row runs policy 0
        self.items: dict[int, int] | None = None
        self.batch = BatchItems()
        self._on: dict[tuple, Tensor] = {}

    # ---- which row runs which policy ---------------------------------------------------
    def assign(self, rows: Sequence[int]) -> None:
        """Batch row ``r`` runs ``policies[rows[r]]``."""
        if not rows or not all(0 <= int(i) < len(self.policies) for i in rows):
            raise ConfigError(f"rows name policies 0..{len(self.policies) - 1}, got {list(rows)!r}")
        self.rows = [int(i) for i in rows]

    def on_start(self, index: int) -> None:
        """``generate_many``'s ``on_start``: prompt ``index`` runs policy ``items[index]``
        (the engine calls it for every prompt of a batch, in row order, before the batch decodes)."""
        if self.items is None:
            raise ConfigError("set PolicyMask.items (prompt index -> policy index) first")
        self.batch.on_start(index)

    # ---- the hooks -----------------------------------------------------------------------
    def hooks(self) -> list[HookPair]:
        """One pair per layer where some policy streams a head."""
        return [(f"blocks.{layer}.attn.hook_attn_scores",
                 EngineHook(self._hook(layer), phase="decode"))
                for layer in range(self.layout.n_layers) if bool(self.stream[layer].any())]

    def _on_device(self, name: str, device: torch.device, make) -> Tensor:
        """A table moved to ``device`` once (no host-to-device copy at every step)."""
        key = (name, device)
        if key not in self._on:
            self._on[key] = make().to(device)
        return self._on[key]

    def _hook(self, layer: int):
        def hook(scores: Tensor, hook=None) -> Tensor:
            # scores: [batch, head, query, key], before the softmax
            B, H, Q, N = scores.shape
            if self.items is not None:
                rows = [self.items[i] for i in self.batch.current()]
            else:
                rows = self.rows or [0]
            if len(rows) != B:
                if len(rows) != 1:
                    raise ConfigError(f"the mask holds policies for {len(rows)} rows, the model runs {B}")
                rows = rows * B
            dev = scores.device
            stream = self._on_device(f"stream{layer}", dev, lambda: self.stream[layer])  # [P, H]
            sink = self._on_device("sink", dev, lambda: self.sink)  # [P]
            window = self._on_device("window", dev, lambda: self.window)
            step = current_step() if current_phase() == "decode" else None
            n_seen = step.n_seen if step is not None else N
            kpos = torch.arange(n_seen - N, n_seen, device=dev)  # [N] absolute (a sliding cache starts later)
            qpos = torch.arange(n_seen - Q, n_seen, device=dev)  # [Q] absolute
            if len(set(rows)) == 1:
                i = rows[0]
                lo = qpos[:, None] + 1 - window[i]  # [Q, 1]: the oldest recent key each query keeps
                drop = (kpos >= sink[i]) & (kpos < lo)  # [Q, N]
                drop = stream[i][:, None, None] & drop  # [H, Q, N], broadcast over the batch
            else:
                idx = self._on_device(f"rows{tuple(rows)}", dev, lambda: torch.tensor(rows))
                lo = qpos[None, :, None] + 1 - window[idx][:, None, None]  # [B, Q, 1]
                drop = (kpos >= sink[idx][:, None, None]) & (kpos < lo)  # [B, Q, N]
                drop = stream[idx][:, :, None, None] & drop[:, None]  # [B, H, Q, N]
            return scores.masked_fill(drop, float("-inf"))

        return hook


def policy_hooks(model, policy: HeadPolicy, layout: CacheLayout | None = None) -> list[HookPair]:
    """The ``(hook name, fn)`` pairs that run ``policy`` as a decode-time mask; attach them
    with ``model.hooks(fwd_hooks=...)`` or pass them to :func:`rhlens.engine.generate`."""
    return PolicyMask(model, [policy], layout).hooks()
