"""Head ablation: knocking heads out while the model answers (the paper's masking experiments).

Three ways to knock a head out, each a TransformerLens hook on the bridge:

* ``uniform`` (the paper's mask): the head's query is zeroed at ``hook_q``, so every score
  is equal and the head attends uniformly to all keys it can see. Under grouped-query
  attention only that query head changes; the KV head it shares is untouched.
* ``zero``: the head's output ``z`` (``hook_z``, before the output projection) is zeroed.
* ``mean``: ``z`` is replaced by its mean over a reference set (:func:`head_means`).

``phase="decode"`` (what the paper's code does) leaves the prompt's prefill alone and
masks only while the model answers; ``phase="all"`` masks the prefill too. Hooks are
attached only inside :func:`ablate_heads`, a context manager, so nothing stays attached.

Which heads: :func:`top_k_mask` (the K best retrieval heads, by the one top-K rule),
:func:`random_k_mask` (K heads drawn from the model's grid, never a retrieval head), and
:func:`parse_mask` for the specs a user types (``none``, ``top:K``, ``random:K[:seed]``,
``heads:L.H,...``); :func:`mean_reference_prompts` picks the prompts ``mode="mean"`` averages.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from rhlens.engine import EngineHook, HeadEditSpec, HookPair, hf_model, native_attention, phase
from rhlens.errors import ConfigError

__all__ = [
    "Mask",
    "ablate_heads",
    "ablation_hooks",
    "head_means",
    "mean_reference_prompts",
    "parse_mask",
    "random_heads",
    "random_k_heads",
    "random_k_mask",
    "top_k_mask",
]

Head = tuple[int, int]
Mode = Literal["uniform", "zero", "mean"]
PhaseName = Literal["decode", "all"]


def random_heads(n_layers: int, n_heads: int, k: int, *, seed: int = 0,
                 exclude: Sequence[Head] | None = None) -> list[Head]:
    """``k`` distinct (layer, head) pairs drawn uniformly from the model's real grid.

    Heads in ``exclude`` (typically the top retrieval heads) are never drawn. The same seed
    gives the same heads. (The paper's code drew from a hard-coded 32 x 32 grid.)
    """
    banned = {tuple(h) for h in (exclude or [])}
    pool = [(la, h) for la in range(n_layers) for h in range(n_heads) if (la, h) not in banned]
    if not 0 <= k <= len(pool):
        raise ConfigError(f"cannot draw {k} random heads: {len(pool)} heads are available "
                          f"({n_layers}x{n_heads} grid, {len(banned)} excluded)")
    return sorted(random.Random(seed).sample(pool, k))


@dataclass(frozen=True)
class Mask:
    """A set of heads to knock out, and how. ``Mask.none()`` is the unmasked baseline."""

    heads: Sequence[Any] = ()  # (layer, head) pairs, checked; kept as a sorted tuple of ints
    mode: Mode = "uniform"
    phase: PhaseName = "decode"
    label: str = ""

    def __post_init__(self) -> None:
        from rhlens.validate import check_heads

        # Exact types (a string, float or bool is refused, never coerced with int()).
        object.__setattr__(self, "heads", tuple(sorted(set(check_heads(self.heads)))))
        if self.mode not in ("uniform", "zero", "mean"):
            raise ConfigError(f"mode must be uniform, zero or mean, got {self.mode!r}")
        if self.phase not in ("decode", "all"):
            raise ConfigError(f"phase must be decode or all, got {self.phase!r}")
        if not self.label:
            object.__setattr__(self, "label", f"{len(self.heads)} heads" if self.heads else "none")

    @classmethod
    def none(cls) -> Mask:
        return cls((), label="none")

    def to_dict(self) -> dict:
        return {"heads": [list(h) for h in self.heads], "mode": self.mode, "phase": self.phase,
                "label": self.label}


# ---- choosing heads ------------------------------------------------------------------------
RETRIEVAL_THRESHOLD = 0.1  # the paper's line between retrieval heads and the rest


def _grid(scores, grid: tuple[int, int] | None) -> tuple[int, int]:
    if grid is not None:
        return int(grid[0]), int(grid[1])
    if scores is None:
        raise ConfigError("need the model's grid (n_layers, n_heads) or retrieval scores")
    return scores.n_layers, scores.n_heads


def _check_k(k: int, n_cells: int, what: str) -> None:
    if not 1 <= k <= n_cells:
        raise ConfigError(f"{what}: K must be between 1 and the model's {n_cells} heads, got {k}")


def top_k_mask(scores, k: int, *, mode: Mode = "uniform", phase: PhaseName = "decode") -> Mask:
    """The ``k`` best retrieval heads (:func:`rhlens.stats.top_k_heads`: ties by layer, head),
    labelled ``top-k``."""
    from rhlens.stats import top_k_heads
    from rhlens.validate import check_finite, whole_number

    k = whole_number(k, "K")
    _check_k(k, scores.n_layers * scores.n_heads, f"top-{k}")
    mean = check_finite(scores.mean, "the retrieval scores")  # NaN would rank as the lowest head
    return Mask(tuple(top_k_heads(mean, k)), mode, phase, label=f"top-{k}")


def random_k_heads(scores, k: int, *, seed: int = 0, grid: tuple[int, int] | None = None,
                   exclude_threshold: float = RETRIEVAL_THRESHOLD) -> list[Head]:
    """``k`` heads drawn from the model's grid, never a retrieval head nor a top-``k`` head.

    ``grid`` is the model's ``(n_layers, n_heads)`` (default: the scores'); without
    ``scores``, heads are drawn from the whole grid. Heads scoring above
    ``exclude_threshold`` and the top-``k`` heads are excluded, so a random mask never
    hides a retrieval head.
    """
    n_layers, n_heads = _grid(scores, grid)
    _check_k(k, n_layers * n_heads, f"random-{k}")
    banned: list[Head] = []
    if scores is not None:
        if (scores.n_layers, scores.n_heads) != (n_layers, n_heads):
            raise ConfigError(f"the scores cover {scores.n_layers} x {scores.n_heads} heads, the "
                              f"model {n_layers} x {n_heads}: scores of another model?")
        from rhlens.stats import heads_above, top_k_heads

        banned = sorted(set(heads_above(scores.mean, exclude_threshold)) |
                        set(top_k_heads(scores.mean, k)))
    return random_heads(n_layers, n_heads, k, seed=seed, exclude=banned)


def random_k_mask(scores, k: int, *, seed: int = 0, grid: tuple[int, int] | None = None,
                  mode: Mode = "uniform", phase: PhaseName = "decode") -> Mask:
    """:func:`random_k_heads` as a mask labelled ``random-k-s<seed>``."""
    heads = random_k_heads(scores, k, seed=seed, grid=grid)
    return Mask(tuple(heads), mode, phase, label=f"random-{k}-s{seed}")


MASK_SPECS = "none, top:K, random:K[:seed] or heads:L.H,L.H,..."


def parse_mask(spec: str, *, grid: tuple[int, int] | None = None, scores=None,
               mode: Mode = "uniform", phase: PhaseName = "decode") -> Mask:
    """A mask from a spec: ``none``, ``top:K``, ``random:K[:seed]`` or ``heads:L.H,L.H``.

    ``grid`` is the model's ``(n_layers, n_heads)``: heads and K are checked against it (and
    random heads drawn from it). ``top:K`` needs ``scores``; ``random:K`` uses them, when
    given, to leave retrieval heads out.
    """
    if not isinstance(spec, str):
        raise ConfigError(f"a mask spec is a string ({MASK_SPECS}), got {spec!r}")
    kind, _, rest = spec.strip().partition(":")
    if kind == "none" and not rest:
        return Mask((), mode, phase, label="none")
    if kind == "heads":
        from rhlens.validate import parse_heads

        try:
            heads = parse_heads(rest, grid)
        except ConfigError as exc:
            raise ConfigError(f"mask {spec.strip()!r}: {exc}") from None
        return Mask(tuple(heads), mode, phase, label=spec.strip())
    if kind not in ("top", "random"):
        raise ConfigError(f"a mask is {MASK_SPECS}; got {spec!r}")
    parts = rest.split(":")
    if not rest or len(parts) > (2 if kind == "random" else 1) or \
            not all(x.strip().lstrip("-").isdecimal() and x.isascii() for x in parts):
        form = "top:K" if kind == "top" else "random:K or random:K:SEED"
        raise ConfigError(f"mask {spec!r}: expected {form} with whole numbers")
    k, seed = int(parts[0]), int(parts[1]) if len(parts) > 1 else 0
    if kind == "top":
        if scores is None:
            raise ConfigError(f"mask {spec}: top-K needs retrieval scores (--scores: a detection "
                              "run or a paper JSON file)")
        if grid is not None and (scores.n_layers, scores.n_heads) != tuple(grid):
            raise ConfigError(f"the scores cover {scores.n_layers} x {scores.n_heads} heads, the "
                              f"model {grid[0]} x {grid[1]}: scores of another model?")
        return top_k_mask(scores, k, mode=mode, phase=phase)
    return random_k_mask(scores, k, seed=seed, grid=grid, mode=mode, phase=phase)


def mean_reference_prompts(probes: Sequence, n: int = 4) -> list[tuple[int, ...]]:
    """The prompts whose head outputs ``mode="mean"`` averages: the first ``n`` probes'.

    The first probes of a grid are its shortest length, so the reference costs little; pass
    them to :func:`head_means`.
    """
    if n < 1:
        raise ConfigError(f"need at least one reference prompt, got n={n}")
    probes = list(getattr(probes, "probes", probes))
    if not probes:
        raise ConfigError("mean ablation needs probes to average head outputs over")
    return [tuple(p.prompt_ids) for p in probes[:n]]


def _check_heads(model, heads: Sequence[Sequence[int]]) -> dict[int, list[int]]:
    n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
    by_layer: dict[int, list[int]] = {}
    from rhlens.validate import check_head

    for item in heads:
        layer, head = check_head(item)  # exact types: never int() of a string or a float
        if not (layer < n_layers and head < n_heads):
            raise ConfigError(f"head ({layer}, {head}) is outside this model's "
                              f"{n_layers} layers x {n_heads} heads")
        by_layer.setdefault(layer, []).append(head)
    return by_layer


def ablation_hooks(model, heads: Sequence[Sequence[int]], *, mode: Mode = "uniform",
                   phase: PhaseName = "decode",
                   means: Float[Tensor, "layer head d_head"] | None = None) -> list[HookPair]:
    """The ``(hook name, fn)`` pairs that knock ``heads`` out; attach them with ``model.hooks``."""
    Mask(tuple(heads), mode, phase)  # validates mode and phase
    by_layer = _check_heads(model, heads)
    n_heads = int(model.cfg.n_heads)
    if mode == "mean" and means is None:
        raise ConfigError("mode='mean' needs means=head_means(model, tokenizer, prompts)")
    hooks: list[HookPair] = []
    for layer, idx in sorted(by_layer.items()):
        index = torch.tensor(sorted(idx))
        if mode == "uniform":
            hooks.append((f"blocks.{layer}.attn.hook_q", _zero_heads(index, phase, n_heads)))
        elif mode == "zero":
            hooks.append((f"blocks.{layer}.attn.hook_z", _zero_heads(index, phase, n_heads)))
        else:
            hooks.append((f"blocks.{layer}.attn.hook_z", _set_heads(index, means[layer], phase)))
    return hooks


def _head_mask(index: Tensor):
    """``mask(x)``: a bool ``[head, 1]`` selecting ``index``, kept on ``x``'s device.

    Built once per device: moving a CPU index to the GPU at every call would cost a host
    sync per hook per decode step (benchmarks/bench_detect.py, masked runs).
    """
    made: dict[tuple[torch.device, int], Tensor] = {}

    def mask(x: Tensor) -> Tensor:
        key = (x.device, x.shape[-2])
        if key not in made:
            m = torch.zeros(x.shape[-2], 1, dtype=torch.bool)
            m[index] = True
            made[key] = m.to(x.device)
        return made[key]

    return mask


def _head_hook(edit: Callable[[Tensor], Tensor], when: PhaseName, spec: HeadEditSpec) -> EngineHook:
    """``edit`` (on ``[batch, pos, head, d_head]``) as an :class:`EngineHook` acting in ``when``,
    with its ``flat`` twin: the same edit on the ``[batch, pos, head * d_head]`` tensor the model
    holds, which the engine's decode step applies directly (skipping the hook point's reshapes
    and call machinery, which cost more than the edit on a GPU). Outside the engine (a user's
    ``run_with_hooks``, loop or ``generate``) it is a plain hook; ``"decode"`` acts on every
    forward there, which is what someone calling the model by hand expects. ``spec`` says the
    same edit as data (which heads, what they become), which the captured decode step applies
    as one tensor op per layer without calling the hook."""

    def hook(x: Float[Tensor, "batch pos head d_head"], hook=None) -> Tensor:
        return edit(x)

    def flat(x: Float[Tensor, "batch pos head_d_head"], n_heads: int, d_head: int) -> Tensor:
        b, p, _ = x.shape
        return edit(x.view(b, p, n_heads, d_head)).view(b, p, n_heads * d_head)

    return EngineHook(hook, phase=when, flat=flat, spec=spec)


def _selected(index: Tensor, n_heads: int) -> Tensor:
    heads = torch.zeros(n_heads, dtype=torch.bool)
    heads[index] = True
    return heads


def _zero_heads(index: Tensor, when: PhaseName, n_heads: int) -> EngineHook:
    mask = _head_mask(index)

    def edit(x: Tensor) -> Tensor:
        return x.masked_fill(mask(x), 0)  # a new tensor: the cache's own stays as it was

    return _head_hook(edit, when, HeadEditSpec(_selected(index, n_heads)))


def _set_heads(index: Tensor, layer_means: Float[Tensor, "head d_head"], when: PhaseName) -> EngineHook:
    mask = _head_mask(index)
    spec = HeadEditSpec(_selected(index, layer_means.shape[0]), layer_means)
    cast: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def edit(x: Tensor) -> Tensor:
        key = (x.device, x.dtype)
        if key not in cast:
            cast[key] = layer_means.to(device=x.device, dtype=x.dtype)
        return torch.where(mask(x), cast[key], x)

    return _head_hook(edit, when, spec)


@contextlib.contextmanager
def ablate_heads(model, heads: Sequence[Sequence[int]] | Mask, *, mode: Mode = "uniform",
                 phase: PhaseName = "decode",
                 means: Float[Tensor, "layer head d_head"] | None = None) -> Iterator[None]:
    """Knock ``heads`` out inside the ``with`` block; the hooks are removed on exit, always.

    Example:
        >>> with ablate_heads(model, scores.top_heads(20)):
        ...     gen = generate(model, tok, probe.prompt_ids)
    """
    if isinstance(heads, Mask):
        mode, phase, heads = heads.mode, heads.phase, heads.heads
    hooks = ablation_hooks(model, heads, mode=mode, phase=phase, means=means)
    if not hooks:
        yield
        return
    with model.hooks(fwd_hooks=hooks):
        yield


@torch.no_grad()
def head_means(model, tokenizer,
               prompts: Sequence[str | Sequence[int]]) -> Float[Tensor, "layer head d_head"]:
    """Each head's mean output ``z`` over every position of ``prompts`` (for ``mode="mean"``)."""
    if not prompts:
        raise ConfigError("head_means needs at least one reference prompt")
    n_layers = int(model.cfg.n_layers)
    sums: dict[int, Tensor] = {}
    count = 0

    def make(layer: int):
        def hook(z: Float[Tensor, "batch pos head d_head"], hook=None):
            sums[layer] = sums.get(layer, 0) + z.float().sum((0, 1))
            return None

        return hook

    hf = hf_model(model)
    device = next(hf.parameters()).device
    hooks = [(f"blocks.{layer}.attn.hook_z", make(layer)) for layer in range(n_layers)]
    with model.hooks(fwd_hooks=hooks), phase("prefill"), native_attention(model):
        for prompt in prompts:
            ids = tokenizer(prompt)["input_ids"] if isinstance(prompt, str) else list(prompt)
            hf(input_ids=torch.tensor([ids], device=device), logits_to_keep=1)
            count += len(ids)
    return torch.stack([sums[layer] for layer in range(n_layers)]) / count
