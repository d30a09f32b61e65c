"""Needle-in-a-haystack probes: haystacks, needles, the probe grid, and exact needle spans.

A probe is built at the token level, as the paper's harness does: the haystack is
tokenized once, cut to the length budget, the needle's tokens are inserted at the depth's
position moved back to the nearest sentence end (``placement="sentence"``, the paper's rule)
or exactly there (``placement="token"``), and the prompt template's tokens are put around it.
Each probe records where its needle really went (``placed_depth``, ``insert_token``), and two
requested depths that land on the same position are reported (:class:`PlacementWarning`).
Because the needle's tokens are placed (not searched for), its span is known exactly; the
answer (``real_needle``) is located inside the needle on token boundaries through the
tokenizer's character offsets (never inside another word), so a tokenizer that merges
across the answer's edge still gets the right tokens. Anything that cannot be located
raises :class:`ProbeError` (the paper's code silently scored such probes 0).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rhlens.errors import ConfigError, ProbeError
from rhlens.probes.haystacks import (
    Haystack,
    make_haystack,
    sha256_text,
)
from rhlens.probes.probe import Probe
from rhlens.store.identity import probes_identity
from rhlens.store.results import Config
from rhlens.validate import input_file

__all__ = ["BUILTIN_NEEDLES", "Needle", "PlacementWarning", "ProbeConfig", "ProbeSet", "build_probe",
           "build_probes", "check_placements", "load_needles", "needle_tokens"]



# --------------------------------------------------------------------------------------
# Needles
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Needle:
    """A fact hidden in the haystack, the question only it answers, and the expected answer.

    Field names follow the paper's needle files: ``needle``, ``question``, ``real_needle``.
    """

    needle: str
    question: str
    real_needle: str
    id: str = "needle"

    @property
    def sha256(self) -> str:
        """Content hash of the needle (its id and three texts)."""
        return sha256_text(json.dumps([self.id, self.needle, self.question, self.real_needle]))

    def __post_init__(self) -> None:
        for name in ("needle", "question", "real_needle"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                raise ProbeError(f"needle {self.id!r}: field {name!r} must be a non-empty string")
        if self.real_needle.strip() not in self.needle:
            raise ProbeError(
                f"needle {self.id!r}: real_needle {self.real_needle!r} does not occur in the "
                f"needle sentence {self.needle!r}; the answer must be copied from the needle"
            )


# Written for rhlens: invented facts no model can know without reading the context.
BUILTIN_NEEDLES: tuple[Needle, ...] = (
    Needle(
        needle="The secret ingredient in Marta's lighthouse soup is smoked blue cardamom "
        "from the island of Vell.",
        question="What is the secret ingredient in Marta's lighthouse soup?",
        real_needle="smoked blue cardamom from the island of Vell",
        id="lighthouse-soup",
    ),
    Needle(
        needle="The password for the old observatory on Karsk Hill is amber falcon seventeen.",
        question="What is the password for the old observatory on Karsk Hill?",
        real_needle="amber falcon seventeen",
        id="observatory-password",
    ),
    Needle(
        needle="The best way to calm the dragon of Pellmoor is to sing it a song about "
        "copper kettles.",
        question="What is the best way to calm the dragon of Pellmoor?",
        real_needle="sing it a song about copper kettles",
        id="pellmoor-dragon",
    ),
    Needle(
        needle="The key to the glass museum in Orlen is hidden under the third green teapot.",
        question="Where is the key to the glass museum in Orlen hidden?",
        real_needle="under the third green teapot",
        id="orlen-key",
    ),
)


def load_needles(path: str | Path) -> list[Needle]:
    """Needles from a JSONL file, one ``{"needle", "question", "real_needle"}`` object a line.

    An optional ``"id"`` names the needle (default: ``<file stem>-<line>``).
    """
    path = input_file(path, "needles file", hint="give a .jsonl file")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (Windows editors) is fine
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}, line {line}: not UTF-8 text ({exc.reason} at byte "
                          f"{exc.start}); save the file as UTF-8") from None
    needles, numbers = [], []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}, line {lineno}: not valid JSON ({exc.msg})") from exc
        if not isinstance(obj, dict):
            raise ConfigError(f"{path}, line {lineno}: expected a JSON object")
        missing = [k for k in ("needle", "question", "real_needle") if k not in obj]
        if missing:
            raise ConfigError(f"{path}, line {lineno}: missing field(s) {', '.join(missing)}")
        try:
            nid = obj.get("id", f"{path.stem}-{lineno}")
            if isinstance(nid, bool) or not isinstance(nid, (str, int)) or not str(nid).strip():
                raise ProbeError(f"field 'id' must be a non-empty string, got {nid!r}")
            needles.append(Needle(obj["needle"], obj["question"], obj["real_needle"], str(nid)))
            numbers.append(lineno)
        except ProbeError as exc:
            raise ConfigError(f"{path}, line {lineno}: {exc}") from exc
    if not needles:
        raise ConfigError(f"needles file {path} holds no needles")
    lines: dict[str, int] = {}
    for lineno, n in zip(numbers, needles):
        if n.id in lines:
            raise ConfigError(f"{path}, line {lineno}: needle id {n.id!r} is already the id of "
                              f"line {lines[n.id]}; give each needle its own id")
        lines[n.id] = lineno
    return needles


# --------------------------------------------------------------------------------------
# Prompt and probe grid
# --------------------------------------------------------------------------------------
DEFAULT_TEMPLATE = (
    "This is a very long document:\n<document>\n{context}\n</document>\n"
    "Based on the content of the document, answer the question in a short sentence.\n"
    "Question: {question}"
)


Placement = Literal["sentence", "token"]


@dataclass(frozen=True)
class ProbeConfig(Config):
    """The probe grid: context lengths x needle depths x needles.

    Attributes:
        lengths: total prompt budgets in tokens (prompt + ``answer_buffer``).
        depths: needle depths in percent (0 = start of the haystack, 100 = end).
        answer_buffer: tokens left free for the answer, as in the paper's harness (200).
        chat_template: wrap the prompt in the tokenizer's chat template when it has one.
        template: the user message; must contain ``{context}`` and ``{question}``.
        haystack_seed: seed of the synthetic haystack.
        min_haystack_tokens: refuse lengths that leave fewer haystack tokens than this.
        placement: ``"sentence"`` (the paper's rule: the needle goes after the last sentence
            end at or before the depth's token) or ``"token"`` (exactly at the depth's token,
            even mid-sentence). Two depths that land on one position are reported
            (:func:`check_placements`).
    """

    lengths: Sequence[int] = (500, 1000, 1500, 2000)
    depths: Sequence[float | int] = (0.0, 25.0, 50.0, 75.0, 100.0)
    answer_buffer: int = 200
    chat_template: bool = True
    template: str = DEFAULT_TEMPLATE
    haystack_seed: int = 0
    min_haystack_tokens: int = 16
    placement: Placement = "sentence"

    def __post_init__(self) -> None:
        object.__setattr__(self, "lengths", tuple(int(x) for x in self.lengths))
        object.__setattr__(self, "depths", tuple(float(x) for x in self.depths))
        if not self.lengths:
            raise ConfigError("lengths is empty")
        if any(x <= 0 for x in self.lengths):
            raise ConfigError(f"lengths must be positive, got {self.lengths}")
        if not self.depths:
            raise ConfigError("depths is empty")
        if any(not 0 <= d <= 100 for d in self.depths):
            raise ConfigError(f"depths are percentages in [0, 100], got {self.depths}")
        for name, values in (("lengths", self.lengths), ("depths", self.depths)):
            twice = sorted({v for v in values if values.count(v) > 1})
            if twice:
                raise ConfigError(f"{name} given twice: {', '.join(f'{v:g}' for v in twice)}")
        if self.answer_buffer < 0:
            raise ConfigError("answer_buffer must be >= 0")
        if self.min_haystack_tokens < 1:
            raise ConfigError("min_haystack_tokens must be >= 1")
        if self.placement not in ("sentence", "token"):
            raise ConfigError(f"placement must be 'sentence' or 'token', got {self.placement!r}")
        if "{context}" not in self.template or "{question}" not in self.template:
            raise ConfigError("template must contain {context} and {question}")

    @staticmethod
    def linspace(lo: float | int, hi: float | int, count: int | float, *, integer: bool = True) -> tuple:
        """``count`` values from ``lo`` to ``hi`` inclusive, evenly spaced (the paper's grid)."""
        if isinstance(count, float) and not count.is_integer():
            raise ConfigError(f"count must be a whole number, got {count}")
        count = int(count)
        if count < 1:
            raise ConfigError(f"count must be >= 1, got {count}")
        # Bounded before anything is expanded: more values than distinct ones are repeats.
        distinct = int(abs(hi - lo)) + 1 if integer else int(round(abs(hi - lo) * 1000)) + 1
        if count > distinct:
            raise ConfigError(f"count {count}: only {distinct} distinct "
                              f"{'whole numbers' if integer else 'values (0.001 apart)'} lie "
                              f"from {lo} to {hi}; use a count <= {distinct}")
        if count == 1:
            return (int(lo) if integer else float(lo),)
        vals = [lo + (hi - lo) * i / (count - 1) for i in range(count)]
        return tuple(int(round(v)) for v in vals) if integer else tuple(round(v, 3) for v in vals)


@dataclass
class _PromptParts:
    prefix: list[int]
    middle: list[int]  # between context and question (empty with the default template)
    suffix: list[int]


_CTX, _Q = "\x00RHLENS_CONTEXT\x00", "\x00RHLENS_QUESTION\x00"


def _prompt_parts(tokenizer, template: str, question: str, chat: bool) -> list[int] | _PromptParts:
    user = template.replace("{context}", _CTX).replace("{question}", question)
    if chat and getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], add_generation_prompt=True, tokenize=False
        )
        bos_in_text = True
    else:
        rendered = user + "\nAnswer:"
        bos_in_text = False
    if rendered.count(_CTX) != 1:
        raise ConfigError("the chat template altered the context placeholder")
    before, after = rendered.split(_CTX)
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    prefix = enc(before)
    bos = getattr(tokenizer, "bos_token_id", None)
    if not bos_in_text and bos is not None and getattr(tokenizer, "add_bos_token", True):
        prefix = [bos, *prefix]
    return _PromptParts(prefix=prefix, middle=[], suffix=enc(after))


