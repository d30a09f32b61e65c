"""Loaders for the datasets Wu et al. (2024) ran the CoT experiment on, from local files.

rhlens ships no copy of these datasets; users who have them on disk, in the forms they
are usually distributed in, get a :class:`~rhlens.cot.items.Task` with the same CoT and
direct prompts as the built-in tasks:

* GSM8K, JSONL: ``{"question": ..., "answer": "... #### 72"}``;
* MMLU, CSV without header: ``question,A,B,C,D,answer-letter`` (one file per subject),
  or JSONL: ``{"question", "choices": [...], "answer": 0-based int or letter}``;
* MuSiQue, JSONL: ``{"question", "paragraphs": [{"title", "paragraph_text"}, ...],
  "answer", "answer_aliases"?, "answerable"?}``;
* your own items, JSONL: ``{"prompt", "answer", "id"?, "aliases"?}``, graded as
  :func:`~rhlens.cot.items.as_task` grades them.

A malformed record raises :class:`~rhlens.errors.ConfigError` naming the file and line,
before any model runs: a bad line found an hour into a masked sweep costs the sweep.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from rhlens.cot.extract import AnswerType, parse_number
from rhlens.cot.items import Kind, Question, Task, TaskItem, as_task
from rhlens.errors import ConfigError

__all__ = [
    "load_gsm8k",
    "load_items",
    "load_mmlu",
    "load_musique",
    "load_task",
    "sniff_format",
]

Format = Literal["gsm8k", "mmlu", "musique", "items"]
_LETTERS = "ABCDEFGHIJ"
_GSM8K_ANSWER = re.compile(r"####\s*(.+?)\s*$", re.DOTALL)


def _fail(path: Path, line: int, problem: str) -> ConfigError:
    return ConfigError(f"{path}: line {line}: {problem}")


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line; bad JSON names its line."""
    try:
        fh = path.open(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"Cannot read {path}: {exc.strerror or exc}") from exc
    with fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise _fail(path, lineno, f"not valid JSON ({exc.msg})") from exc
            if not isinstance(record, dict):
                raise _fail(path, lineno, f"expected a JSON object, got {type(record).__name__}")
            yield lineno, record


def _string_field(path: Path, line: int, record: dict[str, Any], key: str) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        raise _fail(path, line, f"field {key!r} must be a non-empty string, got {value!r:.60}")
    return value.strip()


def _item_id(prefix: str, line: int, record: dict[str, Any]) -> str:
    raw = record.get("id")
    return f"{prefix}-{raw}" if isinstance(raw, (str, int)) and str(raw) else f"{prefix}-L{line}"


def _check_limit(limit: int | None) -> None:
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be >= 1 (or None for all items), got {limit}.")


def _finish(name: str, path: Path, items: list[TaskItem], kind: Kind, answer_type: AnswerType,
            description: str) -> Task:
    """The task of a loaded file, graded as its ``answer_type``; an empty file is refused."""
    if not items:
        raise ConfigError(f"{path} holds no usable items.")
    return Task(name=name, items=tuple(items), kind=kind, answer_type=answer_type,
                description=description)


# -------------------------------------------------------------------------------- GSM8K


def load_gsm8k(path: str | Path, *, limit: int | None = None, name: str | None = None) -> Task:
    """GSM8K-style JSONL: ``question`` and ``answer`` whose last part is ``#### <number>``.

    The worked solution before ``####`` is kept in ``metadata["rationale"]``. GSM8K is a
    ``"context"`` task: every number the answer needs is stated in the question.
    """
    path = Path(path)
    _check_limit(limit)
    items: list[TaskItem] = []
    for line, record in _read_jsonl(path):
        question = _string_field(path, line, record, "question")
        solution = _string_field(path, line, record, "answer")
        match = _GSM8K_ANSWER.search(solution)
        if match is None:
            raise _fail(path, line, "field 'answer' has no '#### <number>' final answer")
        gold = parse_number(match.group(1))
        if gold is None:
            raise _fail(path, line, f"final answer {match.group(1)!r} is not a number")
        items.append(TaskItem.ask(
            _item_id("gsm8k", line, record), question, gold, what="number",
            metadata={"source": str(path), "line": line,
                      "rationale": solution[: match.start()].strip()}))
        if limit is not None and len(items) >= limit:
            break
    return _finish(name or f"gsm8k:{path.stem}", path, items, "context", "number",
                   f"GSM8K-format math word problems from {path.name}")


# --------------------------------------------------------------------------------- MMLU


def _mmlu_item(
    path: Path, line: int, question: str, choices: list[str], answer: str, subject: str, rid: str
) -> TaskItem:
    letters = _LETTERS[: len(choices)]
    options = "\n".join(f"{letter}. {text}" for letter, text in zip(letters, choices))
    intro = f"The following is a multiple choice question about {subject}.\n\n" if subject else ""
    return TaskItem.ask(rid, question, answer, body=f"{intro}{question}\n{options}", what="letter",
                        choices=tuple(choices),
                        metadata={"source": str(path), "line": line, "subject": subject})


