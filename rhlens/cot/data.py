"""The built-in CoT tasks: their word lists and fact tables, and the seeded item generators.

Generated here (seeded, so every run sees the same items) or written by hand for this
project, and sized so that SmolLM2-135M-Instruct answers a meaningful share of them
unmasked: a knockout can only hurt a task the model can do in the first place.

* ``arithmetic`` (context): word problems over numbers stated in the prompt;
* ``lookup`` (context): two-hop look-ups over invented names;
* ``capitals`` (knowledge): capitals of well-known countries;
* ``counts`` (knowledge): everyday numeric facts.

:data:`BUILTIN_TASKS` maps each name to its factory (keyword options ``seed``, ``n``, ...);
:mod:`rhlens.cot.tasks` registers them.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from rhlens.cot.items import Task, TaskItem
from rhlens.errors import ConfigError

__all__ = ["BUILTIN_TASKS"]


def _table(text: str) -> tuple[tuple[str, ...], ...]:
    """Rows of a ``|``-separated table written one row a line (blank lines skipped)."""
    return tuple(tuple(cell.strip() for cell in line.split("|")) for line in text.strip().splitlines()
                 if line.strip())


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

# Syllables of invented names ("Rivo", "Dalen"), so the model cannot know them.
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z")
_VOWELS = ("a", "e", "i", "o", "u")
_CODAS = ("", "", "n", "l", "r", "s", "m", "k")

# Well-known capitals, written for this project: country | capital | other accepted names (;).
_CAPITALS = _table("""
France | Paris |
Germany | Berlin |
Italy | Rome |
Spain | Madrid |
Japan | Tokyo |
China | Beijing | Peking
Russia | Moscow |
the United Kingdom | London |
the United States | Washington | Washington, D.C.
Canada | Ottawa |
Egypt | Cairo |
Greece | Athens |
Portugal | Lisbon |
Ireland | Dublin |
Austria | Vienna |
Norway | Oslo |
Sweden | Stockholm |
Finland | Helsinki |
Denmark | Copenhagen |
Poland | Warsaw |
the Netherlands | Amsterdam |
Belgium | Brussels |
Thailand | Bangkok |
South Korea | Seoul |
India | New Delhi | Delhi
Mexico | Mexico City |
Argentina | Buenos Aires |
Peru | Lima |
Kenya | Nairobi |
Cuba | Havana |
Hungary | Budapest |
Czechia | Prague |
Turkey | Ankara |
Australia | Canberra |
Iran | Tehran |
Indonesia | Jakarta |
""")

# Everyday numeric facts, written for this project: question | answer.
_COUNTS = _table("""
How many legs does a spider have? | 8
How many legs does a dog have? | 4
How many legs does an insect have? | 6
How many legs does a chicken have? | 2
How many days are there in a week? | 7
How many months are there in a year? | 12
How many hours are there in a day? | 24
How many minutes are there in an hour? | 60
How many seconds are there in a minute? | 60
How many days are there in a year that is not a leap year? | 365
How many weeks are there in a year? | 52
How many sides does a triangle have? | 3
How many sides does a square have? | 4
How many sides does a hexagon have? | 6
How many sides does an octagon have? | 8
How many sides does a pentagon have? | 5
How many wheels does a bicycle have? | 2
How many wheels does a tricycle have? | 3
How many continents are there on Earth? | 7
How many planets are there in our solar system? | 8
How many years are there in a century? | 100
How many years are there in a decade? | 10
How many items are there in a dozen? | 12
How many cents are there in one US dollar? | 100
How many centimeters are there in a meter? | 100
How many grams are there in a kilogram? | 1000
How many fingers does a person have on one hand? | 5
How many players does a soccer team have on the field? | 11
How many arms does an octopus have? | 8
How many strings does a standard guitar have? | 6
At what temperature in degrees Celsius does water boil at sea level? | 100
At what temperature in degrees Celsius does water freeze? | 0
How many colors are there in a rainbow? | 7
How many days are there in a leap year? | 366
""")


def _check_n(name: str, n: int, available: int | None = None) -> None:
    if n < 1:
        raise ConfigError(f"Task {name!r} needs n >= 1 items, got {n}.")
    if available is not None and n > available:
        raise ConfigError(f"Task {name!r} has {available} items; n={n} is too many.")


def _sample_rows(name: str, table: tuple, seed: int, n: int) -> list[int]:
    """``n`` row indices of a fact table, drawn without replacement for ``seed``."""
    _check_n(name, n, len(table))
    return random.Random(f"{name}:{seed}").sample(range(len(table)), n)


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
        items.append(TaskItem.ask(
            f"arithmetic-{seed}-{i}", question, str(total), body=f"{context} {question}",
            what="number", context=context,
            metadata={"steps": steps, "ops": ops, "max_operand": max_operand}))
    kinds = "addition" if ops == "add" else "add/subtract"
    return Task("arithmetic", tuple(items), "context", answer_type="number",
                description=f"{steps}-step {kinds} word problems over numbers stated in the prompt")


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
        items.append(TaskItem.ask(
            f"lookup-{seed}-{i}", question, countries[target], body=f"{context} {question}",
            what="country", context=context,
            distractors=tuple(c for j, c in enumerate(countries) if j != target),
            metadata={"town": towns[target], "people": people}))
    return Task("lookup", tuple(items), "context", answer_type="text",
                description="two-hop look-ups (person -> town -> country) over invented names")


def _capitals(seed: int = 0, n: int = 30) -> Task:
    """Capitals of well-known countries, answered from memory.

    The question states nothing the answer could be copied from, so it isolates the
    model's parametric knowledge; the other capitals are distractors, so an output that
    lists several capitals is not credited.
    """
    all_capitals = [row[1] for row in _CAPITALS]
    items = []
    for idx in _sample_rows("capitals", _CAPITALS, seed, n):
        country, capital, aliases = _CAPITALS[idx]
        items.append(TaskItem.ask(
            f"capitals-{idx}", f"What is the capital of {country}?", capital, what="city",
            aliases=tuple(a.strip() for a in aliases.split(";") if a.strip()),
            distractors=tuple(c for c in all_capitals if c != capital),
            metadata={"country": country}))
    return Task("capitals", tuple(items), "knowledge", answer_type="text",
                description="capitals of well-known countries, from the model's own knowledge")


def _counts(seed: int = 0, n: int = 30) -> Task:
    """Everyday numeric facts ("How many legs does a spider have?"), from memory."""
    items = [TaskItem.ask(f"counts-{idx}", _COUNTS[idx][0], _COUNTS[idx][1], what="number")
             for idx in _sample_rows("counts", _COUNTS, seed, n)]
    return Task("counts", tuple(items), "knowledge", answer_type="number",
                description="everyday numeric facts, from the model's own knowledge")


BUILTIN_TASKS: dict[str, Callable[..., Task]] = {
    "arithmetic": _arithmetic,
    "lookup": _lookup,
    "capitals": _capitals,
    "counts": _counts,
}