def _sentence_end(tokenizer, ids: Sequence[int], point: int) -> int:
    """Move ``point`` back until the token before it ends a sentence (0 if none)."""
    while point > 0:
        piece = tokenizer.decode([ids[point - 1]])
        if piece.rstrip().endswith((".", "!", "?")):
            return point
        point -= 1
    return 0


def _answer_chars(text: str, answer: str, offsets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """Character span of ``answer`` in ``text``, preferring an occurrence on token boundaries.

    The first plain occurrence can sit inside another word (``"on"`` in ``"Tonight"``): an
    occurrence that starts where a token starts (after its leading space) and ends where a
    token ends wins, then one on word boundaries, then the first one (a tokenizer may merge
    the answer with a neighbour, as in ``"42nd-floor-West,"``).
    """
    starts, ends = set(), set()
    for a, b in offsets:
        if b <= a:
            continue
        starts.add(a)
        ends.add(b)
        while a < b and text[a].isspace():
            a += 1
            starts.add(a)
    found = [m.start() for m in re.finditer(f"(?={re.escape(answer)})", text)]

    def rank(c0: int) -> tuple[int, int, int, int]:
        c1 = c0 + len(answer)
        on_tokens = c0 in starts and c1 in ends
        on_words = ((c0 == 0 or not (text[c0 - 1].isalnum() and answer[0].isalnum())) and
            (c1 == len(text) or not (text[c1].isalnum() and answer[-1].isalnum())))
        return (-(on_tokens and on_words), -on_tokens, -on_words, c0)

    c0 = min(found, key=rank)
    return c0, c0 + len(answer)


def needle_tokens(tokenizer, needle: Needle) -> tuple[list[int], tuple[int, int]]:
    """The needle's tokens (with a leading space, as after a sentence) and the answer's span."""
    text = " " + needle.needle.strip()
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    c0, c1 = _answer_chars(text, needle.real_needle.strip(), offsets)
    inside = [i for i, (a, b) in enumerate(offsets) if a < c1 and b > c0 and b > a]
    if not inside:
        raise ProbeError(f"needle {needle.id!r}: its answer maps to no token")
    return ids, (inside[0], inside[-1] + 1)


def _insertion_point(tokenizer, hay: Sequence[int], depth: float, placement: str) -> int:
    """Where in the ``len(hay)`` haystack tokens the needle goes for ``depth`` percent."""
    budget = len(hay)
    if depth >= 100:
        return budget
    exact = int(budget * depth / 100)
    return exact if placement == "token" else _sentence_end(tokenizer, hay, exact)


def build_probe(tokenizer, haystack_ids: Sequence[int], needle: Needle, length: int,
                depth: float | int, config: ProbeConfig | None = None,
                meta: dict | None = None) -> Probe:
    """One probe of ``length`` tokens (prompt + answer buffer) with ``needle`` at ``depth``%.

    ``probe.meta`` records where the needle went: ``insert_token`` (its first token in the
    prompt), ``haystack_position`` (haystack tokens before it), ``placed_depth`` (that
    position in percent of the haystack: the depth the probe really has).
    """
    config = config or ProbeConfig()
    parts = _prompt_parts(tokenizer, config.template, needle.question, config.chat_template)
    needle_ids, (a0, a1) = needle_tokens(tokenizer, needle)
    fixed = len(parts.prefix) + len(parts.suffix) + len(needle_ids)
    budget = length - config.answer_buffer - fixed
    if budget < config.min_haystack_tokens:
        raise ProbeError(
            f"length {length} is too short: the prompt template, question and needle take "
            f"{fixed} tokens and {config.answer_buffer} are kept for the answer, leaving "
            f"{budget} for the haystack (need >= {config.min_haystack_tokens}); use lengths "
            f">= {fixed + config.answer_buffer + config.min_haystack_tokens}"
        )
    if len(haystack_ids) < budget:
        raise ProbeError(f"the haystack has {len(haystack_ids)} tokens, {budget} are needed")
    hay = list(haystack_ids[:budget])
    point = _insertion_point(tokenizer, hay, float(depth), config.placement)
    context = hay[:point] + needle_ids + hay[point:]
    start = len(parts.prefix) + point
    prompt = parts.prefix + context + parts.suffix
    span = (start + a0, start + a1)
    # The answer must be readable at the span: a last guard against off-by-one placement.
    if prompt[span[0]:span[1]] != needle_ids[a0:a1]:  # pragma: no cover - internal invariant
        raise ProbeError(f"needle {needle.id!r} could not be located in the prompt")
    placed = {"insert_token": start, "needle_tokens": len(needle_ids), "haystack_position": point,
              "haystack_tokens": budget, "placed_depth": round(100 * point / budget, 2),
              "placement": config.placement, "needle_sha256": needle.sha256,
              "chat_template": config.chat_template, "template_sha256": sha256_text(config.template)}
    return Probe(prompt_ids=tuple(prompt), needle_span=span, real_needle=needle.real_needle,
                 length=length, depth=depth, needle_id=needle.id, question=needle.question,
                 meta={**placed, **(meta or {})})


class PlacementWarning(UserWarning):
    """Two requested depths put a needle at the same position (see :func:`check_placements`)."""


def check_placements(probes: Sequence[Probe], *, strict: bool = False) -> list[str]:
    """Find probes of one length and needle whose needles sit at the same position.

    Under ``placement="sentence"`` (the paper's rule) a depth moves back to the previous
    sentence end, so on short contexts or text with few full stops several depths land on
    one position: their prompts are identical though their depths differ. Each probe records
    its ``placed_depth``; this warns (:class:`PlacementWarning`) with every such group, or
    raises :class:`ProbeError` when ``strict``. It warns rather than refuses by default
    because the paper's rule does this on the default grid and haystack (500 tokens, depths
    25 and 50), and the default command must run. Returns the messages.
    """
    groups: dict[tuple, list[Probe]] = {}
    for p in probes:
        if p.meta.get("haystack_position") is not None:
            groups.setdefault((p.length, p.needle_id, p.meta["haystack_position"]), []).append(p)
    clashes: dict[tuple, tuple[str, float]] = {}
    for (length, needle, _), group in groups.items():
        if len(group) > 1:
            depths = " and ".join(f"{p.depth:g}" for p in group)
            clashes.setdefault((length, depths), (needle, group[0].placed_depth))
    if not clashes:
        return []
    how = next(iter(probes)).meta.get("placement", "sentence")
    what = "; ".join(f"at length {length}, depths {depths} all land at depth {placed:g}%"
                     for (length, depths), (_, placed) in list(clashes.items())[:4])
    more = f" (and {len(clashes) - 4} more)" if len(clashes) > 4 else ""
    fix = ("placement='token' (--placement token) puts the needle exactly at each depth"
           if how == "sentence" else "use fewer depths or longer lengths")
    message = (f"needle positions coincide: {what}{more}, the same prompt under two depths; "
               f"each probe records its placed_depth; {fix}")
    if strict:
        raise ProbeError(message)
    import warnings

    warnings.warn(message, PlacementWarning, stacklevel=3)
    return [message]


_needle_tokens = needle_tokens  # the older private name


def _haystack_ids(tokenizer, haystack: Haystack, n_tokens: int) -> list[int]:
    chars = max(4096, n_tokens * 6)
    while True:
        text = haystack.text(chars)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= n_tokens or len(text) < chars:
            break
        chars *= 2
    if not ids:
        raise ConfigError(f"haystack {haystack.name!r} is empty")
    return ids


@dataclass
class ProbeSet(Sequence):
    """The probes of a grid plus how they were made; a sequence of :class:`Probe`."""

    probes: list[Probe]
    config: ProbeConfig
    needles: list[Needle] = field(default_factory=list)
    haystack: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.probes)

    def __iter__(self):
        return iter(self.probes)

    def __getitem__(self, i):
        return self.probes[i]

    def identity(self) -> dict[str, Any]:
        """See :func:`probes_identity`."""
        return probes_identity(self.probes)


