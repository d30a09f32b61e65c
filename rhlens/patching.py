"""Causal head patching: which heads carry the needle to the answer.

Reading order: clean/corrupted pairs -> the metric -> exact patching -> attribution patching
-> the result -> comparison with retrieval scores.

A *pair* is two prompts of the same length that differ only in the needle: the clean one
holds the needle with its answer, the corrupted one the same needle with another answer of
the same token length (``kind="swap"``) or neutral filler instead of the needle
(``kind="remove"``). Both get the same teacher-forced reply appended (by default the needle's
own words before the answer, e.g. "The password for the old observatory on Karsk Hill is"),
so the next token predicted at the *answer position* is the answer's first differing token,
and the clean answer's remaining tokens follow, teacher-forced, for the log-prob metric.

Patching copies one head's output ``z`` (``blocks.{L}.attn.hook_z``, before the output
projection) from one run into the other, at every position (``positions="all"``) or only at
the answer positions (``"answer"``: the answer position, and for the log-prob metric the
teacher-forced answer tokens after it). ``direction="denoise"`` patches clean into corrupted
and asks how much of the clean behaviour comes back; ``"noise"`` patches corrupted into clean
and asks how much is lost. Both give effects where 1 means "this head alone carries all of
it" and 0 "nothing".

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

The patch itself is TransformerLens' ``layer_head_vector_patch_setter``, and
:meth:`HeadPatchingResult.to_transformer_lens` hands the per-pair values to TransformerLens'
``PatchingResult`` for its standard errors, bootstrap intervals and permutation tests.
TransformerLens' ``generic_activation_patch`` itself runs one full bridge forward with full
logits per head, which is what the above avoids; the tests check that both agree.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from rhlens.engine import generate, hf_model, native_attention
from rhlens.errors import ConfigError, ProbeError
from rhlens.probe import Probe
from rhlens.probes import (
    BUILTIN_NEEDLES,
    Haystack,
    Needle,
    ProbeConfig,
    ProbeSet,
    _needle_tokens,
    build_probes,
)
from rhlens.results import atomic_write_text
from rhlens.scores import RetrievalScores

__all__ = [
    "ALTERNATIVE_ANSWERS",
    "HeadPatchingResult",
    "PatchConfig",
    "PatchPair",
    "PatchingVsRetrieval",
    "compare_patching",
    "make_pair",
    "make_pairs",
    "patch_head_set",
    "patch_heads",
    "patching_vs_retrieval",
]

Head = tuple[int, int]
Kind = Literal["swap", "remove"]
AnswerPrefix = Literal["needle", "model", "none"]
Mode = Literal["exact", "attribution"]
Direction = Literal["denoise", "noise"]
Positions = Literal["all", "answer"]
MetricName = Literal["logit_diff", "logprob"]

# ---------------------------------------------------------------------------------------
# Clean / corrupted pairs
# ---------------------------------------------------------------------------------------
# Other answers of the same kind for each built-in needle. Several per needle, of different
# shapes, so that at least one has the original's token length under most tokenizers; all
# differ from the original in their first word, so the metric reads the very first answer
# token. :func:`make_pairs` takes the first one that fits.
ALTERNATIVE_ANSWERS: dict[str, tuple[str, ...]] = {
    "lighthouse-soup": (
        "toasted white sesame from the hills of Corra",
        "fresh wild fennel from the coast of Brin",
        "sweet red paprika from the valley of Oster",
        "roasted red saffron from the island of Dross",
        "dried green pepper from the island of Tarnak",
        "wild mountain thyme from the island of Dornach",
    ),
    "observatory-password": (
        "silver fox twelve",
        "golden eagle nine",
        "iron tiger seven",
        "purple moon eighty",
        "silver heron forty",
        "crimson badger eleven",
    ),
    "pellmoor-dragon": (
        "read it a poem about brass teapots",
        "whistle it a tune about silver kettles",
        "tell it a story about silver teapots",
        "hum it a tune about golden lanterns",
        "tell it a tale about wooden ladles",
    ),
    "orlen-key": (
        "behind the old wooden teapot",
        "inside the second blue teapot",
        "beneath the fourth red teapot",
        "behind the second red clock",
        "on top of the old piano",
    ),
}

# What replaces a removed needle: plain, fact-free text cut to the needle's token count.
_NEUTRAL_FILLER = (" Nothing of note happened that day, and the afternoon passed quietly as"
                   " the town went about its usual business.")


@dataclass(frozen=True)
class PatchPair:
    """A clean and a corrupted prompt of the same length, and the answers they lead to.

    ``clean_ids`` and ``corrupted_ids`` already end with the shared teacher-forced reply and
    the clean answer's tokens up to (not including) its last one. The model's prediction at
    ``answer_pos`` is the first token where the two answers differ; the positions after it
    predict the rest of the clean answer (:attr:`targets`).

    Attributes:
        clean_ids: the clean prompt (+ reply prefix + teacher-forced clean answer).
        corrupted_ids: the corrupted prompt, same length, same tail.
        clean_answer_ids: the clean answer's tokens, in full.
        corrupted_answer_ids: the corrupted answer's tokens; for a removed needle the
            corrupted run's own prediction (one token) or empty when unknown.
        answer_pos: the position whose next-token prediction is the first differing token.
        labels: where the pair came from (probe key, needle, kind, answers as text, ...).
    """

    clean_ids: tuple[int, ...]
    corrupted_ids: tuple[int, ...]
    clean_answer_ids: tuple[int, ...]
    corrupted_answer_ids: tuple[int, ...]
    answer_pos: int
    labels: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        for name in ("clean_ids", "corrupted_ids", "clean_answer_ids", "corrupted_answer_ids"):
            object.__setattr__(self, name, tuple(int(t) for t in getattr(self, name)))
        n = len(self.clean_ids)
        if n == 0 or len(self.corrupted_ids) != n:
            raise ProbeError(f"clean and corrupted ids must be non-empty and of the same length "
                             f"for position-aligned patching, got {n} and {len(self.corrupted_ids)}")
        if not 0 <= self.answer_pos < n:
            raise ProbeError(f"answer_pos {self.answer_pos} lies outside the {n} tokens")
        if not self.clean_answer_ids:
            raise ProbeError("the clean answer is empty")
        if self.n_answer > len(self.clean_answer_ids):
            raise ProbeError(f"{self.n_answer} answer positions but the clean answer has only "
                             f"{len(self.clean_answer_ids)} tokens")
        # The teacher-forced tail must be the clean answer, in both runs, or the log-prob
        # metric would score a different continuation than the one fed.
        forced = self.targets[:-1]
        for ids in (self.clean_ids, self.corrupted_ids):
            if tuple(ids[self.answer_pos + 1:]) != forced:
                raise ProbeError("the tokens after answer_pos must be the clean answer, teacher-forced")
        if self.corrupted_answer_ids:
            i = self.first_diff
            if (len(self.corrupted_answer_ids) <= i
                    or self.corrupted_answer_ids[:i] != self.clean_answer_ids[:i]
                    or self.corrupted_answer_ids[i] == self.clean_answer_ids[i]):
                raise ProbeError(f"the answers must first differ at answer token {i}")

    @property
    def n_tokens(self) -> int:
        return len(self.clean_ids)

    @property
    def n_answer(self) -> int:
        """Positions whose logits the metrics read: the answer position and those after it."""
        return self.n_tokens - self.answer_pos

    @property
    def first_diff(self) -> int:
        """Index in the answers of the first token where they differ."""
        return len(self.clean_answer_ids) - self.n_answer

    @property
    def targets(self) -> tuple[int, ...]:
        """The clean answer's tokens predicted at ``answer_pos``, ``answer_pos + 1``, ..."""
        return self.clean_answer_ids[self.first_diff:]

    @property
    def clean_token(self) -> int:
        return self.clean_answer_ids[self.first_diff]

    @property
    def corrupted_token(self) -> int | None:
        return self.corrupted_answer_ids[self.first_diff] if self.corrupted_answer_ids else None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for name in ("clean_ids", "corrupted_ids", "clean_answer_ids", "corrupted_answer_ids"):
            d[name] = list(d[name])
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PatchPair:
        return cls(clean_ids=tuple(d["clean_ids"]), corrupted_ids=tuple(d["corrupted_ids"]),
                   clean_answer_ids=tuple(d["clean_answer_ids"]),
                   corrupted_answer_ids=tuple(d["corrupted_answer_ids"]),
                   answer_pos=int(d["answer_pos"]), labels=dict(d.get("labels", {})))


