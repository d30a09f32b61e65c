"""One decode pass, several reductions: each head's top-1 key (copy) and its attention mass on a span.

:class:`AnswerRecorder` composes :class:`rhlens.retrieval.TopKeyRecorder` (its hooks, its
buffer, its copy rule downstream) with a second read-only hook per layer that writes, at
every decode step, the softmax weight each head puts on a span of keys (the needle's answer,
by default): ``mass[step, layer, row, head]``. Both hooks are
:class:`~rhlens.engine.EngineHook` s with ``phase="decode", reads_only=True``, so the engine
keeps its fast paths (plain HF prefill, the lean decode step) and nothing is synced to the
host during the answer. Probes decoded together have different spans: :meth:`AnswerRecorder.begin`
assigns the next batch row a span (call it from ``generate_many``'s ``on_start``, which runs
for each prompt of a batch, in row order, before the batch is decoded).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from rhlens.engine import EngineHook, StepState, current_phase, current_step
from rhlens.errors import ConfigError
from rhlens.retrieval import TopKeyRecorder

__all__ = ["AnswerRecorder", "span_mass"]


def span_mass(attention: Float[Tensor, "... key"], span: tuple[int, int],
              offset: int = 0) -> Float[Tensor, "..."]:
    """The weight ``attention`` rows put on the keys at absolute positions ``[start, end)``;
    key index ``k`` is absolute position ``offset + k`` (a sliding cache drops early keys)."""
    start, end = span
    lo, hi = max(start - offset, 0), max(min(end - offset, attention.shape[-1]), 0)
    return (attention[..., lo:hi].float().sum(-1) if hi > lo else
        attention.new_zeros(attention.shape[:-1], dtype=torch.float32))


class AnswerRecorder:
    """Top-1 key positions and attention mass on a span, for every head at every decode step.

    ``positions(r)[:n]`` is ``[step, layer, head]`` of batch row ``r`` (what
    :class:`~rhlens.retrieval.TopKeyRecorder` records), ``mass(r)[:n]`` the same shape: the
    attention weight on row ``r``'s span at each step. Outside the engine (``model.hooks``,
    ``run_with_hooks``, a hand-written loop) every forward is one step and the row read is
    its last query, as for ``TopKeyRecorder``; set the span with :meth:`set_span`.
    """

    def __init__(self, n_layers: int, n_heads: int, max_steps: int, state: StepState | None = None,
                 device: torch.device | str = "cpu", max_batch: int = 1) -> None:
        self.top = TopKeyRecorder(n_layers, n_heads, max_steps, state, device, max_batch)
        self.n_layers, self.n_heads, self.max_steps, self.state = n_layers, n_heads, max_steps, state
        self._mass = torch.zeros(max_steps, n_layers, max_batch, n_heads, device=device)
        self._spans: list[tuple[int, int] | None] = [None] * max_batch
        self._on = torch.zeros(max_batch, 0, device=device)  # [row, absolute key]: 1 on the span
        self._rows = 0  # rows given a span since the last decode step (see begin)
        self._open = False

    # ---- spans --------------------------------------------------------------------------
    def set_span(self, span: Sequence[int], row: int = 0) -> None:
        """Measure attention on absolute key positions ``[start, end)`` for batch ``row``."""
        start, end = (int(x) for x in span)
        if not 0 <= start < end:
            raise ConfigError(f"a span is (start, end) with 0 <= start < end, got {tuple(span)}")
        if not 0 <= row < len(self._spans):
            raise ConfigError(f"the recorder holds {len(self._spans)} batch rows, got row {row}")
        self._spans[row] = (start, end)
        self._fit(end)
        self._on[row].zero_()
        self._on[row, start:end] = 1.0

    def begin(self, span: Sequence[int]) -> int:
        """Give the next row of the batch about to be decoded ``span``; returns the row.

        The rows of a batch are numbered in the order their prompts start, so calling this
        from ``generate_many``'s ``on_start`` pairs each prompt with its row."""
        if not self._open:
            self._rows, self._open = 0, True
        row = self._rows
        self.set_span(span, row)
        self._rows += 1
        return row

    def _fit(self, n_keys: int) -> None:
        if self._on.shape[1] < n_keys:
            grown = self._on.new_zeros(self._on.shape[0], max(n_keys, 2 * self._on.shape[1]))
            grown[:, :self._on.shape[1]] = self._on
            self._on = grown

    # ---- reading ------------------------------------------------------------------------
    def positions(self, row: int = 0) -> Int[Tensor, "step layer head"]:
        return self.top.row(row)

    def mass(self, row: int = 0) -> Float[Tensor, "step layer head"]:
        return self._mass[:, :, row]

    @property
    def n_steps(self) -> int:
        """Steps recorded outside the engine since the last :meth:`reset`."""
        return self.top.n_steps

    def reset(self) -> None:
        """Clear the buffers (spans stay)."""
        self.top.reset()
        self._mass.zero_()

    # ---- hooks --------------------------------------------------------------------------
    def hooks(self) -> list[tuple[str, Any]]:
        """``TopKeyRecorder``'s hooks plus one mass hook per layer (all read-only, decode-only).

        A layer's mass hook comes after its top-key hook (hooks fire in the order attached),
        so outside the engine it reads the step that hook has just counted."""
        return [*self.top.hooks(),
                *((f"blocks.{layer}.attn.hook_pattern",
                   EngineHook(self._mass_hook(layer), phase="decode", reads_only=True))
                  for layer in range(self.n_layers))]

    def _mass_hook(self, layer: int):
        def hook(pattern: Tensor, hook=None) -> None:
            B, H, Q, K = pattern.shape  # the step's query is the last one
            self._open = False  # the batch is running: the next begin() starts a new one
            state = current_step() or (self.state if current_phase() == "decode" else None)
            if state is not None:  # an engine decode step
                step, offset = state.step, state.absolute(K)
            else:  # a forward outside the engine: the one this layer's top-key hook counted
                step, offset = self.top.n_steps - 1, 0
            self._fit(offset + K)
            on = self._on[:B, offset:offset + K]  # [B, K]
            torch.sum(pattern[:, :, -1].detach().float() * on[:, None], dim=-1,
                      out=self._mass[step, layer, :B])
            return None

        return hook
