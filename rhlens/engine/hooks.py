"""Phases, the step state decode hooks read, and ``EngineHook``: a TL hook that tells the engine what it does.

A hook attached to a ``TransformerBridge`` is a TransformerLens hook function ``fn(tensor,
hook=None)``; the engine calls it wherever the bridge would. Most hooks can say more about
themselves, and then the engine can take its fast paths:

* when it acts (``phase``): ``"decode"`` hooks do nothing while the engine prefills a prompt,
  so the prefill runs the plain HF modules (:func:`rhlens.engine.native.prefill`);
* that it only reads (``reads_only``): the lean decode step then calls it directly, without
  the hook point's call machinery (:mod:`rhlens.engine.attention`);
* a ``flat`` twin of a per-head edit, on the ``[batch, pos, head * d_head]`` tensor the model
  holds, which the lean step applies without reshaping to ``[batch, pos, head, d_head]``;
* a ``spec``: what the hook does, as data (:class:`TopKeySpec`: record each head's top key;
  :class:`HeadEditSpec`: overwrite some heads). The captured decode step
  (:mod:`rhlens.engine.captured`) runs a spec as tensor ops on static buffers instead of
  calling the hook, so a decode step needs no Python at all; a hook without one keeps the
  lean step.

:class:`EngineHook` carries these. Outside the engine it is an ordinary hook: it works under
``model.hooks(...)``, ``model.run_with_hooks``, the bridge's own ``generate`` and any
hand-written loop, where ``current_phase()`` is ``None`` and every phase but ``"prefill"``
(which acts only while the engine reads a prompt) acts on every forward.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from rhlens.errors import ConfigError

__all__ = ["EngineHook", "HeadEditSpec", "HookPair", "Phase", "StepState", "TopKeySpec", "current_phase",
           "current_step", "phase"]

Phase = Literal["prefill", "decode"]
HookPhase = Literal["decode", "prefill", "all"]
HookPair = tuple[str, Callable[..., Any]]
FlatEdit = Callable[[Tensor, int, int], Tensor]

_PHASE: contextvars.ContextVar[Phase | None] = contextvars.ContextVar("rhlens_phase", default=None)
_STEP: contextvars.ContextVar[StepState | None] = contextvars.ContextVar("rhlens_step", default=None)


# ---------------------------------------------------------------------------------------
# Phases and the step state
# ---------------------------------------------------------------------------------------
class StepState:
    """What decode-time hooks may read: the step index and how many tokens were seen.

    ``rows`` is the number of prompts decoded together (the hooks' batch dimension).
    """

    def __init__(self) -> None:
        self.step = -1  # index of the running decode step
        self.n_seen = 0  # tokens in the sequence including the one being fed now
        self.rows = 1
        self.on_step = None  # called with no argument after every decode step (a progress bar)
        self.on_prefill = None  # called with the tokens of every prefill chunk once it is done

    def spread(self, cost: int | float, steps: int, advance: Callable[..., None]) -> None:
        """Report a batch's ``cost`` (its prompt tokens) through ``advance`` as it runs: each
        prefill chunk by its tokens (``advance(tokens, prefill=True)``), then what is left in
        equal parts over the ``steps`` decode steps (``advance(part, share=cost / steps)``: a
        decode step's even share, for an ETA), so a bar moves during a prefill of minutes and
        never past the batch."""
        left = {"cost": float(cost), "steps": max(1, steps)}
        share = float(cost) / max(1, steps)

        def on_prefill(tokens: int) -> None:
            done = min(float(tokens), left["cost"])
            left["cost"] -= done
            advance(done, prefill=True)

        def on_step() -> None:
            if left["steps"] > 0:
                part = left["cost"] / left["steps"]
                left["cost"] -= part
                left["steps"] -= 1
                advance(part, share=share)

        self.on_prefill, self.on_step = on_prefill, on_step

    def absolute(self, n_keys: int) -> int:
        """Offset from a layer's key index to the absolute position (sliding caches drop keys)."""
        return self.n_seen - n_keys


def current_phase() -> Phase | None:
    """``"prefill"`` or ``"decode"`` while the engine runs the model, else ``None``."""
    return _PHASE.get()


def current_step() -> StepState | None:
    """The running decode's :class:`StepState` while the engine decodes, else ``None``."""
    return _STEP.get()


@contextlib.contextmanager
def phase(name: Phase, state: StepState | None = None) -> Iterator[None]:
    """Mark ``name`` as running (and ``state`` as the decode's step state) inside the block."""
    token = _PHASE.set(name)
    step = _STEP.set(state)
    try:
        yield
    finally:
        _STEP.reset(step)
        _PHASE.reset(token)


# ---------------------------------------------------------------------------------------
# What a built-in hook does, as data
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class TopKeySpec:
    """A read-only ``hook_pattern`` hook that writes, at every decode step, each head's top-1 key
    (absolute position: the argmax over keys of the step's pattern row, first index on ties)
    to ``buffer[step, layer, row, head]``.

    ``buffer``: a ``torch.long`` tensor ``[steps, layers, rows, heads]`` on the model's device.
    """

    buffer: Tensor
    layer: int


@dataclass(frozen=True, eq=False)
class HeadEditSpec:
    """A per-head edit at ``hook_q`` or ``hook_z``: the heads in ``heads`` (bool ``[n_heads]``)
    are overwritten with ``fill[head]`` (``[n_heads, d_head]``), or zeros when ``fill`` is
    ``None``; the other heads pass unchanged. The hook's ``fn`` and ``flat`` must do exactly
    this."""

    heads: Tensor
    fill: Tensor | None = None


Spec = TopKeySpec | HeadEditSpec


# ---------------------------------------------------------------------------------------
# The hook type
# ---------------------------------------------------------------------------------------
class EngineHook:
    """A TransformerLens hook function that declares when it acts and what it does.

    Args:
        fn: ``fn(tensor, hook=None)``, as TransformerLens calls it (``tensor`` in the hook
            point's user layout, e.g. ``[batch, pos, head, d_head]`` at ``hook_q``/``hook_z``).
        phase: ``"all"`` (default) acts on every forward; ``"decode"`` does nothing while the
            engine prefills a prompt (the paper's masks, the retrieval recorder); ``"prefill"``
            does nothing at the engine's decode steps. Outside the engine (no phase running),
            ``"decode"`` and ``"all"`` act on every forward, ``"prefill"`` too.
        reads_only: ``fn`` never changes the model's computation (it returns ``None`` and
            edits nothing in place). The lean decode step then calls it straight, without the
            hook point's call machinery. Returning a tensor is refused.
        flat: ``flat(x, n_heads, d_head) -> x``, the same edit as ``fn`` applied to the
            ``[batch, pos, head * d_head]`` tensor (``hook_q``, ``hook_k``, ``hook_v``,
            ``hook_z``); the lean step applies it instead of calling ``fn``. It must give
            exactly what ``fn`` gives through the reshape.
        spec: what ``fn`` does, as data the captured decode step runs without calling ``fn``
            (:class:`TopKeySpec` on a read-only hook, :class:`HeadEditSpec` on one with a
            ``flat`` edit). It must describe ``fn`` exactly; ``None``: arbitrary Python.

    Example (a user's read-only hook, as fast as the retrieval recorder)::

        seen = []
        spy = EngineHook(lambda p, hook=None: seen.append(p[:, :, -1].argmax(-1)), phase="decode",
                         reads_only=True)
        generate(model, tok, ids, hooks=[("blocks.3.attn.hook_pattern", spy)])
    """

    __slots__ = ("flat", "fn", "phase", "reads_only", "spec")

    def __init__(self, fn: Callable[..., Tensor | None], *, phase: HookPhase = "all",
                 reads_only: bool = False, flat: FlatEdit | None = None,
                 spec: Spec | None = None) -> None:
        if not callable(fn):
            raise ConfigError(f"an EngineHook wraps a hook function, got {type(fn).__name__}")
        if phase not in ("decode", "prefill", "all"):
            raise ConfigError(f"EngineHook phase must be 'decode', 'prefill' or 'all', got {phase!r}")
        if not isinstance(reads_only, bool):
            raise ConfigError(f"reads_only must be True or False, got {reads_only!r}")
        if flat is not None and not callable(flat):
            raise ConfigError(f"flat must be a function (x, n_heads, d_head) -> x, got {type(flat).__name__}")
        if flat is not None and reads_only:
            raise ConfigError("an EngineHook with a flat edit edits: it cannot be reads_only")
        if spec is not None and not isinstance(spec, (TopKeySpec, HeadEditSpec)):
            raise ConfigError(f"spec must be a TopKeySpec or HeadEditSpec, got {type(spec).__name__}")
        if isinstance(spec, TopKeySpec) and not reads_only:
            raise ConfigError("a TopKeySpec describes a read-only hook: pass reads_only=True")
        if isinstance(spec, HeadEditSpec) and flat is None:
            raise ConfigError("a HeadEditSpec describes an edit: pass its flat twin too")
        self.fn, self.phase, self.reads_only, self.flat, self.spec = fn, phase, reads_only, flat, spec

    def acts_in(self, when: Phase) -> bool:
        """Whether the hook acts while the engine runs phase ``when``."""
        return self.phase == "all" or self.phase == ("decode" if when == "decode" else "prefill")

    def active(self) -> bool:
        """Whether the hook acts in the phase running now."""
        if self.phase == "all":
            return True
        now = _PHASE.get()
        return now != "prefill" if self.phase == "decode" else now != "decode"

    @property
    def inert_in_prefill(self) -> bool:
        """Does nothing while the engine prefills a prompt."""
        return self.phase == "decode"

    def __call__(self, tensor: Tensor, hook: Any = None) -> Tensor | None:
        if not self.active():
            return None
        out = self.fn(tensor, hook=hook)
        if self.reads_only and out is not None:
            raise ConfigError("an EngineHook marked reads_only returned a tensor; "
                              "a hook that edits must not be marked reads_only")
        return out

    def apply_flat(self, x: Tensor, n_heads: int, d_head: int) -> Tensor:
        """The ``flat`` edit of ``x`` (``[batch, pos, head * d_head]``) when active."""
        return self.flat(x, n_heads, d_head) if self.active() else x  # type: ignore[misc]

    def __repr__(self) -> str:
        name = getattr(self.fn, "__qualname__", type(self.fn).__name__)
        extra = ", reads_only=True" if self.reads_only else ", flat" if self.flat else ""
        return f"EngineHook({name}, phase={self.phase!r}{extra})"


# ---------------------------------------------------------------------------------------
# What is attached
# ---------------------------------------------------------------------------------------
def engine_hooks(point: torch.nn.Module) -> list[EngineHook] | None:
    """The :class:`EngineHook` s attached to a hook point, in call order; ``None`` when
    anything else is attached to it (a plain function, a pre-hook, a backward hook)."""
    handles = list(getattr(point, "fwd_hooks", ()))
    if (len(handles) != len(point._forward_hooks) or point._forward_pre_hooks
            or getattr(point, "bwd_hooks", None) or getattr(point, "_forward_hooks_with_kwargs", None)):
        return None
    hooks = [h.user_hook for h in handles]
    if not all(isinstance(h, EngineHook) for h in hooks):
        return None
    return hooks


def _is_output_capture(fn) -> bool:
    """transformers' output-recording hooks: inert unless outputs are requested."""
    return getattr(fn, "__qualname__", "").endswith("output_capturing_hook")


def has_torch_hooks(module: torch.nn.Module, allowed: set[int] = frozenset()) -> bool:
    """Whether ``module`` has PyTorch hooks other than the handles ``allowed``."""
    return bool(any(not _is_output_capture(f) for f in module._forward_hooks.values())
                or module._backward_hooks or getattr(module, "_backward_pre_hooks", None)
                or any(k not in allowed for k in module._forward_pre_hooks))


def internal_handles(model) -> set[int]:
    """Ids of the pre-hooks ``BlockBridge`` keeps on its norms for itself, not a user's: they keep
    the pre-LN residual for split-qkv inputs and fire ``hook_mlp_in``."""
    return {h.id for block in getattr(model, "blocks", ())
            for h in getattr(block, "_capture_hook_handles", ())}