def make_pair(clean_prompt: Sequence[int], corrupted_prompt: Sequence[int],
              clean_answer: Sequence[int], corrupted_answer: Sequence[int] = (), *,
              response_prefix: Sequence[int] = (), labels: dict[str, Any] | None = None) -> PatchPair:
    """Align two prompts into a :class:`PatchPair` (the building block of :func:`make_pairs`).

    Appends ``response_prefix`` and the answers' shared leading tokens to both prompts, so
    that the next prediction is the first token where the answers differ, then the clean
    answer's remaining tokens (teacher-forced, for the log-prob metric).

    Args:
        clean_prompt, corrupted_prompt: token ids of the same length.
        clean_answer: what the model should say after the clean prompt (and the prefix).
        corrupted_answer: what it should say after the corrupted one; empty when unknown
            (only the log-prob metric can then be used).
        response_prefix: a reply start fed to both runs before the answer.
        labels: metadata kept with the pair and with every result.
    """
    clean_prompt, corrupted_prompt = tuple(clean_prompt), tuple(corrupted_prompt)
    clean_answer, corrupted_answer = tuple(clean_answer), tuple(corrupted_answer)
    if len(clean_prompt) != len(corrupted_prompt):
        raise ProbeError(f"the clean prompt has {len(clean_prompt)} tokens and the corrupted one "
                         f"{len(corrupted_prompt)}; position-aligned patching needs equal lengths")
    if not clean_answer:
        raise ProbeError("the clean answer is empty")
    first = 0
    if corrupted_answer:
        while (first < min(len(clean_answer), len(corrupted_answer))
               and clean_answer[first] == corrupted_answer[first]):
            first += 1
        if first >= len(clean_answer) or first >= len(corrupted_answer):
            raise ProbeError("the clean and corrupted answers have no differing token "
                             f"({clean_answer} vs {corrupted_answer})")
    tail = tuple(response_prefix) + clean_answer[:-1]
    answer_pos = len(clean_prompt) + len(response_prefix) + first - 1
    if answer_pos < 0:
        raise ProbeError("empty prompt: there is no position to predict the answer from")
    return PatchPair(clean_ids=clean_prompt + tail, corrupted_ids=corrupted_prompt + tail,
                     clean_answer_ids=clean_answer, corrupted_answer_ids=corrupted_answer,
                     answer_pos=answer_pos, labels=dict(labels or {}))


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _find(seq: Sequence[int], sub: Sequence[int]) -> int:
    for i in range(len(seq) - len(sub) + 1):
        if list(seq[i:i + len(sub)]) == list(sub):
            return i
    return -1


