"""Tasks for the chain-of-thought experiment: items, prompts, a registry, built-in tasks.

Wu et al. (2024) end with the claim that masking retrieval heads hurts chain-of-thought
answers, which keep referring back to the question and to the model's own earlier
steps, far more than direct answers drawn from the model's own knowledge. Testing it
needs the same items asked two ways (CoT and direct) on two kinds of task:

* ``"context"`` tasks, whose answer must be pieced together from facts stated in the
  prompt (numbers to add up, look-ups to chain);
* ``"knowledge"`` tasks, answered from what the model memorised in pre-training.

A :class:`Task` holds its items with both prompts already written, plus the extractor
and scorer that turn a raw generation into right/wrong. Prompts are plain user-message
strings; the decode engine wraps them in the model's chat template.

The built-in tasks are generated here (seeded, so every run sees the same items) or
written by hand for this project, and sized so that SmolLM2-135M-Instruct answers a
meaningful share of them unmasked: a knockout can only hurt a task that the model can
do in the first place.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from rhlens.cot import extract as _extract
from rhlens.errors import ConfigError

__all__ = [
    "COT_INSTRUCTION",
    "DIRECT_INSTRUCTION",
    "Extractor",
    "Scorer",
    "Task",
    "TaskItem",
    "get_task",
    "list_tasks",
    "make_prompts",
    "register_task",
]

Kind = Literal["context", "knowledge"]
AnswerType = Literal["number", "choice", "text"]
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

    def prompt(self, mode: Mode) -> str:
        """The user message for ``mode`` ("cot" or "direct")."""
        if mode == "cot":
            return self.cot_prompt
        if mode == "direct":
            return self.direct_prompt
        raise ConfigError(f"Unknown prompting mode {mode!r}: use 'cot' or 'direct'.")


Extractor = Callable[[str, TaskItem], str | None]
Scorer = Callable[[str | None, TaskItem], bool]


@dataclass(frozen=True)
class Task:
    """A named set of items with the extractor and scorer that grade their answers.

    Attributes:
        name: registry name, or a file's name for loaded datasets.
        items: the items, in a fixed order.
        kind: ``"context"`` (answer in the prompt) or ``"knowledge"`` (from memory).
        extractor: ``(output, item) -> answer or None``.
        scorer: ``(answer or None, item) -> correct?``.
        answer_type: ``"number"``, ``"choice"`` or ``"text"`` (informational).
        description: one line for listings and result files.
    """

    name: str
    items: tuple[TaskItem, ...]
    kind: Kind
    extractor: Extractor
    scorer: Scorer
    answer_type: AnswerType = "text"
    description: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "items", tuple(self.items))
        if self.kind not in ("context", "knowledge"):
            raise ConfigError(f"Task {self.name!r} has kind {self.kind!r}; use 'context' or 'knowledge'.")
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


# ----------------------------------------------------------------------------- registry

TaskFactory = Callable[..., Task]
_REGISTRY: dict[str, TaskFactory] = {}


def register_task(name: str, factory: TaskFactory | Task, *, overwrite: bool = False) -> None:
    """Make ``get_task(name)`` return a task.

    Args:
        name: registry key (case-insensitive).
        factory: a :class:`Task`, or a callable building one from keyword arguments
            (``seed``, ``n``, ...) that :func:`get_task` passes through.
        overwrite: replace an existing registration instead of raising.

    Raises:
        ConfigError: the name is taken and ``overwrite`` is false.
    """
    key = name.strip().lower()
    if not key:
        raise ConfigError("A task name cannot be empty.")
    if key in _REGISTRY and not overwrite:
        raise ConfigError(f"A task named {name!r} is already registered; pass overwrite=True to replace it.")
    if isinstance(factory, Task):
        task = factory

        def _fixed(**kwargs: Any) -> Task:
            if kwargs:
                raise ConfigError(
                    f"Task {name!r} was registered as a fixed task and takes no options "
                    f"(got {sorted(kwargs)})."
                )
            return task

        _REGISTRY[key] = _fixed
    else:
        _REGISTRY[key] = factory


def list_tasks() -> list[str]:
    """Names of the registered tasks, sorted."""
    return sorted(_REGISTRY)


def get_task(name_or_path: str | Path, **kwargs: Any) -> Task:
    """A registered task by name, or a dataset file loaded by :mod:`rhlens.cot.loaders`.

    Args:
        name_or_path: a name from :func:`list_tasks`, or the path of a GSM8K / MMLU /
            MuSiQue file (JSONL or, for MMLU, CSV); the format is sniffed from the file.
        **kwargs: passed to the task's factory (built-ins take ``seed`` and ``n``) or to
            :func:`rhlens.cot.loaders.load_task` (``format``, ``limit``, ...).

    Raises:
        ConfigError: unknown name and no such file, or a malformed file.
    """
    key = str(name_or_path).strip().lower()
    if isinstance(name_or_path, str) and key in _REGISTRY:
        return _REGISTRY[key](**kwargs)
    path = Path(name_or_path).expanduser()
    if path.is_file():
        from rhlens.cot.loaders import load_task

        return load_task(path, **kwargs)
    raise ConfigError(
        f"No task named {str(name_or_path)!r} and no such file. Registered tasks: "
        f"{', '.join(list_tasks())}; or pass the path of a GSM8K/MMLU/MuSiQue file."
    )


# ------------------------------------------------------------------------ built-in tasks


def _check_n(name: str, n: int, available: int | None = None) -> None:
    if n < 1:
        raise ConfigError(f"Task {name!r} needs n >= 1 items, got {n}.")
    if available is not None and n > available:
        raise ConfigError(f"Task {name!r} has {available} items; n={n} is too many.")


# Arithmetic: a person starts with some objects and gains/loses some in a few steps.
_PEOPLE = (
    "Tom", "Mia", "Sam", "Lena", "Omar", "Ruth", "Ken", "Zoe", "Ivan", "Nora", "Paul", "Asha",
    "Ben", "Lucy", "Raj", "Ella", "Hugo", "Maya", "Leo", "Iris",
)  # fmt: skip
_OBJECTS = (
    "apples", "marbles", "stickers", "pencils", "cookies", "books", "coins", "stamps",
    "shells", "cards", "balloons", "oranges",
)  # fmt: skip
# Gains name no second person: "gets 6 more from Ken" made the 135M model add to Ken.
_GAINS = ("buys {k} more {obj}", "finds {k} more {obj}", "gets {k} more {obj}")
_LOSSES = ("gives {k} {obj} to {other}", "loses {k} {obj}", "sells {k} {obj}")


def _arithmetic(seed: int = 0, n: int = 30, steps: int = 1, ops: str = "add", max_operand: int = 5) -> Task:
    """Word problems over numbers stated in the prompt: a start, then ``steps`` changes.

    Every number must be read back from the question and combined, the context reuse
    that CoT leans on. The default (one addition of numbers up to ``max_operand=5``) is
    what a 135M model can still do: it already adds 8 + 9 wrongly. ``steps=2``,
    ``ops="mixed"`` (gains and losses; totals never negative) and larger operands are
    harder variants for larger models.
    """
    _check_n("arithmetic", n)
    if steps < 1:
        raise ConfigError(f"arithmetic needs steps >= 1, got {steps}.")
    if ops not in ("add", "mixed"):
        raise ConfigError(f"arithmetic ops must be 'add' or 'mixed', got {ops!r}.")
    if max_operand < 2:
        raise ConfigError(f"arithmetic needs max_operand >= 2, got {max_operand}.")
    rng = random.Random(f"arithmetic:{seed}:{steps}:{ops}:{max_operand}")
    items = []
    for i in range(n):
        name, other = rng.sample(_PEOPLE, 2)
        obj = rng.choice(_OBJECTS)
        total = rng.randint(2, max_operand)
        sentences = [f"{name} has {total} {obj}."]
        for step in range(steps):
            gain = ops == "add" or total < 2 or rng.random() < 0.5
            k = rng.randint(1, max_operand) if gain else rng.randint(1, total - 1)
            template = rng.choice(_GAINS if gain else _LOSSES)
            total += k if gain else -k
            action = template.format(k=k, obj=obj, other=other)
            sentences.append(f"{'Then ' if step else ''}{name} {action}.")
        context = " ".join(sentences)
        question = f"How many {obj} does {name} have now?"
        cot, direct = make_prompts(f"{context} {question}", "number")
        items.append(
            TaskItem(
                id=f"arithmetic-{seed}-{i}",
                question=question,
                answer=str(total),
                cot_prompt=cot,
                direct_prompt=direct,
                context=context,
                metadata={"steps": steps, "ops": ops, "max_operand": max_operand},
            )
        )
    kinds = "addition" if ops == "add" else "add/subtract"
    return Task(
        name="arithmetic",
        items=tuple(items),
        kind="context",
        extractor=_extract.extract_number,
        scorer=_extract.score_number,
        answer_type="number",
        description=f"{steps}-step {kinds} word problems over numbers stated in the prompt",
    )


_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z")
_VOWELS = ("a", "e", "i", "o", "u")
_CODAS = ("", "", "n", "l", "r", "s", "m", "k")


def _invented_names(rng: random.Random, count: int, taken: set[str]) -> list[str]:
    """Pronounceable made-up names ("Rivo", "Dalen"), so the model cannot know them."""
    names: list[str] = []
    while len(names) < count:
        syllables = rng.choice((2, 2, 3))
        word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables))
        word = (word + rng.choice(_CODAS)).capitalize()
        if word.lower() not in taken:
            taken.add(word.lower())
            names.append(word)
    return names


def _lookup(seed: int = 0, n: int = 30, people: int = 1) -> Task:
    """Two-hop look-ups over invented places: person -> town -> country.

    "Anna lives in the town of Rivo. The town of Rivo is in the country of Daln. In which
    country does Anna live?" The names are made up, so the answer can only be copied from the prompt, never
    recalled. With ``people > 1`` the other people's facts are distractors that force a
    real two-hop chain (their countries count as wrong answers); a 135M model mostly
    answers those with the town, so the default keeps one person.
    """
    _check_n("lookup", n)
    if people < 1:
        raise ConfigError(f"lookup needs people >= 1, got {people}.")
    rng = random.Random(f"lookup:{seed}:{people}")
    items = []
    for i in range(n):
        persons = rng.sample(_PEOPLE, people)
        taken: set[str] = {p.lower() for p in _PEOPLE}
        towns = _invented_names(rng, people, taken)
        countries = _invented_names(rng, people, taken)
        # "the town of" keeps towns and countries apart; with bare names the model
        # mostly answered with the town.
        lives = [f"{p} lives in the town of {t}." for p, t in zip(persons, towns)]
        located = [f"The town of {t} is in the country of {c}." for t, c in zip(towns, countries)]
        rng.shuffle(lives)
        rng.shuffle(located)
        context = " ".join(lives + located)
        target = rng.randrange(people)
        question = f"In which country does {persons[target]} live?"
        cot, direct = make_prompts(f"{context} {question}", "country")
        items.append(
            TaskItem(
                id=f"lookup-{seed}-{i}",
                question=question,
                answer=countries[target],
                cot_prompt=cot,
                direct_prompt=direct,
                context=context,
                distractors=tuple(c for j, c in enumerate(countries) if j != target),
                metadata={"town": towns[target], "people": people},
            )
        )
    return Task(
        name="lookup",
        items=tuple(items),
        kind="context",
        extractor=_extract.extract_text,
        scorer=_extract.score_text,
        answer_type="text",
        description="two-hop look-ups (person -> town -> country) over invented names",
    )


# Well-known capitals, written for this project. (country, capital, aliases)
_CAPITALS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("France", "Paris", ()),
    ("Germany", "Berlin", ()),
    ("Italy", "Rome", ()),
    ("Spain", "Madrid", ()),
    ("Japan", "Tokyo", ()),
    ("China", "Beijing", ("Peking",)),
    ("Russia", "Moscow", ()),
    ("the United Kingdom", "London", ()),
    ("the United States", "Washington", ("Washington, D.C.",)),
    ("Canada", "Ottawa", ()),
    ("Egypt", "Cairo", ()),
    ("Greece", "Athens", ()),
    ("Portugal", "Lisbon", ()),
    ("Ireland", "Dublin", ()),
    ("Austria", "Vienna", ()),
    ("Norway", "Oslo", ()),
    ("Sweden", "Stockholm", ()),
    ("Finland", "Helsinki", ()),
    ("Denmark", "Copenhagen", ()),
    ("Poland", "Warsaw", ()),
    ("the Netherlands", "Amsterdam", ()),
    ("Belgium", "Brussels", ()),
    ("Thailand", "Bangkok", ()),
    ("South Korea", "Seoul", ()),
    ("India", "New Delhi", ("Delhi",)),
    ("Mexico", "Mexico City", ()),
    ("Argentina", "Buenos Aires", ()),
    ("Peru", "Lima", ()),
    ("Kenya", "Nairobi", ()),
    ("Cuba", "Havana", ()),
    ("Hungary", "Budapest", ()),
    ("Czechia", "Prague", ()),
    ("Turkey", "Ankara", ()),
    ("Australia", "Canberra", ()),
    ("Iran", "Tehran", ()),
    ("Indonesia", "Jakarta", ()),
)


def _capitals(seed: int = 0, n: int = 30) -> Task:
    """Capitals of well-known countries, answered from memory.

    The question states nothing the answer could be copied from, so it isolates the
    model's parametric knowledge; the other capitals are distractors, so an output that
    lists several capitals is not credited.
    """
    _check_n("capitals", n, len(_CAPITALS))
    rng = random.Random(f"capitals:{seed}")
    chosen = rng.sample(range(len(_CAPITALS)), n)
    all_capitals = [cap for _, cap, _ in _CAPITALS]
    items = []
    for idx in chosen:
        country, capital, aliases = _CAPITALS[idx]
        question = f"What is the capital of {country}?"
        cot, direct = make_prompts(question, "city")
        items.append(
            TaskItem(
                id=f"capitals-{idx}",
                question=question,
                answer=capital,
                cot_prompt=cot,
                direct_prompt=direct,
                aliases=aliases,
                distractors=tuple(c for c in all_capitals if c != capital),
                metadata={"country": country},
            )
        )
    return Task(
        name="capitals",
        items=tuple(items),
        kind="knowledge",
        extractor=_extract.extract_text,
        scorer=_extract.score_text,
        answer_type="text",
        description="capitals of well-known countries, from the model's own knowledge",
    )


# Everyday numeric facts, written for this project. (question, answer)
_COUNTS: tuple[tuple[str, int], ...] = (
    ("How many legs does a spider have?", 8),
    ("How many legs does a dog have?", 4),
    ("How many legs does an insect have?", 6),
    ("How many legs does a chicken have?", 2),
    ("How many days are there in a week?", 7),
    ("How many months are there in a year?", 12),
    ("How many hours are there in a day?", 24),
    ("How many minutes are there in an hour?", 60),
    ("How many seconds are there in a minute?", 60),
    ("How many days are there in a year that is not a leap year?", 365),
    ("How many weeks are there in a year?", 52),
    ("How many sides does a triangle have?", 3),
    ("How many sides does a square have?", 4),
    ("How many sides does a hexagon have?", 6),
    ("How many sides does an octagon have?", 8),
    ("How many sides does a pentagon have?", 5),
    ("How many wheels does a bicycle have?", 2),
    ("How many wheels does a tricycle have?", 3),
    ("How many continents are there on Earth?", 7),
    ("How many planets are there in our solar system?", 8),
    ("How many years are there in a century?", 100),
    ("How many years are there in a decade?", 10),
    ("How many items are there in a dozen?", 12),
    ("How many cents are there in one US dollar?", 100),
    ("How many centimeters are there in a meter?", 100),
    ("How many grams are there in a kilogram?", 1000),
    ("How many fingers does a person have on one hand?", 5),
    ("How many players does a soccer team have on the field?", 11),
    ("How many arms does an octopus have?", 8),
    ("How many strings does a standard guitar have?", 6),
    ("At what temperature in degrees Celsius does water boil at sea level?", 100),
    ("At what temperature in degrees Celsius does water freeze?", 0),
    ("How many colors are there in a rainbow?", 7),
    ("How many days are there in a leap year?", 366),
)


def _counts(seed: int = 0, n: int = 30) -> Task:
    """Everyday numeric facts ("How many legs does a spider have?"), from memory."""
    _check_n("counts", n, len(_COUNTS))
    rng = random.Random(f"counts:{seed}")
    chosen = rng.sample(range(len(_COUNTS)), n)
    items = []
    for idx in chosen:
        question, answer = _COUNTS[idx]
        cot, direct = make_prompts(question, "number")
        items.append(
            TaskItem(
                id=f"counts-{idx}",
                question=question,
                answer=str(answer),
                cot_prompt=cot,
                direct_prompt=direct,
            )
        )
    return Task(
        name="counts",
        items=tuple(items),
        kind="knowledge",
        extractor=_extract.extract_number,
        scorer=_extract.score_number,
        answer_type="number",
        description="everyday numeric facts, from the model's own knowledge",
    )


register_task("arithmetic", _arithmetic)
register_task("lookup", _lookup)
register_task("capitals", _capitals)
register_task("counts", _counts)
