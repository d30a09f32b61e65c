"""Answer extraction and scoring for free-form model outputs.

Small chat models rarely follow an answer format to the letter: they write "The answer
is 7.", "Answer: 12 apples", "**Answer:** (B)", "1,234", or end a chain of thought with a
bare number. The masked-head experiment compares accuracies across runs whose outputs
differ in *style* as much as in content, so a brittle extractor would turn formatting
drift into fake accuracy drops. The extractors here therefore:

* prefer the text after the *last* answer marker ("Answer:", "the answer is", "Final
  answer:"), because a chain of thought may mention intermediate values first;
* fall back to the last number / the leading letter / the last line when no marker is
  found, because direct answers often skip the marker;
* return ``None`` for refusals ("I don't know") and when nothing is found, so that a
  non-answer is never scored as a lucky match.

Extractors take ``(output, item)`` and scorers ``(prediction, item)``, so that a task's
extractor can use the item's choices and a scorer its gold aliases. An item is anything with
the fields of :class:`AnswerKey` (a :class:`~rhlens.cot.items.TaskItem`); :data:`GRADING`
pairs an extractor with its scorer for each answer type.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections.abc import Callable, Mapping
from decimal import Decimal, InvalidOperation
from typing import Any, Literal, Protocol, runtime_checkable

__all__ = [
    "GRADING",
    "AnswerKey",
    "AnswerType",
    "Extractor",
    "Scorer",
    "extract_choice",
    "extract_number",
    "extract_text",
    "find_answer_segment",
    "is_refusal",
    "normalize_text",
    "parse_number",
    "score_choice",
    "score_number",
    "score_text",
]


@runtime_checkable
class AnswerKey(Protocol):
    """What grading reads from an item: the gold answer and what else counts or does not."""

    answer: str
    aliases: tuple[str, ...]
    choices: tuple[str, ...]
    distractors: tuple[str, ...]
    metadata: Mapping[str, Any]


AnswerType = Literal["number", "choice", "text"]
Extractor = Callable[[str, AnswerKey], str | None]
Scorer = Callable[[str | None, AnswerKey], bool]

# "Answer:", "Final answer -", "the answer is", "the correct answer is:", with markdown.
_MARKER = re.compile(
    r"(?:\bfinal\s+answer|\bcorrect\s+answer|\banswer)\s*(?:\*\*)?\s*"
    r"(?:is\s*(?:\*\*)?\s*:?|:|=|-(?!\d)|\u2014|\u2013)(?:\*\*)?",
    re.IGNORECASE,
)
_REFUSAL = re.compile(
    r"\b(?:i\s+(?:do\s*not|don'?t|don\u2019t)\s+know"
    r"|i\s*(?:am|'m|\u2019m)\s+not\s+sure"
    r"|i\s+(?:cannot|can\s*not|can'?t|can\u2019t)\s+(?:answer|determine|tell|say|know)"
    r"|(?:cannot|can\s*not|can'?t)\s+be\s+(?:determined|answered|known)"
    r"|(?:there\s+is\s+)?not\s+enough\s+information"
    r"|(?:is\s+|are\s+)?unknown\b|no\s+answer|unanswerable)",
    re.IGNORECASE,
)
# A number: optional sign (not glued to a preceding word, digit or dot, so "3-5" is not
# "-5"), thousands groups with commas, optional decimals.
_NUMBER = re.compile(r"(?<![\w.])[-\u2212]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?!\d)")
# List enumerators and "Step 2:" labels: numbers that are never answers.
_ENUMERATOR = re.compile(r"(?im)^[ \t]*\d+[ \t]*[.)][ \t]+(?=\S)|\bstep[ \t]*\d+[ \t]*[:.)]?")

_UNIT_WORDS = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
    "nineteen",
)  # fmt: skip
_TENS_WORDS = ("twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
_UNITS = {word: value for value, word in enumerate(_UNIT_WORDS)}
_TENS = {word: 10 * value for value, word in enumerate(_TENS_WORDS, start=2)}
_TENS_RE = "|".join(_TENS)
_DIGIT_WORDS_RE = "|".join(list(_UNITS)[1:10])
_WORD_NUMBER = re.compile(
    rf"\b(?:(?P<tens>{_TENS_RE})(?:[\s-](?P<unit>{_DIGIT_WORDS_RE}))?|(?P<only>{'|'.join(_UNITS)}))\b",
    re.IGNORECASE,
)
_LETTERS = "ABCD"


def is_refusal(text: str) -> bool:
    """Whether ``text`` declines to answer ("I don't know", "cannot be determined", ...).

    Only the refusal phrase counts, not what comes after it: "I'm not sure, but I think
    it is 8" is a (hedged) answer, and the extractors check for a candidate answer after
    the phrase before giving up.
    """
    return _REFUSAL.search(text) is not None


def _refuses(segment: str, has_candidate_after: bool) -> bool:
    """A refusal phrase with no answer following it."""
    return is_refusal(segment) and not has_candidate_after


def find_answer_segment(text: str) -> str | None:
    """The text after the last answer marker ("Answer:", "the answer is", ...), or ``None``.

    The segment runs to the end of the output, minus leading markdown/space; callers take
    what they need from its start. A marker followed by nothing is skipped, because models
    sometimes write "Answer:" at the end of a truncated generation.
    """
    for match in reversed(list(_MARKER.finditer(text))):
        segment = text[match.end() :].lstrip(" \t*_`\"'\n")
        if segment.strip():
            return segment
    return None


def parse_number(token: str) -> str | None:
    """Canonical decimal string of a numeric token: ``"1,234.50"`` -> ``"1234.5"``.

    Canonical strings (no trailing zeros, no exponent, ``"-0"`` -> ``"0"``) make gold and
    predicted numbers comparable as plain strings and readable in result tables.
    """
    cleaned = token.replace(",", "").replace("\u2212", "-").replace("$", "").strip()
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def _numbers_in(text: str) -> list[tuple[int, str]]:
    """(position, canonical value) of every number in ``text``, in order.

    Number words ("eight", "twenty-one") count only when ``text`` has no digits, because
    prose is full of "one" ("no one", "the one that") while a digit is always meant.
    """
    found: list[tuple[int, str]] = []
    for m in _NUMBER.finditer(text):
        value = parse_number(m.group(0))
        if value is not None:
            found.append((m.start(), value))
    if found:
        return found
    for m in _WORD_NUMBER.finditer(text):
        if m.group("only"):
            number = _UNITS[m.group("only").lower()]
        else:
            number = _TENS[m.group("tens").lower()]
            if m.group("unit"):
                number += _UNITS[m.group("unit").lower()]
        found.append((m.start(), str(number)))
    return found


def _first_line(segment: str) -> str:
    """The segment up to its first line break (or the whole segment when it has none)."""
    return segment.strip().split("\n", 1)[0]


def extract_number(text: str, item: AnswerKey | None = None) -> str | None:
    """The numeric answer in ``text`` as a canonical string, or ``None``.

    After an answer marker, the first number of that line wins ("Answer: 12 apples" ->
    ``"12"``), except that an equation is read to its result ("the answer is 3 + 4 = 7"
    -> ``"7"``). Without a marker, the last number in the text wins, ignoring list
    enumerators and "Step 2" labels, because a chain of thought ends with its result.
    """
    del item  # numbers need no per-item context
    segment = find_answer_segment(text)
    if segment is not None:
        line = _first_line(segment)
        if "=" in line:
            after = _numbers_in(line.rsplit("=", 1)[1])
            if after:
                return after[0][1]
        numbers = _numbers_in(line) or _numbers_in(segment)
        refusal = _REFUSAL.search(line)
        if refusal is not None and not any(pos > refusal.start() for pos, _ in numbers):
            return None
        return numbers[0][1] if numbers else None
    body = _ENUMERATOR.sub(" ", text)
    numbers = _numbers_in(body)
    refusal = None
    for refusal in _REFUSAL.finditer(body):  # noqa: B007 - we want the last match
        pass
    if refusal is not None and not any(pos > refusal.start() for pos, _ in numbers):
        return None
    return numbers[-1][1] if numbers else None


# A letter opening the output: "B", "(B)", "B.", "B) Paris", "**B**". A bare capital
# followed by a space is *not* taken ("A spider has ..."), except after an answer marker.
_LEAD_LETTER = re.compile(r"(?i:option|choice)?\s*[(\[]?\s*([A-Za-z])\s*(?:[)\].:,*]|$)")
_LEAD_LETTER_AFTER_MARKER = re.compile(r"(?i:option|choice)?\s*[(\[]?\s*([A-Z])(?:\s|[)\].:,*]|$)")
_TAGGED_LETTER = re.compile(r"\b(?:option|choice)\s+[(\[]?([A-Za-z])\b|[(\[]([A-Za-z])[)\]]", re.IGNORECASE)


def extract_choice(text: str, item: AnswerKey | None = None, letters: str | None = None) -> str | None:
    """The chosen letter ("A"-"D" by default), or ``None``.

    Reads, in order: the letter right after the last answer marker ("The answer is C.",
    "Answer: (B)"); a letter opening the output ("B", "(B) Paris", "B. Paris"); the last
    "(C)" / "option C"; and, when the item has choices, the one choice whose text the
    output contains, because tiny models often answer "Paris" instead of "B". A capital
    followed by a space opens a sentence ("A spider has ...") and is not taken, except
    right after an answer marker. ``letters`` defaults to one per choice of ``item``
    ("A"-"D" when it has none).
    """
    if letters is None:
        n_choices = len(item.choices) if item is not None and item.choices else len(_LETTERS)
        letters = string.ascii_uppercase[:n_choices]
    letters = letters.upper()
    segment = find_answer_segment(text)
    if segment is not None:
        line = _first_line(segment).strip("*_`\"' ")
        m = _LEAD_LETTER_AFTER_MARKER.match(line) or _LEAD_LETTER.fullmatch(line.rstrip(".)"))
        if m and m.group(1).upper() in letters:
            return m.group(1).upper()
        if is_refusal(line):
            return None
    m = _LEAD_LETTER.match(text.strip().strip("*_`\"' "))
    if m and m.group(1) in letters:  # only capitals here: "a" may be an article
        return m.group(1)
    tagged = [
        (m.group(1) or m.group(2)).upper()
        for m in _TAGGED_LETTER.finditer(text)
        if (m.group(1) or m.group(2)).upper() in letters
    ]
    if tagged:
        return tagged[-1]
    choices = item.choices if item is not None else ()
    if choices:
        where = normalize_text(segment if segment is not None else text)
        hits = {
            letters[i]
            for i, choice in enumerate(choices[: len(letters)])
            if _contains(where, normalize_text(choice))
        }
        if len(hits) == 1:
            return hits.pop()
    return None


_ARTICLES = re.compile(r"\b(?:a|an|the)\b")
_LEADING_FILLER = re.compile(
    r"^(?:the\s+answer\s+is|answer|it\s+is|it's|that\s+is|this\s+is)\s*:?\s*", re.IGNORECASE
)


def normalize_text(text: str) -> str:
    """Lower-case, accents and punctuation removed, articles dropped, spaces collapsed.

    The usual SQuAD-style normalisation: "The Daln." and "daln" compare equal.
    """
    text = unicodedata.normalize("NFKD", text)
    text = "".join(ch for ch in text if not unicodedata.combining(ch)).lower()
    text = text.translate(str.maketrans(string.punctuation, " " * len(string.punctuation)))
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _contains(haystack: str, needle: str) -> bool:
    """Whole-word containment of normalised ``needle`` in normalised ``haystack``."""
    if not needle:
        return False
    return f" {needle} " in f" {haystack} "


def extract_text(text: str, item: AnswerKey | None = None) -> str | None:
    """A short free-text answer: the line after the last answer marker, else the last line.

    The result is stripped of markdown, quotes, filler ("It is ...") and trailing
    punctuation; scoring then normalises it further. Refusals give ``None``.
    """
    del item
    segment = find_answer_segment(text)
    if segment is not None:
        answer = _first_line(segment)
    else:
        lines = [line for line in text.strip().split("\n") if line.strip()]
        if not lines:
            return None
        answer = lines[-1]
    answer = answer.strip().strip("*_`\"' ")
    answer = _LEADING_FILLER.sub("", answer).strip().rstrip(".!;,").strip("*_`\"' ")
    if not answer or is_refusal(answer):
        return None
    return answer


def score_number(prediction: str | None, item: AnswerKey) -> bool:
    """Numeric equality with the gold answer (or any alias), up to 1e-6."""
    if prediction is None:
        return False
    golds = [item.answer, *item.aliases]
    try:
        pred = Decimal(prediction)
    except InvalidOperation:
        return False
    for gold in golds:
        canonical = parse_number(gold)
        if canonical is not None and abs(Decimal(canonical) - pred) <= Decimal("1e-6"):
            return True
    return False


def score_choice(prediction: str | None, item: AnswerKey) -> bool:
    """The predicted letter is the gold letter (case-insensitive)."""
    return prediction is not None and prediction.strip().upper() == item.answer.strip().upper()


def score_text(prediction: str | None, item: AnswerKey) -> bool:
    """Normalised exact match, or whole-word containment of the gold, without a distractor.

    Containment accepts "Anna lives in Daln" for gold "Daln"; the distractor check (other
    candidate answers of the same kind, listed in ``item.distractors``) stops an output
    that lists every candidate ("Daln or Mesk") from scoring. Items marked
    ``metadata["answerable"] = False`` are correct exactly when the model declines.
    """
    if not item.metadata.get("answerable", True):
        return prediction is None
    if prediction is None:
        return False
    pred = normalize_text(prediction)
    golds = [normalize_text(g) for g in (item.answer, *item.aliases)]
    if pred in golds:
        return True
    if not any(_contains(pred, g) for g in golds):
        return False
    return not any(
        _contains(pred, normalize_text(d)) and normalize_text(d) not in golds for d in item.distractors
    )


# How each answer type is read and graded (a task's default extractor and scorer).
GRADING: dict[str, tuple[Extractor, Scorer]] = {
    "number": (extract_number, score_number),
    "choice": (extract_choice, score_choice),
    "text": (extract_text, score_text),
}
