"""Clean/corrupted prompt pairs for patching: two prompts of one length that differ only in the needle.

A *pair* is two prompts of the same length that differ only in the needle: the clean one
holds the needle with its answer, the corrupted one the same needle with another answer of
the same token length (``kind="swap"``) or neutral filler instead of the needle
(``kind="remove"``). Both get the same teacher-forced reply appended (by default the needle's
own words before the answer, e.g. "The password for the old observatory on Karsk Hill is"),
so the next token predicted at the *answer position* is the answer's first differing token,
and the clean answer's remaining tokens follow, teacher-forced, for the log-prob metric.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from rhlens.engine import generate, hf_model, native_attention
from rhlens.errors import ConfigError, ProbeError
from rhlens.probes import (
    BUILTIN_NEEDLES,
    Haystack,
    Needle,
    ProbeConfig,
    ProbeSet,
    build_probes,
    needle_tokens,
)
from rhlens.probes.probe import Probe

__all__ = ["ALTERNATIVE_ANSWERS", "PatchPair", "make_pair", "make_pairs"]

Kind = Literal["swap", "remove"]
AnswerPrefix = Literal["needle", "model", "none"]

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

    @property
    def digest(self) -> str:
        """A hash of everything that decides the pair's numbers (its tokens and answer
        position; not its labels): the identity a resumed run checks."""
        content = [list(self.clean_ids), list(self.corrupted_ids), list(self.clean_answer_ids),
                   list(self.corrupted_answer_ids), self.answer_pos]
        return hashlib.sha256(json.dumps(content).encode()).hexdigest()[:16]

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
            ids, (b0, b1) = needle_tokens(tokenizer, Needle(sentence.replace(real, alt, 1),
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
