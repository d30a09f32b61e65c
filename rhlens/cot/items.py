"""Items and tasks of the CoT experiment: one question asked two ways, and how it is graded.

Wu et al. (2024) end with the claim that masking retrieval heads hurts chain-of-thought
answers, which keep referring back to the question and to the model's own earlier steps,
far more than direct answers drawn from the model's own knowledge. Testing it needs the
same items asked two ways (CoT and direct) on two kinds of task:

* ``"context"`` tasks, whose answer must be pieced together from facts stated in the
  prompt (numbers to add up, look-ups to chain);
* ``"knowledge"`` tasks, answered from what the model memorised in pre-training.

A :class:`Task` holds its items with both prompts already written, plus the extractor and
scorer that turn a raw generation into right/wrong (by default those of its answer type,
:data:`rhlens.cot.extract.GRADING`). Prompts are plain user-message strings; the decode
engine wraps them in the model's chat template. :func:`as_task` turns a user's own
``(prompt, answer)`` pairs or :class:`Question` objects into a task.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from rhlens.cot.extract import GRADING, AnswerType, Extractor, Scorer, parse_number
from rhlens.errors import ConfigError

__all__ = [
    "COT_INSTRUCTION",
    "DIRECT_INSTRUCTION",
    "AnswerType",
    "Extractor",
    "Question",
    "Scorer",
    "Task",
    "TaskItem",
    "as_task",
    "make_prompts",
]

Kind = Literal["context", "knowledge"]
Mode = Literal["cot", "direct"]

# Tuned on SmolLM2-135M-Instruct with scripts/cot_baseline.py (30 items per task): of
# four wordings tried, this one did best on the built-in tasks taken together. Wordings
# that invite lists ("explain your reasoning in a few short steps") sent the model into
# numbered steps ending in "The answer is 1."; "Let's think step by step" did well on
# knowledge but poorly on the look-ups.
COT_INSTRUCTION = 'Think step by step in two or three short sentences. Then write "Answer: <{what}>".'
DIRECT_INSTRUCTION = "Answer with just the {what}."


def make_prompts(body: str, what: str = "answer") -> tuple[str, str]:
    """The (CoT, direct) user messages for a question ``body``.

    Both share the body word for word, so that the two prompting modes differ only in
    the instruction: any accuracy gap is then due to reasoning, not to the wording.
    ``what`` names the expected answer ("number", "letter", "country", ...).
    """
    body = body.strip()
    return (
        f"{body}\n\n{COT_INSTRUCTION.format(what=what)}",
        f"{body}\n\n{DIRECT_INSTRUCTION.format(what=what)}",
    )


@dataclass(frozen=True)
class TaskItem:
    """One question, asked both ways.

    Attributes:
        id: unique within its task (stable across runs, for joining masked and unmasked
            results).
        question: the question alone, without context or instructions.
        answer: the gold answer: a number in canonical form, a letter, or short text.
        cot_prompt: user message asking for step-by-step reasoning and "Answer: <x>".
        direct_prompt: user message asking for the bare answer.
        context: the passage the answer must be drawn from ("" for knowledge items).
        aliases: other accepted forms of the gold answer.
        choices: the option texts of a multiple-choice item, in letter order.
        distractors: other candidate answers of the same kind; an output that contains
            one of them as well as the gold is not credited.
        metadata: anything else (source line, subject, answerable, ...).
    """

    id: str
    question: str
    answer: str
    cot_prompt: str
    direct_prompt: str
    context: str = ""
    aliases: tuple[str, ...] = ()
    choices: tuple[str, ...] = ()
    distractors: tuple[str, ...] = ()
    metadata: Mapping[str, Any] = field(default_factory=dict, hash=False)

    @classmethod
    def ask(cls, id: str, question: str, answer: str, *, body: str | None = None,
            what: str = "answer", **fields: Any) -> TaskItem:
        """An item whose two prompts are :func:`make_prompts` of ``body`` (default: the
        question alone); ``fields`` are the other attributes (context, aliases, ...)."""
        cot, direct = make_prompts(question if body is None else body, what)
        return cls(id=id, question=question, answer=answer, cot_prompt=cot, direct_prompt=direct,
                   **fields)

    def prompt(self, mode: Mode) -> str:
        """The user message for ``mode`` ("cot" or "direct")."""
        if mode == "cot":
            return self.cot_prompt
        if mode == "direct":
            return self.direct_prompt
        raise ConfigError(f"Unknown prompting mode {mode!r}: use 'cot' or 'direct'.")


@dataclass(frozen=True)
class Task:
    """A named set of items with the extractor and scorer that grade their answers.

    Attributes:
        name: registry name, or a file's name for loaded datasets.
        items: the items, in a fixed order.
        kind: ``"context"`` (answer in the prompt) or ``"knowledge"`` (from memory).
        extractor: ``(output, item) -> answer or None``; by default the answer type's.
        scorer: ``(answer or None, item) -> correct?``; by default the answer type's.
        answer_type: ``"number"``, ``"choice"`` or ``"text"``: picks the default grading.
        description: one line for listings and result files.
    """

    name: str
    items: tuple[TaskItem, ...]
    kind: Kind
    extractor: Extractor | None = None
    scorer: Scorer | None = None
    answer_type: AnswerType = "text"
    description: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "items", tuple(self.items))
        if self.kind not in ("context", "knowledge"):
            raise ConfigError(f"Task {self.name!r} has kind {self.kind!r}; use 'context' or 'knowledge'.")
        if self.answer_type not in GRADING:
            raise ConfigError(f"Task {self.name!r} has answer type {self.answer_type!r}; "
                              f"use one of {', '.join(GRADING)}.")
        extractor, scorer = GRADING[self.answer_type]
        object.__setattr__(self, "extractor", self.extractor or extractor)
        object.__setattr__(self, "scorer", self.scorer or scorer)
        if not self.items:
            raise ConfigError(f"Task {self.name!r} has no items.")
        seen: set[str] = set()
        for item in self.items:
            if item.id in seen:
                raise ConfigError(f"Task {self.name!r} has two items with id {item.id!r}.")
            seen.add(item.id)

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[TaskItem]:
        return iter(self.items)

    def extract(self, output: str, item: TaskItem) -> str | None:
        """The answer read from a model ``output`` for ``item``, or ``None``."""
        return self.extractor(output, item)

    def grade(self, output: str, item: TaskItem) -> bool:
        """Whether ``output`` answers ``item`` correctly."""
        return bool(self.scorer(self.extractor(output, item), item))

    def accuracy(self, outputs: list[str] | tuple[str, ...]) -> float:
        """Share of items answered correctly; ``outputs[i]`` belongs to ``items[i]``."""
        if len(outputs) != len(self.items):
            raise ConfigError(
                f"Task {self.name!r} has {len(self.items)} items but got {len(outputs)} outputs."
            )
        return sum(self.grade(o, it) for o, it in zip(outputs, self.items)) / len(self.items)

    def head(self, n: int) -> Task:
        """The same task with only its first ``n`` items (a quick smoke run)."""
        if n < 1:
            raise ConfigError(f"head(n) needs n >= 1, got {n}.")
        return replace(self, items=self.items[:n])


# ---------------------------------------------------------------------------- user items


@dataclass(frozen=True)
class Question:
    """A user's own item: a question (with any context it needs) and its gold answer.

    Attributes:
        prompt: the question, without instructions; :func:`make_prompts` adds the CoT and
            the direct instruction, unless ``cot_prompt`` / ``direct_prompt`` are given.
        answer: the gold answer.
        id: a stable id (default: the item's position).
        aliases: other accepted forms of the answer.
        cot_prompt / direct_prompt: the exact user messages, to use instead.
    """

    prompt: str
    answer: str
    id: str = ""
    aliases: tuple[str, ...] = ()
    cot_prompt: str = ""
    direct_prompt: str = ""


Grade = Callable[[str, str], bool]


def _is_number(text: str) -> bool:
    return parse_number(text) is not None


def _graded_by(grade: Grade) -> tuple[Extractor, Scorer]:
    """A task's (extractor, scorer) from ``grade(output, gold) -> bool``: the whole output
    is the extracted answer, and ``grade`` decides."""
    def whole(output: str, item: Any) -> str | None:
        return output

    def scorer(prediction: str | None, item: Any) -> bool:
        return bool(grade(prediction or "", item.answer))

    return whole, scorer


def _as_question(entry: Any, index: int) -> Question:
    if isinstance(entry, Question):
        return entry
    if isinstance(entry, (tuple, list)) and len(entry) == 2:
        prompt, answer = entry
        if isinstance(answer, (int, float)) and not isinstance(answer, bool):
            answer = str(answer)
        if isinstance(prompt, str) and isinstance(answer, str):
            return Question(prompt, answer)
    raise ConfigError(f"item {index} must be a (prompt, answer) pair of strings, a Question or a "
                      f"TaskItem; got {entry!r:.80}")


def as_task(items: Task | Iterable[Any], *, name: str = "items", kind: Kind = "context",
            answer_type: AnswerType | None = None, grade: Grade | None = None,
            what: str = "answer") -> Task:
    """A :class:`Task` from a user's own items: ``(prompt, answer)`` pairs, :class:`Question`
    or :class:`TaskItem` objects (a :class:`Task` is returned as it is).

    Grading of free-form answers, unless ``grade`` is given:

    * ``answer_type="number"`` (the default when every gold answer is a number): the number
      after the last "Answer:" marker, else the last number of the output, numerically equal
      to the gold (:func:`~rhlens.cot.extract.extract_number`, ``score_number``);
    * ``"text"`` (the default otherwise): the line after the last "Answer:" marker, else the
      last line, must equal the gold (or an alias) or contain it as whole words, after
      lower-casing and dropping punctuation and articles (``extract_text``, ``score_text``);
    * ``grade(output, gold) -> bool``: your own rule, given the whole output.

    Args:
        name: the task's name (item ids default to ``f"{name}-{i}"``).
        kind: ``"context"`` or ``"knowledge"`` (a label for tables).
        what: names the answer in the instructions ("Answer with just the <what>.").
    """
    if isinstance(items, Task):
        if grade is not None or answer_type is not None:
            raise ConfigError("a Task grades its own answers; grade / answer_type apply to plain items")
        return items
    entries = list(items)
    if not entries:
        raise ConfigError("no items given")
    task_items = []
    for i, entry in enumerate(entries):
        if isinstance(entry, TaskItem):
            task_items.append(entry)
            continue
        q = _as_question(entry, i)
        if not q.prompt.strip() or not q.answer.strip():
            raise ConfigError(f"item {i} has an empty prompt or answer")
        cot, direct = make_prompts(q.prompt, what)
        task_items.append(TaskItem(id=q.id or f"{name}-{i}", question=q.prompt.strip(),
                                   answer=q.answer.strip(), cot_prompt=q.cot_prompt or cot,
                                   direct_prompt=q.direct_prompt or direct,
                                   aliases=tuple(q.aliases)))
    if answer_type is None:
        numeric = all(_is_number(g) for it in task_items for g in (it.answer, *it.aliases))
        answer_type = "number" if numeric else "text"
    extractor, scorer = _graded_by(grade) if grade is not None else (None, None)
    how = "your grade function" if grade is not None else f"{answer_type} answers"
    return Task(name=name, items=tuple(task_items), kind=kind, extractor=extractor, scorer=scorer,
                answer_type=answer_type, description=f"{len(task_items)} user items, graded as {how}")
