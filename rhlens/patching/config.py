"""What a patching run does (PatchConfig), the metric it reads, and every check made before compute.

The activations a patch can write, per head (the hook of layer ``L`` is
``blocks.{L}.attn.hook_<name>``, as in TransformerLens):

=========  ==============================================  ==========================
name       what                                            head axis
=========  ==============================================  ==========================
``z``      the head's output before ``W_O`` (``hook_z``)   query heads
``q``      its queries, before rotary (``hook_q``)          query heads
``k``      keys, before rotary (``hook_k``)                 KV heads (alone)
``v``      values (``hook_v``)                              KV heads (alone)
``pattern`` its attention pattern (``hook_pattern``)        query heads
``result`` its output after ``W_O`` (``hook_result``)       query heads
``ov``     its output recomputed as its own pattern         query heads
           times the source's values (the value/output
           path of this head alone)
=========  ==============================================  ==========================

Names joined by ``+`` are patched together (``"q+k"``: where the head looks). Alone, ``k``
and ``v`` are indexed by KV head, as TransformerLens does; joined with a per-query-head name,
they are written at the KV head the query head reads (under grouped-query attention that
also changes what the other query heads of the group see; ``pattern`` and ``ov`` split a
head's query/key side from its value/output side without touching its neighbours).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from rhlens.errors import ConfigError
from rhlens.patching.pairs import PatchPair
from rhlens.store.results import Config
from rhlens.validate import check_heads, whole_number

__all__ = ["ACTIVATIONS", "PatchConfig", "activation_atoms"]

Head = tuple[int, int]
Mode = Literal["exact", "attribution"]
Direction = Literal["denoise", "noise"]
MetricName = Literal["logit_diff", "logprob", "custom"]

ACTIVATIONS = ("z", "q", "k", "v", "pattern", "result", "ov")
_KV = frozenset({"k", "v"})


def activation_atoms(activation: str) -> tuple[str, ...]:
    """``"q+k"`` -> ``("q", "k")``: the names patched together, validated, in canonical order."""
    if not isinstance(activation, str) or not activation.strip():
        raise ConfigError(f"activation must be a name such as 'z' or 'q+k', got {activation!r}")
    atoms = [a.strip().removeprefix("hook_") for a in activation.split("+")]
    unknown = [a for a in atoms if a not in ACTIVATIONS]
    if unknown:
        raise ConfigError(f"unknown activation {'+'.join(unknown)!r}; choose from "
                          f"{', '.join(ACTIVATIONS)} (join names with '+' to patch them together)")
    if len(set(atoms)) != len(atoms):
        raise ConfigError(f"activation {activation!r} names the same activation twice")
    return tuple(a for a in ACTIVATIONS if a in atoms)


def kv_indexed(atoms: Sequence[str]) -> bool:
    """Whether the head axis counts KV heads (``k``, ``v`` or ``k+v`` alone)."""
    return set(atoms) <= _KV


@dataclass(frozen=True)
class PatchConfig(Config):
    """How :func:`rhlens.patching.patch_heads` patches.

    Attributes:
        mode: ``"exact"`` (one patched run per head, batched) or ``"attribution"`` (one
            forward + backward per pair; a linear estimate, for long contexts; ``z`` only).
        direction: ``"denoise"``: the clean activation into the corrupted run (does this head
            bring the answer back?); ``"noise"``: the corrupted one into the clean run (does
            losing it break the answer?).
        positions: ``"answer"``: patch only where the model answers (where a retrieval head
            copies): the answer position, and for the log-prob metric the teacher-forced
            answer tokens after it; ``"all"``: every position; or a tuple of token positions
            (for ``pattern``: of query positions).
        metric: ``"logit_diff"``: clean minus corrupted first-differing-token logit at the
            answer position; ``"logprob"``: summed log-prob of the clean answer's tokens
            from the first differing one on; ``"custom"``: a metric function the user gave
            (:func:`rhlens.patching.patch_activation` only).
        layers: layers to patch (``None``: all). Others get NaN effects.
        heads: ``(layer, head)`` cells to patch instead of whole layers (``None``: all heads
            of ``layers``).
        activation: what is patched (see :mod:`rhlens.patching.config`): ``"z"`` (default),
            ``"q"``, ``"k"``, ``"v"``, ``"pattern"``, ``"result"``, ``"ov"``, or names joined
            by ``+``.
        batch_size: patched copies per forward (``None``: one layer's heads; ``z`` only).
            Bounds memory: with ``positions="answer"`` each copy holds its own KV cache.
        min_gap: pairs whose clean and corrupted metrics differ by less cannot be normalised
            and get NaN effects (they say nothing about any head).
    """

    mode: Mode = "exact"
    direction: Direction = "denoise"
    positions: str | Sequence[int] = "answer"
    metric: MetricName = "logit_diff"
    layers: Sequence[int] | None = None
    heads: Sequence[Sequence[int]] | None = None
    activation: str = "z"
    batch_size: int | None = None
    min_gap: float = 1e-3

    def __post_init__(self) -> None:
        choices = {"mode": ("exact", "attribution"), "direction": ("denoise", "noise"),
                   "metric": ("logit_diff", "logprob", "custom")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}; "
                                  f"got {getattr(self, name)!r}")
        if isinstance(self.positions, str):
            if self.positions not in ("all", "answer"):
                raise ConfigError(f"positions must be 'all', 'answer' or a list of token "
                                  f"positions; got {self.positions!r}")
        else:
            pos = tuple(whole_number(p, "a position") for p in self.positions)  # never int("3")
            if not pos or min(pos) < 0 or len(set(pos)) != len(pos):
                raise ConfigError(f"positions must be distinct token positions >= 0, got {pos}")
            object.__setattr__(self, "positions", pos)
        if self.layers is not None:
            layers = tuple(sorted({whole_number(x, "a layer") for x in self.layers}))
            if not layers:
                raise ConfigError("layers is empty; pass None to patch every layer")
            if layers[0] < 0:
                raise ConfigError(f"layers must be >= 0, got {layers}")
            object.__setattr__(self, "layers", layers)
        if self.heads is not None:
            if self.layers is not None:
                raise ConfigError("give layers or heads, not both")
            heads = tuple(sorted(set(check_heads(self.heads))))  # exact pairs: "31" is no head
            if not heads or min(min(c) for c in heads) < 0:
                raise ConfigError(f"heads must be a non-empty list of (layer, head) >= 0, got {heads}")
            object.__setattr__(self, "heads", heads)
        atoms = activation_atoms(self.activation)
        object.__setattr__(self, "activation", "+".join(atoms))
        if self.mode == "attribution" and atoms != ("z",):
            raise ConfigError(f"attribution patching estimates z patches only, not "
                              f"{self.activation!r}; use mode='exact'")
        if self.batch_size is not None:
            whole_number(self.batch_size, "batch_size")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1 (patched copies per forward), got {self.batch_size}")
        if not self.min_gap >= 0:
            raise ConfigError(f"min_gap must be >= 0, got {self.min_gap}")

    @property
    def atoms(self) -> tuple[str, ...]:
        return activation_atoms(self.activation)

    def get(self, name: str, default: Any = None) -> Any:
        """A setting by name (for code that read a result's config as a dict)."""
        return getattr(self, name, default) if name in self.__dataclass_fields__ else default

    def __getitem__(self, name: str) -> Any:
        if name not in self.__dataclass_fields__:
            raise KeyError(name)
        return getattr(self, name)


def _model_name(model) -> str:
    return getattr(model, "rhlens_name", None) or str(getattr(model.cfg, "model_name", "model"))


def model_grid(model) -> tuple[int, int, int]:
    """(layers, query heads, KV heads) of a bridge."""
    cfg = model.cfg
    n_heads = int(cfg.n_heads)
    n_kv = getattr(cfg, "n_key_value_heads", None)
    return int(cfg.n_layers), n_heads, int(n_kv) if n_kv else n_heads


def plan_cells(model, config: PatchConfig) -> list[Head]:
    """The (layer, head) cells ``config`` patches, in layer order; refused when off the grid."""
    n_layers, n_heads, n_kv = model_grid(model)
    width = n_kv if kv_indexed(config.atoms) else n_heads
    what = "KV heads" if width != n_heads else "heads"
    if config.heads is not None:
        for layer, head in config.heads:
            if layer >= n_layers or head >= width:
                raise ConfigError(f"head ({layer}, {head}) is outside this model's "
                                  f"{n_layers} layers x {width} {what} (for {config.activation!r})")
        return list(config.heads)
    layers = config.layers if config.layers is not None else tuple(range(n_layers))
    if layers[-1] >= n_layers:
        raise ConfigError(f"layers {layers} go past this model's {n_layers} layers")
    return [(layer, head) for layer in layers for head in range(width)]


def check_pairs(model, pairs: Sequence[PatchPair], config: PatchConfig) -> None:
    """Everything about the pairs that could fail late, refused now."""
    if not pairs:
        raise ConfigError("no pairs given")
    if config.metric == "custom":
        raise ConfigError("metric='custom' is for patch_activation with your own metric; "
                          "pairs are scored with 'logit_diff' or 'logprob'")
    vocab = int(model.cfg.d_vocab)
    n_ctx = getattr(model.cfg, "n_ctx", None)
    for i, p in enumerate(pairs):
        if not isinstance(p, PatchPair):
            raise ConfigError(f"pairs[{i}] is a {type(p).__name__}, not a PatchPair (see make_pairs)")
        name = p.labels.get("key", i)
        if p.clean_ids == p.corrupted_ids:
            raise ConfigError(f"pair {name}: the clean and corrupted prompts are identical, so "
                              "no head can carry a difference between them")
        if config.metric == "logit_diff" and p.corrupted_token is None:
            raise ConfigError(
                f"pair {name} has no corrupted answer, so the logit difference "
                "is undefined: pass model= to make_pairs (a removed needle then uses the corrupted "
                "run's own prediction) or use metric='logprob'")
        if max(max(p.clean_ids), max(p.corrupted_ids), max(p.clean_answer_ids)) >= vocab:
            raise ConfigError(f"pair {name} holds token ids beyond the model's "
                              f"vocabulary of {vocab}: made with another tokenizer?")
        if n_ctx is not None and p.n_tokens > int(n_ctx):
            raise ConfigError(f"pair {name} has {p.n_tokens} tokens, more than "
                              f"the model's context of {n_ctx}")
        if not isinstance(config.positions, str):
            end = run_length(p, config.metric)
            if max(config.positions) >= end:
                raise ConfigError(
                    f"position {max(config.positions)} is out of range for pair {name}: its runs "
                    f"have {end} tokens (the {config.metric} metric is read up to position {end - 1})")


def run_length(pair: PatchPair, metric: MetricName) -> int:
    """Tokens a run of ``pair`` needs: the logit difference is read at the answer position
    alone, and no later position can change it; the log-prob reads the teacher-forced tail."""
    return pair.answer_pos + 1 if metric == "logit_diff" else pair.n_tokens


def pair_metric(logits: Float[Tensor, "batch answer vocab"], pair: PatchPair,
                metric: MetricName) -> Float[Tensor, " batch"]:
    """The metric from the logits of the answer positions (``answer_pos`` on)."""
    logits = logits.float()
    if metric == "logit_diff":
        return logits[:, 0, pair.clean_token] - logits[:, 0, pair.corrupted_token]
    targets = torch.tensor(pair.targets, device=logits.device)
    logp = logits.log_softmax(-1)
    return logp[:, torch.arange(len(targets), device=logits.device), targets].sum(-1)


def normalise(patched: Tensor, clean: Tensor, corrupted: Tensor, direction: Direction,
              min_gap: float) -> Tensor:
    """1 = the head carries all of the clean-vs-corrupted difference, 0 = none of it."""
    shape = (-1,) + (1,) * (patched.ndim - 1)
    gap = (clean - corrupted).view(shape)
    if direction == "denoise":
        eff = (patched - corrupted.view(shape)) / gap
    else:
        eff = (clean.view(shape) - patched) / gap
    return torch.where(gap.abs() >= min_gap, eff, torch.full_like(eff, math.nan))