def _needle_region(probe: Probe) -> tuple[int, int]:
    """``[start, end)`` of the whole needle sentence (the answer span if it is unknown)."""
    start, n = probe.meta.get("insert_token"), probe.meta.get("needle_tokens")
    if start is None or n is None:
        return probe.needle_span
    return int(start), int(start) + int(n)


def _swap_needle(tokenizer, probe: Probe, needle: Needle | None,
                 alternatives: Sequence[str]) -> tuple[list[int], str]:
    """Needle tokens with another answer, of exactly the original length and layout."""
    r0, r1 = _needle_region(probe)
    s0, s1 = probe.needle_span
    prompt = probe.prompt_ids
    clean_answer = prompt[s0:s1]
    real = probe.real_needle.strip()
    if needle is not None and needle.real_needle.strip() == real:
        sentence = needle.needle.strip()
    else:
        sentence = tokenizer.decode(list(prompt[r0:r1])).strip()
    whole_sentence = (r0, r1) != (s0, s1)
    tried: list[str] = []
    fallback: tuple[list[int], str] | None = None
    for alt in alternatives:
        alt = alt.strip()
        if alt == real:
            continue
        if whole_sentence and real in sentence:
            ids, (b0, b1) = _needle_tokens(tokenizer, Needle(sentence.replace(real, alt, 1),
                                                             "?", alt, probe.needle_id))
            ok = len(ids) == r1 - r0 and (b0, b1) == (s0 - r0, s1 - r0)
            new_answer = ids[b0:b1] if ok else []
        else:  # only the answer's tokens are known: swap them, spelled as after a space
            ids = _encode(tokenizer, " " + alt)
            ok = len(ids) == s1 - s0
            new_answer = ids
        tried.append(f"{alt!r} ({len(ids)} tokens)")
        if not ok or list(new_answer) == list(clean_answer):
            continue
        if new_answer[0] != clean_answer[0]:
            return list(ids), alt
        fallback = fallback or (list(ids), alt)  # differs later: usable, but less direct
    if fallback is not None:
        return fallback
    want = f"{r1 - r0} needle tokens" if whole_sentence else f"{s1 - s0} answer tokens"
    raise ProbeError(
        f"needle {probe.needle_id!r}: no alternative answer keeps the original {want} with the "
        f"answer in the same place (tried {', '.join(tried) or 'none'}); pass "
        f"alternatives={{{probe.needle_id!r}: [...]}} with answers of the same token length, "
        "or use kind='remove'"
    )