def _subject_from(path: Path) -> str:
    """ "high_school_physics_test.csv" -> "high school physics" (MMLU's file naming)."""
    stem = re.sub(r"_(?:test|dev|val|validation|train)$", "", path.stem)
    return stem.replace("_", " ").strip()


def _mmlu_task(name: str, path: Path, items: list[TaskItem]) -> Task:
    return _finish(name, path, items, "knowledge", "choice",
                   f"MMLU-format multiple choice from {path.name}")


def _load_mmlu_csv(path: Path, limit: int | None, name: str | None) -> Task:
    subject = _subject_from(path)
    items: list[TaskItem] = []
    try:
        fh = path.open(encoding="utf-8", newline="")
    except OSError as exc:
        raise ConfigError(f"Cannot read {path}: {exc.strerror or exc}") from exc
    with fh:
        reader = csv.reader(fh)
        while True:
            start = reader.line_num + 1  # a quoted field may span several lines
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                raise _fail(path, start, f"not valid CSV ({exc})") from exc
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != 6:
                raise _fail(
                    path,
                    start,
                    f"expected 6 columns (question, A, B, C, D, answer), got {len(row)}",
                )
            question, *choices, letter = (cell.strip() for cell in row)
            letter = letter.upper()
            if letter not in "ABCD" or len(letter) != 1:
                raise _fail(path, start, f"answer must be one of A, B, C, D, got {row[5]!r}")
            if not question:
                raise _fail(path, start, "empty question")
            items.append(
                _mmlu_item(path, start, question, choices, letter, subject, f"mmlu-{path.stem}-L{start}")
            )
            if limit is not None and len(items) >= limit:
                break
    return _mmlu_task(name or f"mmlu:{path.stem}", path, items)


def _load_mmlu_jsonl(path: Path, limit: int | None, name: str | None) -> Task:
    items: list[TaskItem] = []
    for line, record in _read_jsonl(path):
        question = _string_field(path, line, record, "question")
        choices = record.get("choices")
        if (
            not isinstance(choices, list)
            or not 2 <= len(choices) <= len(_LETTERS)
            or not all(isinstance(c, (str, int, float)) for c in choices)
        ):
            raise _fail(path, line, f"field 'choices' must be a list of 2-10 strings, got {choices!r:.60}")
        choices = [str(c).strip() for c in choices]
        raw = record.get("answer")
        letters = _LETTERS[: len(choices)]
        if isinstance(raw, int) and not isinstance(raw, bool) and 0 <= raw < len(choices):
            letter = letters[raw]
        elif isinstance(raw, str) and raw.strip().upper() in letters and len(raw.strip()) == 1:
            letter = raw.strip().upper()
        else:
            raise _fail(
                path,
                line,
                f"field 'answer' must be a 0-based index below "
                f"{len(choices)} or a letter in {letters}, got {raw!r}",
            )
        subject = record.get("subject")
        subject = subject.replace("_", " ").strip() if isinstance(subject, str) else ""
        items.append(
            _mmlu_item(path, line, question, choices, letter, subject, _item_id("mmlu", line, record))
        )
        if limit is not None and len(items) >= limit:
            break
    return _mmlu_task(name or f"mmlu:{path.stem}", path, items)


def load_mmlu(path: str | Path, *, limit: int | None = None, name: str | None = None) -> Task:
    """MMLU multiple choice, from the original per-subject CSV or from JSONL.

    CSV (by the ``.csv`` suffix): no header, ``question,A,B,C,D,answer-letter``; the
    subject is read from the file name as in the original release. JSONL: ``question``,
    ``choices`` (list), ``answer`` (0-based index or letter), optional ``subject``.
    MMLU is a ``"knowledge"`` task.
    """
    path = Path(path)
    _check_limit(limit)
    if path.suffix.lower() == ".csv":
        return _load_mmlu_csv(path, limit, name)
    return _load_mmlu_jsonl(path, limit, name)


# ------------------------------------------------------------------------------ MuSiQue


