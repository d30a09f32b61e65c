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

Which heads is :mod:`rhlens.masks`' business (:class:`~rhlens.masks.Mask`, top-K, random-K,
parsing, K sweeps); :func:`mean_reference_prompts` picks the prompts ``mode="mean"`` averages.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from rhlens.deprecation import moved_names
from rhlens.engine import EngineHook, HeadEditSpec, HookPair, hf_model, native_attention, phase
from rhlens.errors import ConfigError
from rhlens.masks import Mask, Mode, PhaseName
from rhlens.validate import check_head

__all__ = ["ablate_heads", "ablation_hooks", "head_means", "mean_reference_prompts"]

# Which heads to knock out lives in rhlens.masks; the names stay reachable here for older code.
__getattr__ = moved_names("rhlens.ablation", dict.fromkeys(
    ("MASK_SPECS", "RETRIEVAL_THRESHOLD", "parse_mask", "random_k_heads", "random_k_mask",
     "top_k_mask", "random_heads"), "rhlens.masks"))


def mean_reference_prompts(probes: Sequence, n: int = 4) -> list[tuple[int, ...]]:
    """The prompts whose head outputs ``mode="mean"`` averages: the first ``n`` probes'.

    The first probes of a grid are its shortest length, so the reference costs little; pass
    them to :func:`head_means`.
    """
    if n < 1:
        raise ConfigError(f"need at least one reference prompt, got n={n}")
    probes = list(probes)
    if not probes:
        raise ConfigError("mean ablation needs probes to average head outputs over")
    return [tuple(p.prompt_ids) for p in probes[:n]]


def _check_heads(model, heads: Sequence[Sequence[int]]) -> dict[int, list[int]]:
    n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
    by_layer: dict[int, list[int]] = {}
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