def build_probes(tokenizer, *, config: ProbeConfig | None = None,
                 needles: Sequence[Needle] | str | Path | None = None,
                 haystack: str | Path | Haystack | None = None,
                 max_length: int | None = None) -> ProbeSet:
    """All probes of the grid ``config.lengths x config.depths x needles``.

    Args:
        tokenizer: the model's tokenizer.
        needles: ``None`` for the built-in needles, a list of :class:`Needle`, or a JSONL path.
        haystack: ``None``/"stdlib", "synthetic", a directory of ``.txt`` files, or a Haystack.
        max_length: the model's context limit; longer lengths raise before any compute.
    """
    config = config or ProbeConfig()
    if needles is None:
        needles = list(BUILTIN_NEEDLES)
    elif isinstance(needles, (str, Path)):
        needles = load_needles(needles)
    needles = list(needles)
    if not needles:
        raise ConfigError("no needles given")
    if not all(isinstance(n, Needle) for n in needles):
        bad = next(n for n in needles if not isinstance(n, Needle))
        raise ConfigError(f"needles must be Needle objects, got {type(bad).__name__}")
    ids = [n.id for n in needles]
    if len(set(ids)) != len(ids):
        twice = sorted({i for i in ids if ids.count(i) > 1})
        raise ConfigError(f"needle ids must be unique; given more than once: {', '.join(map(repr, twice))}")
    if max_length is not None and max(config.lengths) > max_length:
        raise ProbeError(
            f"length {max(config.lengths)} exceeds the model's maximum context of {max_length} "
            "tokens; choose shorter lengths"
        )
    if max_length is not None:  # a needle too long for the model: say so, not "longer lengths"
        for n in needles:
            parts = _prompt_parts(tokenizer, config.template, n.question, config.chat_template)
            fixed = len(parts.prefix) + len(parts.suffix) + len(_needle_tokens(tokenizer, n)[0])
            need = fixed + config.answer_buffer + config.min_haystack_tokens
            if need > max_length:
                raise ProbeError(
                    f"needle {n.id!r} cannot fit the model's maximum context of {max_length} "
                    f"tokens: its prompt (template, question and needle) takes {fixed} tokens, and "
                    f"{config.answer_buffer} are kept for the answer and at least "
                    f"{config.min_haystack_tokens} for the haystack ({need} in all); "
                    + (f"keep fewer tokens for the answer (answer_buffer, --answer-buffer: at most "
                       f"{max_length - fixed - config.min_haystack_tokens})"
                       if fixed + config.min_haystack_tokens <= max_length
                       else "shorten the needle or its question"))
    hs = make_haystack(haystack, config.haystack_seed)
    hay_ids = _haystack_ids(tokenizer, hs, max(config.lengths))
    meta = {**hs.describe(), "haystack_sha256": hs.sha256()}
    probes = [build_probe(tokenizer, hay_ids, n, length, depth, config, meta)
              for length in config.lengths for depth in config.depths for n in needles]
    check_placements(probes)
    return ProbeSet(probes=probes, config=config, needles=needles, haystack=meta)