def load_musique(
    path: str | Path,
    *,
    limit: int | None = None,
    name: str | None = None,
    include_unanswerable: bool = False,
    supporting_only: bool = False,
) -> Task:
    """MuSiQue JSONL: ``question``, ``paragraphs`` [{title, paragraph_text}], ``answer``.

    Args:
        path: the JSONL file.
        limit: keep at most this many items.
        name: task name (default ``"musique:<file stem>"``).
        include_unanswerable: keep ``"answerable": false`` items (MuSiQue-full); they are
            scored correct when the model declines to answer. Skipped by default, since
            the CoT experiment is about answering.
        supporting_only: keep only paragraphs marked ``is_supporting`` (when marked), for
            models whose context is too short for all twenty.
    """
    path = Path(path)
    _check_limit(limit)
    items: list[TaskItem] = []
    for line, record in _read_jsonl(path):
        question = _string_field(path, line, record, "question")
        answerable = record.get("answerable", True)
        if not isinstance(answerable, bool):
            raise _fail(path, line, f"field 'answerable' must be true or false, got {answerable!r}")
        if not answerable and not include_unanswerable:
            continue
        paragraphs = record.get("paragraphs")
        if not isinstance(paragraphs, list) or not paragraphs:
            raise _fail(path, line, "field 'paragraphs' must be a non-empty list")
        blocks = []
        for k, para in enumerate(paragraphs):
            if not isinstance(para, dict) or not isinstance(para.get("paragraph_text"), str):
                raise _fail(path, line, f"paragraph {k} needs a string 'paragraph_text'")
            if supporting_only and para.get("is_supporting") is False:
                continue
            title = para.get("title")
            head = (
                f"Document [{len(blocks) + 1}] (Title: {title})"
                if title
                else (f"Document [{len(blocks) + 1}]")
            )
            blocks.append(f"{head} {para['paragraph_text'].strip()}")
        answer = record.get("answer")
        if answerable:
            answer = _string_field(path, line, record, "answer")
        elif not isinstance(answer, str):
            answer = ""
        aliases = record.get("answer_aliases") or []
        if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
            raise _fail(path, line, "field 'answer_aliases' must be a list of strings")
        context = "\n\n".join(blocks)
        items.append(TaskItem.ask(
            _item_id("musique", line, record), question, answer.strip(),
            body=f"{context}\n\nQuestion: {question}", context=context,
            aliases=tuple(a.strip() for a in aliases if a.strip()),
            metadata={"source": str(path), "line": line, "answerable": answerable}))
        if limit is not None and len(items) >= limit:
            break
    return _finish(name or f"musique:{path.stem}", path, items, "context", "text",
                   f"MuSiQue-format multi-hop QA from {path.name}")


# --------------------------------------------------------------------------- your items


def load_items(path: str | Path, *, limit: int | None = None, name: str | None = None) -> Task:
    """Your own ``(prompt, answer)`` items from JSONL: ``prompt``, ``answer`` (string or
    number), optional ``id`` and ``aliases``. The prompts get the CoT and direct instructions
    and the answers are graded as :func:`~rhlens.cot.items.as_task` grades free-form items
    (numbers numerically, text by normalised match or whole-word containment)."""
    path = Path(path)
    _check_limit(limit)
    questions: list[Question] = []
    for line, record in _read_jsonl(path):
        prompt = _string_field(path, line, record, "prompt")
        answer = record.get("answer")
        if isinstance(answer, (int, float)) and not isinstance(answer, bool):
            answer = str(answer)
        if not isinstance(answer, str) or not answer.strip():
            raise _fail(path, line, f"field 'answer' must be a non-empty string or a number, "
                                    f"got {answer!r:.60}")
        aliases = record.get("aliases") or []
        if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
            raise _fail(path, line, "field 'aliases' must be a list of strings")
        questions.append(Question(prompt, answer, id=_item_id("item", line, record),
                                  aliases=tuple(a.strip() for a in aliases if a.strip())))
        if limit is not None and len(questions) >= limit:
            break
    if not questions:
        raise ConfigError(f"{path} holds no usable items.")
    return as_task(questions, name=name or f"items:{path.stem}")


# ------------------------------------------------------------------------------ sniffing


def sniff_format(path: str | Path) -> Format:
    """Which loader reads ``path``: by suffix for CSV (MMLU), by the first record's keys.

    ``paragraphs`` means MuSiQue, ``choices`` MMLU, an ``answer`` with ``####`` GSM8K,
    ``prompt`` and ``answer`` your own items.
    """
    path = Path(path)
    if path.suffix.lower() == ".csv":
        return "mmlu"
    for line, record in _read_jsonl(path):
        if "paragraphs" in record:
            return "musique"
        if "choices" in record:
            return "mmlu"
        answer = record.get("answer")
        if "question" in record and isinstance(answer, str) and "####" in answer:
            return "gsm8k"
        if "prompt" in record and "answer" in record:
            return "items"
        raise _fail(
            path,
            line,
            f"cannot tell the dataset format from the keys {sorted(record)}: expected GSM8K "
            "(question, answer with '#### n'), MMLU (question, choices, answer) or MuSiQue "
            "(question, paragraphs, answer) or your items (prompt, answer); pass format=... "
            "to choose",
        )
    raise ConfigError(f"{path} is empty.")


def load_task(
    path: str | Path, *, format: Format | None = None, limit: int | None = None, **kwargs: Any
) -> Task:
    """Load a dataset file as a task, sniffing its format unless ``format`` is given.

    ``kwargs`` go to the format's loader (``name``; for MuSiQue ``include_unanswerable``
    and ``supporting_only``).
    """
    path = Path(path)
    fmt = format or sniff_format(path)
    if fmt == "gsm8k":
        return load_gsm8k(path, limit=limit, **kwargs)
    if fmt == "mmlu":
        return load_mmlu(path, limit=limit, **kwargs)
    if fmt == "musique":
        return load_musique(path, limit=limit, **kwargs)
    if fmt == "items":
        return load_items(path, limit=limit, **kwargs)
    raise ConfigError(f"Unknown dataset format {fmt!r}: use 'gsm8k', 'mmlu', 'musique' or 'items'.")