def _neutral_tokens(tokenizer, n: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < n:
        ids += _encode(tokenizer, _NEUTRAL_FILLER)
    return ids[:n]


def _reply_prefix(tokenizer, probe: Probe, how: AnswerPrefix, model) -> tuple[list[int], str]:
    """Tokens of the teacher-forced reply start, and where they came from."""
    r0, _ = _needle_region(probe)
    s0, s1 = probe.needle_span
    if how == "none":
        return [], "none"
    if how == "model":
        gen = generate(model, tokenizer, probe.prompt_ids)
        answer = list(probe.prompt_ids[s0:s1])
        at = _find(gen.response_ids, answer)
        if at < 0:
            at = _find(gen.response_ids, answer[:1])
        if at >= 0:
            return list(gen.response_ids[:at]), "model"
        how = "needle"  # the model did not say the answer: fall back to the needle's words
        source = "needle (the model's reply lacks the answer)"
    else:
        source = "needle"
    if r0 == s0:
        return [], "none (needle sentence unknown or answer first)"
    text = tokenizer.decode(list(probe.prompt_ids[r0:s0])).strip()
    return _encode(tokenizer, text), source


@torch.no_grad()
def _top_other_token(model, ids: Sequence[int], pos: int, exclude: int) -> int:
    """The corrupted run's most likely token at ``pos`` other than ``exclude``."""
    hf = hf_model(model)
    device = next(hf.parameters()).device
    x = torch.tensor([list(ids[:pos + 1])], device=device)
    with native_attention(model):
        logits = hf(input_ids=x, use_cache=False, logits_to_keep=1).logits[0, -1].float()
    logits[exclude] = -math.inf
    return int(logits.argmax())


def make_pairs(tokenizer, probes_or_config: ProbeSet | Sequence[Probe] | ProbeConfig | None = None,
               *, kind: Kind = "swap", answer_prefix: AnswerPrefix = "needle",
               alternatives: Mapping[str, Sequence[str]] | None = None,
               needles: Sequence[Needle] | None = None,
               haystack: str | Path | Haystack | None = None, model=None) -> list[PatchPair]:
    """Clean/corrupted pairs from needle-in-a-haystack probes (same haystack, same question).

    Args:
        tokenizer: the model's tokenizer.
        probes_or_config: probes (from :func:`rhlens.probes.build_probes` or hand-made) or a
            :class:`ProbeConfig` to build them from (default: one 500-token probe per needle).
        kind: ``"swap"``: the needle's answer becomes another one of the same type and token
            length (:data:`ALTERNATIVE_ANSWERS`, or ``alternatives``); ``"remove"``: the
            needle sentence becomes neutral filler of the same token length.
        answer_prefix: the reply fed to both runs before the answer. ``"needle"``: the
            needle's words before the answer ("The password ... is"); ``"model"``: the
            model's own greedy reply to the clean prompt up to the answer (needs ``model``;
            falls back to ``"needle"`` when the reply lacks the answer); ``"none"``: the
            answer is the very next token after the prompt.
        alternatives: extra or replacement alternative answers per needle id.
        needles, haystack: passed to ``build_probes`` when a config is given.
        model: needed for ``answer_prefix="model"``; with ``kind="remove"`` it also names the
            corrupted answer (the corrupted run's most likely token other than the clean one),
            which the logit-difference metric needs.
    """
    if kind not in ("swap", "remove"):
        raise ConfigError(f"kind must be 'swap' or 'remove', got {kind!r}")
    if answer_prefix not in ("needle", "model", "none"):
        raise ConfigError(f"answer_prefix must be 'needle', 'model' or 'none', got {answer_prefix!r}")
    if answer_prefix == "model" and model is None:
        raise ConfigError("answer_prefix='model' needs model=: the reply is the model's own")
    known = list(needles or BUILTIN_NEEDLES)
    if probes_or_config is None or isinstance(probes_or_config, ProbeConfig):
        config = probes_or_config or ProbeConfig(lengths=(500,), depths=(50.0,))
        probes = build_probes(tokenizer, config=config, needles=needles, haystack=haystack).probes
    elif isinstance(probes_or_config, ProbeSet):
        probes = list(probes_or_config.probes)
        known = list(probes_or_config.needles) or known
    else:
        probes = list(probes_or_config)
    if not probes:
        raise ProbeError("no probes to make pairs from")
    by_id = {n.id: n for n in known}
    alts = dict(ALTERNATIVE_ANSWERS)
    for key, values in (alternatives or {}).items():
        alts[key] = (values,) if isinstance(values, str) else tuple(values)

    pairs = []
    for probe in probes:
        if not isinstance(probe, Probe):
            raise ProbeError(f"expected Probe objects, got {type(probe).__name__}")
        r0, r1 = _needle_region(probe)
        s0, s1 = probe.needle_span
        prompt = list(probe.prompt_ids)
        clean_answer = prompt[s0:s1]
        if kind == "swap":
            new, alt = _swap_needle(tokenizer, probe, by_id.get(probe.needle_id),
                                    alts.get(probe.needle_id, ()))
            corrupted = prompt[:r0] + new + prompt[r1:]
            corrupted_answer = corrupted[s0:s1]
            alt_text = alt
        else:
            corrupted = prompt[:r0] + _neutral_tokens(tokenizer, r1 - r0) + prompt[r1:]
            corrupted_answer, alt_text = [], None
        prefix, prefix_source = _reply_prefix(tokenizer, probe, answer_prefix, model)
        labels = {"key": probe.key, "needle_id": probe.needle_id, "length": probe.length,
                  "depth": probe.depth, "kind": kind, "clean_answer": probe.real_needle,
                  "corrupted_answer": alt_text, "answer_prefix": prefix_source,
                  "needle_region": [r0, r1], "needle_span": [s0, s1]}
        pair = make_pair(prompt, corrupted, clean_answer, corrupted_answer,
                         response_prefix=prefix, labels=labels)
        if kind == "remove" and model is not None:
            tok = _top_other_token(model, pair.corrupted_ids, pair.answer_pos, pair.clean_token)
            labels["corrupted_answer"] = tokenizer.decode([tok])
            pair = make_pair(prompt, corrupted, clean_answer, [tok], response_prefix=prefix,
                             labels=labels)
        pairs.append(pair)
    return pairs


# ---------------------------------------------------------------------------------------
# Configuration and the metric
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PatchConfig:
    """How :func:`patch_heads` patches.

    Attributes:
        mode: ``"exact"`` (one patched run per head, batched) or ``"attribution"`` (one
            forward + backward per pair; a linear estimate, for long contexts).
        direction: ``"denoise"``: clean ``z`` into the corrupted run (does this head bring
            the answer back?); ``"noise"``: corrupted ``z`` into the clean run (does losing
            it break the answer?).
        positions: ``"answer"``: patch only where the model answers (where a retrieval
            head copies): the answer position, and for the log-prob metric the teacher-forced
            answer tokens after it; ``"all"``: every position.
        metric: ``"logit_diff"``: clean minus corrupted first-differing-token logit at the
            answer position; ``"logprob"``: summed log-prob of the clean answer's tokens
            from the first differing one on.
        layers: layers to patch (``None``: all). Others get NaN effects.
        batch_size: patched copies per forward (``None``: one layer's heads). Bounds memory:
            with ``positions="answer"`` each copy holds its own KV cache of the prompt.
        min_gap: pairs whose clean and corrupted metrics differ by less cannot be normalised
            and get NaN effects (they say nothing about any head).
    """

    mode: Mode = "exact"
    direction: Direction = "denoise"
    positions: Positions = "answer"
    metric: MetricName = "logit_diff"
    layers: tuple[int, ...] | None = None
    batch_size: int | None = None
    min_gap: float = 1e-3

    def __post_init__(self) -> None:
        choices = {"mode": ("exact", "attribution"), "direction": ("denoise", "noise"),
                   "positions": ("all", "answer"), "metric": ("logit_diff", "logprob")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}; "
                                  f"got {getattr(self, name)!r}")
        if self.layers is not None:
            layers = tuple(sorted({int(x) for x in self.layers}))
            if not layers:
                raise ConfigError("layers is empty; pass None to patch every layer")
            if layers[0] < 0:
                raise ConfigError(f"layers must be >= 0, got {layers}")
            object.__setattr__(self, "layers", layers)
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1 (patched copies per forward), got {self.batch_size}")
        if not self.min_gap >= 0:
            raise ConfigError(f"min_gap must be >= 0, got {self.min_gap}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = list(self.layers) if self.layers is not None else None
        return d


def _metric(logits: Float[Tensor, "batch answer vocab"], pair: PatchPair,
            metric: MetricName) -> Float[Tensor, " batch"]:
    logits = logits.float()
    if metric == "logit_diff":
        return logits[:, 0, pair.clean_token] - logits[:, 0, pair.corrupted_token]
    targets = torch.tensor(pair.targets, device=logits.device)
    logp = logits.log_softmax(-1)
    return logp[:, torch.arange(len(targets), device=logits.device), targets].sum(-1)


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
class _PairRunner:
    """The forward passes of one pair: capture the source, run the (patched) target."""

    def __init__(self, model, pair: PatchPair, config: PatchConfig) -> None:
        self.model, self.hf, self.pair, self.config = model, hf_model(model), pair, config
        self.device = next(self.hf.parameters()).device
        # The logit difference is read at answer_pos alone, and no later position can change
        # it: the teacher-forced answer tokens after it are run for the log-prob metric only.
        self.end = pair.answer_pos + 1 if config.metric == "logit_diff" else pair.n_tokens
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
        return float(_metric(logits, self.pair, self.config.metric)[0]), zs

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
        widen = (f"blocks.{first}.hook_in", lambda t, hook=None: t.repeat(k, *([1] * (t.ndim - 1))))
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
        return _metric(logits, self.pair, self.config.metric).float().cpu()

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
            value = _metric(logits, self.pair, self.config.metric)[0]
            grads = torch.autograd.grad(value, [deltas[layer] for layer in layers])
        attr = torch.stack([
            (g * (src[layer].to(g.dtype) - ztgt[layer])).sum(dim=(0, 1, 3))
            for layer, g in zip(layers, grads)
        ]).float().cpu()
        if attr.shape[1] != n_heads:  # pragma: no cover - bridge invariant
            raise ConfigError(f"hook_z has {attr.shape[1]} heads, the model {n_heads}")
        return float(value.detach()), attr


def _model_name(model) -> str:
    return getattr(model, "rhlens_name", None) or str(getattr(model.cfg, "model_name", "model"))


def _check(model, pairs: Sequence[PatchPair], config: PatchConfig) -> tuple[int, ...]:
    if not pairs:
        raise ConfigError("no pairs given")
    n_layers = int(model.cfg.n_layers)
    layers = config.layers if config.layers is not None else tuple(range(n_layers))
    if layers[-1] >= n_layers:
        raise ConfigError(f"layers {layers} go past this model's {n_layers} layers")
    vocab = int(model.cfg.d_vocab)
    n_ctx = getattr(model.cfg, "n_ctx", None)
    for i, p in enumerate(pairs):
        if not isinstance(p, PatchPair):
            raise ConfigError(f"pairs[{i}] is a {type(p).__name__}, not a PatchPair (see make_pairs)")
        if config.metric == "logit_diff" and p.corrupted_token is None:
            raise ConfigError(
                f"pair {p.labels.get('key', i)} has no corrupted answer, so the logit difference "
                "is undefined: pass model= to make_pairs (a removed needle then uses the corrupted "
                "run's own prediction) or use metric='logprob'")
        if max(max(p.clean_ids), max(p.corrupted_ids), max(p.clean_answer_ids)) >= vocab:
            raise ConfigError(f"pair {p.labels.get('key', i)} holds token ids beyond the model's "
                              f"vocabulary of {vocab}: made with another tokenizer?")
        if n_ctx is not None and p.n_tokens > int(n_ctx):
            raise ConfigError(f"pair {p.labels.get('key', i)} has {p.n_tokens} tokens, more than "
                              f"the model's context of {n_ctx}")
    return tuple(layers)


def _normalise(patched: Tensor, clean: Tensor, corrupted: Tensor, direction: Direction,
               min_gap: float) -> Tensor:
    """1 = the head carries all of the clean-vs-corrupted difference, 0 = none of it."""
    shape = (-1,) + (1,) * (patched.ndim - 1)
    gap = (clean - corrupted).view(shape)
    if direction == "denoise":
        eff = (patched - corrupted.view(shape)) / gap
    else:
        eff = (clean.view(shape) - patched) / gap
    return torch.where(gap.abs() >= min_gap, eff, torch.full_like(eff, math.nan))


# ---------------------------------------------------------------------------------------
# The analysis
# ---------------------------------------------------------------------------------------
def patch_heads(model, pairs: Sequence[PatchPair], *, config: PatchConfig | None = None,
                progress: bool = False) -> HeadPatchingResult:
    """The causal effect of every head of ``config.layers`` on each pair.

    Args:
        model: a TransformerBridge (``rhlens.load_model``).
        pairs: from :func:`make_pairs` or :func:`make_pair`.
        config: :class:`PatchConfig`.
        progress: show a tqdm bar over pairs.

    Returns:
        :class:`HeadPatchingResult` with ``effects[pair, layer, head]`` (1 = this head alone
        carries the clean-vs-corrupted difference, 0 = it carries nothing).
    """
    config = config or PatchConfig()
    pairs = list(pairs)
    layers = _check(model, pairs, config)
    n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
    patched = torch.full((len(pairs), n_layers, n_heads), math.nan)
    clean = torch.zeros(len(pairs))
    corrupted = torch.zeros(len(pairs))
    seconds: list[float] = []
    cells = [(layer, head) for layer in layers for head in range(n_heads)]
    batch = config.batch_size or n_heads
    it = pairs
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(pairs, desc=f"patch ({config.mode})", unit="pair")
    for p, pair in enumerate(it):
        t0 = time.perf_counter()
        runner = _PairRunner(model, pair, config)
        source_metric, src = runner.capture(layers)
        if config.mode == "exact":
            target_metric = float(runner.run([{}], src)[0])
            for s in range(0, len(cells), batch):
                chunk = cells[s:s + batch]
                values = runner.run([{layer: [head]} for layer, head in chunk], src)
                for (layer, head), v in zip(chunk, values.tolist()):
                    patched[p, layer, head] = v
        else:
            target_metric, attr = runner.attribution(layers, src, n_heads)
            patched[p, list(layers)] = target_metric + attr
        del src
        if config.direction == "denoise":
            clean[p], corrupted[p] = source_metric, target_metric
        else:
            clean[p], corrupted[p] = target_metric, source_metric
        seconds.append(round(time.perf_counter() - t0, 4))
    effects = _normalise(patched, clean, corrupted, config.direction, config.min_gap)
    records = [{**pair.labels, "n_tokens": pair.n_tokens, "answer_pos": pair.answer_pos,
                "clean_token": pair.clean_token, "corrupted_token": pair.corrupted_token}
               for pair in pairs]
    return HeadPatchingResult(effects=effects, patched=patched, clean=clean, corrupted=corrupted,
                              model_name=_model_name(model), config=config.to_dict(),
                              pairs=records, seconds=seconds)


def patch_head_set(model, pairs: Sequence[PatchPair], heads: Sequence[Head], *,
                   config: PatchConfig | None = None) -> Float[Tensor, " pair"]:
    """Patch all of ``heads`` at once; the normalised metric of each pair's patched run.

    The value is ``(m - m_corrupted) / (m_clean - m_corrupted)``: 1 is clean behaviour, 0
    corrupted. Denoising every head of every layer at ``positions="answer"`` or ``"all"``
    gives 1 (the answer position then sees only clean attention outputs); no heads gives 0.
    ``config.mode`` is ignored (this is always an exact run).
    """
    config = config or PatchConfig()
    pairs = list(pairs)
    _check(model, pairs, config)
    by_layer: dict[int, list[int]] = {}
    n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
    for item in heads:
        layer, head = (int(x) for x in item)
        if not (0 <= layer < n_layers and 0 <= head < n_heads):
            raise ConfigError(f"head ({layer}, {head}) is outside this model's "
                              f"{n_layers} layers x {n_heads} heads")
        by_layer.setdefault(layer, []).append(head)
    out = torch.zeros(len(pairs))
    for p, pair in enumerate(pairs):
        runner = _PairRunner(model, pair, config)
        source_metric, src = runner.capture(sorted(by_layer))
        both = runner.run([{}, by_layer], src) if by_layer else runner.run([{}], src).repeat(2)
        target_metric, value = float(both[0]), float(both[1])
        if config.direction == "denoise":
            c, r = source_metric, target_metric
        else:
            c, r = target_metric, source_metric
        out[p] = (value - r) / (c - r) if abs(c - r) >= config.min_gap else math.nan
    return out


# ---------------------------------------------------------------------------------------
# The result
# ---------------------------------------------------------------------------------------
def save_bundle(directory: str | Path, tensors: dict[str, Tensor], meta: dict[str, Any],
                kind: str) -> Path:
    """The format before rhlens.results (rhlens/_result.py, removed): kept here only until
    HeadPatchingResult saves through rhlens.results."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / ".tensors.safetensors.tmp"
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    tmp.replace(directory / "tensors.safetensors")
    atomic_write_text(directory / "meta.json", json.dumps({"kind": kind, **meta}, indent=1))
    return directory


def load_bundle(directory: str | Path, kind: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read what :func:`save_bundle` wrote (see there)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    if not (directory / "meta.json").exists():
        raise FileNotFoundError(f"{directory} holds no saved rhlens result (no meta.json)")
    meta = json.loads((directory / "meta.json").read_text())
    if meta.get("kind") != kind:
        raise ValueError(f"{directory} holds a {meta.get('kind')!r} result, not {kind!r}")
    return load_file(str(directory / "tensors.safetensors")), meta


@dataclass
class HeadPatchingResult:
    """Per-pair, per-head causal effects, and the raw metric values they come from.

    Attributes:
        effects: normalised effect; 1 = the head alone carries the clean-vs-corrupted
            difference (denoise: restores it, noise: destroys it), 0 = nothing; NaN for
            layers not patched and for pairs whose two runs do not differ.
        patched: the metric of each patched run (attribution: its linear estimate).
        clean, corrupted: the metric of the unpatched clean and corrupted runs.
        model_name: the model.
        config: the :class:`PatchConfig` used, as a dict.
        pairs: one metadata dict per pair (its labels, length, answer position, tokens).
        seconds: wall time per pair.
    """

    effects: Float[Tensor, "pair layer head"]
    patched: Float[Tensor, "pair layer head"]
    clean: Float[Tensor, " pair"]
    corrupted: Float[Tensor, " pair"]
    model_name: str
    config: dict[str, Any] = field(default_factory=dict)
    pairs: list[dict[str, Any]] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    @property
    def n_pairs(self) -> int:
        return self.effects.shape[0]

    @property
    def n_layers(self) -> int:
        return self.effects.shape[1]

    @property
    def n_heads(self) -> int:
        return self.effects.shape[2]

    @property
    def mean(self) -> Float[Tensor, "layer head"]:
        """Each head's effect averaged over the pairs that have one (NaN: never patched)."""
        ok = torch.isfinite(self.effects)
        total = torch.where(ok, self.effects, torch.zeros_like(self.effects)).sum(0)
        count = ok.sum(0)
        return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, math.nan))

    def top(self, k: int = 10) -> list[tuple[int, int, float]]:
        """The ``k`` heads of largest mean effect as ``(layer, head, effect)``, largest first."""
        if k < 0:
            raise ConfigError(f"k must be >= 0, got {k}")
        flat = self.mean.flatten()
        finite = torch.isfinite(flat)
        k = min(k, int(finite.sum()))
        values, idx = torch.where(finite, flat, torch.full_like(flat, -math.inf)).topk(k)
        return [(int(i) // self.n_heads, int(i) % self.n_heads, float(v)) for v, i in zip(values, idx)]

    def top_heads(self, k: int = 10) -> list[Head]:
        return [(layer, head) for layer, head, _ in self.top(k)]

    def to_dataframe(self):
        """One row per patched head: layer, head, mean effect, its std over pairs, pairs used."""
        import pandas as pd

        rows = []
        for layer in range(self.n_layers):
            for head in range(self.n_heads):
                vals = self.effects[:, layer, head]
                vals = vals[torch.isfinite(vals)]
                if not len(vals):
                    continue
                rows.append({"layer": layer, "head": head, "effect": float(vals.mean()),
                             "std": float(vals.std()) if len(vals) > 1 else 0.0,
                             "n_pairs": len(vals)})
        return pd.DataFrame(rows).sort_values("effect", ascending=False, ignore_index=True)

    def subset(self, index: Sequence[int]) -> HeadPatchingResult:
        """The same result restricted to some pairs (e.g. to compare with a slower run)."""
        idx = [int(i) for i in index]
        if not idx or not all(0 <= i < self.n_pairs for i in idx):
            raise ConfigError(f"pair indices must lie in [0, {self.n_pairs}), got {idx}")
        return HeadPatchingResult(
            effects=self.effects[idx], patched=self.patched[idx], clean=self.clean[idx],
            corrupted=self.corrupted[idx], model_name=self.model_name, config=dict(self.config),
            pairs=[self.pairs[i] for i in idx] if self.pairs else [],
            seconds=[self.seconds[i] for i in idx] if self.seconds else [])

    def to_transformer_lens(self):
        """The raw values as TransformerLens' ``PatchingResult`` (axes ``layer, head``,
        per-pair values, the unpatched target run as baseline), for its statistics:
        ``.stderr()``, ``.bootstrap_ci()``, ``.permutation_pvalue()``, and
        ``.normalized(clean)`` (= :attr:`effects` when denoising)."""
        from transformer_lens.patching import PatchingResult, make_df_from_ranges

        denoise = self.config.get("direction", "denoise") == "denoise"
        return PatchingResult(
            values=self.patched.permute(1, 2, 0).contiguous(),
            axis_names=["layer", "head"],
            index_df=make_df_from_ranges([self.n_layers, self.n_heads], ["layer", "head"]),
            metric_names=[str(self.config.get("metric", "metric"))],
            reduced=False,
            baseline=(self.corrupted if denoise else self.clean).clone(),
        )

    def __repr__(self) -> str:
        c = self.config
        top = ", ".join(f"L{la}H{h}={e:.2f}" for la, h, e in self.top(3))
        return (f"HeadPatchingResult({self.model_name!r}, {self.n_pairs} pairs, "
                f"{c.get('mode')}/{c.get('direction')}/{c.get('positions')}/{c.get('metric')}, "
                f"top: {top})")

    def save(self, directory: str | Path) -> Path:
        """Write ``tensors.safetensors`` + ``meta.json`` into ``directory``."""
        meta = {"model_name": self.model_name, "config": self.config, "pairs": self.pairs,
                "seconds": self.seconds}
        tensors = {"effects": self.effects, "patched": self.patched, "clean": self.clean,
                   "corrupted": self.corrupted}
        return save_bundle(directory, {k: v.float() for k, v in tensors.items()}, meta,
                           kind="HeadPatchingResult")

    @classmethod
    def load(cls, directory: str | Path) -> HeadPatchingResult:
        tensors, meta = load_bundle(directory, kind="HeadPatchingResult")
        return cls(effects=tensors["effects"], patched=tensors["patched"], clean=tensors["clean"],
                   corrupted=tensors["corrupted"], model_name=meta["model_name"],
                   config=meta.get("config", {}), pairs=meta.get("pairs", []),
                   seconds=[float(s) for s in meta.get("seconds", [])])


def _finite_pair(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    ok = torch.isfinite(a) & torch.isfinite(b)
    return a[ok].double(), b[ok].double()


def compare_patching(reference: HeadPatchingResult, estimate: HeadPatchingResult, *, k: int = 10,
                     min_effect: float = 0.05) -> dict[str, float]:
    """How well ``estimate`` (e.g. attribution) reproduces ``reference`` (e.g. exact patching).

    Returns Spearman and Pearson correlations of the heads' mean effects, the mean per-pair
    Spearman, the fraction of heads with ``|reference effect| >= min_effect`` whose sign
    agrees, and the overlap of the two top-``k`` lists.
    """
    from rhlens.properties import pearson, spearman

    if reference.effects.shape[1:] != estimate.effects.shape[1:]:
        raise ConfigError("the two results cover different head grids")
    a, b = _finite_pair(reference.mean.flatten(), estimate.mean.flatten())
    if len(a) < 2:
        raise ConfigError("fewer than two heads have an effect in both results")
    per_pair = []
    if reference.n_pairs == estimate.n_pairs:
        for p in range(reference.n_pairs):
            x, y = _finite_pair(reference.effects[p].flatten(), estimate.effects[p].flatten())
            if len(x) > 1:
                per_pair.append(spearman(x, y))
    big = a.abs() >= min_effect
    sign = float(((a[big] > 0) == (b[big] > 0)).double().mean()) if big.any() else math.nan
    top_a, top_b = set(reference.top_heads(k)), set(estimate.top_heads(k))
    return {"spearman": spearman(a, b), "pearson": pearson(a, b),
            "spearman_per_pair": float(sum(per_pair) / len(per_pair)) if per_pair else math.nan,
            "sign_agreement": sign, "n_large": int(big.sum()),
            f"top{k}_overlap": len(top_a & top_b) / max(1, min(k, len(top_a)))}


# ---------------------------------------------------------------------------------------
# Patching against retrieval scores
# ---------------------------------------------------------------------------------------
@dataclass
class PatchingVsRetrieval:
    """Per-head causal effect against retrieval score, and the heads where they disagree.

    Attributes:
        effect, score: mean patching effect and mean retrieval score of every head.
        spearman, pearson: correlations over the heads that have both.
        causal_not_retrieval: heads with effect >= ``effect_threshold`` but retrieval score
            < ``score_threshold``, as ``(layer, head, effect, score)``, largest effect first.
        retrieval_not_causal: heads with score >= ``score_threshold`` but effect <
            ``effect_threshold``, largest score first.
        both: heads above both thresholds, largest effect first.
    """

    effect: Float[Tensor, "layer head"]
    score: Float[Tensor, "layer head"]
    spearman: float
    pearson: float
    causal_not_retrieval: list[tuple[int, int, float, float]]
    retrieval_not_causal: list[tuple[int, int, float, float]]
    both: list[tuple[int, int, float, float]]
    effect_threshold: float
    score_threshold: float
    model_name: str = ""
    scores_model_name: str = ""
    patch_config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        def rows(items):
            return [{"layer": la, "head": h, "effect": e, "score": s}
                    for la, h, e, s in items]

        return {"kind": "PatchingVsRetrieval", "model_name": self.model_name,
                "scores_model_name": self.scores_model_name, "spearman": self.spearman,
                "pearson": self.pearson, "effect_threshold": self.effect_threshold,
                "score_threshold": self.score_threshold, "patch_config": self.patch_config,
                "causal_not_retrieval": rows(self.causal_not_retrieval),
                "retrieval_not_causal": rows(self.retrieval_not_causal), "both": rows(self.both),
                "effect": [[None if math.isnan(x) else x for x in row] for row in self.effect.tolist()],
                "score": self.score.tolist()}

    def save(self, path: str | Path) -> Path:
        """Write the comparison as one JSON file."""
        path = Path(path)
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> PatchingVsRetrieval:
        d = json.loads(Path(path).read_text())
        if d.get("kind") != "PatchingVsRetrieval":
            raise ConfigError(f"{path} holds no PatchingVsRetrieval comparison")

        def rows(items):
            return [(r["layer"], r["head"], r["effect"], r["score"]) for r in items]

        effect = torch.tensor([[math.nan if x is None else x for x in row] for row in d["effect"]])
        return cls(effect=effect, score=torch.tensor(d["score"]), spearman=d["spearman"],
                   pearson=d["pearson"], causal_not_retrieval=rows(d["causal_not_retrieval"]),
                   retrieval_not_causal=rows(d["retrieval_not_causal"]), both=rows(d["both"]),
                   effect_threshold=d["effect_threshold"], score_threshold=d["score_threshold"],
                   model_name=d.get("model_name", ""), scores_model_name=d.get("scores_model_name", ""),
                   patch_config=d.get("patch_config", {}))


def patching_vs_retrieval(result: HeadPatchingResult, scores: RetrievalScores, *,
                          effect_threshold: float = 0.1,
                          score_threshold: float = 0.1) -> PatchingVsRetrieval:
    """Do the heads that carry the needle causally match the heads that copy it?

    Args:
        result: from :func:`patch_heads`.
        scores: retrieval scores of the same model (same layer x head grid).
        effect_threshold: a "causal" head restores (or destroys) at least this fraction.
        score_threshold: a "retrieval" head scores at least this (the paper: 0.1).
    """
    score = scores.mean.float()
    effect = result.mean
    if tuple(score.shape) != tuple(effect.shape):
        raise ConfigError(f"the retrieval scores cover {tuple(score.shape)} (layer, head) and the "
                          f"patching result {tuple(effect.shape)}: not the same model?")
    ok = torch.isfinite(effect) & torch.isfinite(score)
    if int(ok.sum()) < 3:
        raise ConfigError("fewer than three heads have both a patching effect and a retrieval score")
    from rhlens.properties import pearson, spearman

    rho = spearman(effect[ok].double(), score[ok].double())
    r = pearson(effect[ok].double(), score[ok].double())
    cells = [(la, h, float(effect[la, h]), float(score[la, h]))
             for la in range(effect.shape[0]) for h in range(effect.shape[1]) if ok[la, h]]
    causal = [c for c in cells if c[2] >= effect_threshold]
    retrieval = [c for c in cells if c[3] >= score_threshold]
    return PatchingVsRetrieval(
        effect=effect, score=score, spearman=rho, pearson=r,
        causal_not_retrieval=sorted((c for c in causal if c[3] < score_threshold), key=lambda c: -c[2]),
        retrieval_not_causal=sorted((c for c in retrieval if c[2] < effect_threshold),
                                    key=lambda c: -c[3]),
        both=sorted((c for c in causal if c[3] >= score_threshold), key=lambda c: -c[2]),
        effect_threshold=effect_threshold, score_threshold=score_threshold,
        model_name=result.model_name, scores_model_name=scores.model_name,
        patch_config=dict(result.config),
    )
