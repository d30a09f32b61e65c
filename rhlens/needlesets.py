"""Needle sets with a held-out split: choose free settings on one set of probes, report on another.

A claim that picks a setting (a window, a K, a budget split) on the probes it then reports on
overstates itself. This module keeps the two apart:

* the packaged needles (``rhlens/data/needles.jsonl``: 64 invented facts, four answer types:
  names, numbers, phrases, multi-token entities) each carry a ``split``, ``"choose"`` or
  ``"report"`` (half of every type each); :func:`packaged_needles` loads one split through
  the ordinary loader (:func:`rhlens.probes.load_needles`);
* :func:`generate_needles` makes fresh needle sets from templates with a seed (invented names,
  places and numbers, so a model can only know the answer from the context), and
  :func:`split_needles` splits any list deterministically by a seed;
* each split reads its own haystack (:class:`RotatedHaystack`: the standard-library text
  started at a seeded sentence; seed 0 is the ordinary haystack), so neither the needles nor
  the filler around them are shared (:data:`HAYSTACK_SEEDS`);
* :func:`choose_then_report` picks the setting maximizing a score on the choosing split and
  evaluates only that one on the report split, returning a record of which split served what.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rhlens.errors import ConfigError
from rhlens.haystacks import Haystack, _stdlib_text, make_haystack
from rhlens.probes import Needle, ProbeConfig, build_probes, load_needles

__all__ = [
    "HAYSTACK_SEEDS",
    "NEEDLES_FILE",
    "SPLITS",
    "RotatedHaystack",
    "choose_setting",
    "choose_then_report",
    "generate_needles",
    "needle_table",
    "packaged_needles",
    "record_split",
    "split_haystack",
    "split_needles",
    "split_probes",
    "write_needles",
]

NEEDLES_FILE = Path(__file__).resolve().parent / "data" / "needles.jsonl"
SPLITS = ("choose", "report")
HAYSTACK_SEEDS = {"choose": 0, "report": 1}  # 0: the ordinary stdlib haystack
ANSWER_TYPES = ("name", "number", "phrase", "entity")


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ConfigError(f"a split is one of {', '.join(SPLITS)}, got {split!r}")
    return split


# ---------------------------------------------------------------------------------------
# Packaged needles
# ---------------------------------------------------------------------------------------
def needle_table(path: str | Path = NEEDLES_FILE) -> list[dict[str, Any]]:
    """Every line of a needles file as a dict (``id``, ``split``, ``type`` when present)."""
    needles = load_needles(path)  # the checks: fields, answer inside the needle
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()
            if line.strip()]
    for n, row in zip(needles, rows):
        row["id"] = n.id
    return rows


def packaged_needles(split: str | None = None, *, types: Sequence[str] | None = None,
                     path: str | Path = NEEDLES_FILE) -> list[Needle]:
    """The packaged needles (or another file's with a ``split`` field), of one split or all.

    Args:
        split: ``"choose"``, ``"report"`` or ``None`` (all).
        types: keep only these answer types (``name``, ``number``, ``phrase``, ``entity``).
    """
    if split is not None:
        _check_split(split)
    rows = {r["id"]: r for r in needle_table(path)}
    out = []
    for n in load_needles(path):
        row = rows[n.id]
        if split is not None:
            if row.get("split") not in SPLITS:
                raise ConfigError(f"{path}: needle {n.id!r} has no split (choose or report)")
            if row["split"] != split:
                continue
        if types is not None and row.get("type") not in types:
            continue
        out.append(n)
    if not out:
        raise ConfigError(f"{path}: no needle of split {split!r} and types {types!r}")
    return out


def split_needles(needles: Sequence[Needle], seed: int, *, share: float = 0.5) -> dict[str, list[Needle]]:
    """Split needles into ``choose`` and ``report`` by a seed: the same seed, the same split,
    whatever the order the needles come in (each needle's place is drawn from its id)."""
    if not 0 < share < 1:
        raise ConfigError(f"share (of the needles for choosing) must be in (0, 1), got {share}")
    ids = sorted({n.id for n in needles})
    if len(ids) != len(needles):
        raise ConfigError("needle ids must be unique")
    if len(ids) < 2:
        raise ConfigError("splitting needs at least 2 needles")
    order = list(ids)
    random.Random(f"rhlens-split-{seed}").shuffle(order)
    k = min(max(1, round(share * len(order))), len(order) - 1)
    choose = set(order[:k])
    return {"choose": [n for n in needles if n.id in choose],
            "report": [n for n in needles if n.id not in choose]}


def write_needles(needles: Sequence[Needle], path: str | Path, *,
                  extra: Mapping[str, Mapping[str, Any]] | None = None) -> Path:
    """Write needles as JSONL (readable by :func:`rhlens.probes.load_needles`); ``extra`` adds
    fields per needle id (e.g. ``{"gen-0": {"split": "report", "type": "number"}}``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"id": n.id, "needle": n.needle, "question": n.question,
                         "real_needle": n.real_needle, **dict((extra or {}).get(n.id, {}))})
             for n in needles]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------
# Generated needles
# ---------------------------------------------------------------------------------------
_ONSETS = ("b", "br", "c", "d", "dr", "f", "g", "gr", "h", "k", "l", "m", "n", "p", "r", "s",
           "st", "t", "th", "v", "w", "z")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou", "ea")
_CODAS = ("", "n", "r", "l", "s", "th", "m", "nd", "rk", "x")
_THINGS = ("lantern", "violin", "compass", "teapot", "clock", "mirror", "kettle", "bell",
           "telescope", "music box", "chess set", "quilt")
_COLOURS = ("amber", "cobalt", "crimson", "silver", "olive", "ivory", "copper", "violet")
_ANIMALS = ("heron", "badger", "falcon", "otter", "lynx", "sparrow", "moth", "stag")
_PLACES = ("Tower", "Abbey", "Market", "Library", "Harbour", "Observatory", "Garden", "Mill")
_ACTIONS = ("hum a tune about {c} {a}s", "knock twice on the {c} door",
            "leave a {t} by the {c} gate", "count {a}s until dawn", "whisper the word {w}")

# Each template: (type, needle, question, answer). Fields: {P} a place name, {N} a person's
# name, {T} a thing, {X} the answer.
_TEMPLATES = (
    ("name", "The {T} in the old {Pl} of {P} belongs to {X}.",
     "Who does the {T} in the old {Pl} of {P} belong to?"),
    ("name", "The night watchman of {P} is a man named {X}.",
     "Who is the night watchman of {P}?"),
    ("number", "The {Pl} of {P} has exactly {X} windows.",
     "How many windows does the {Pl} of {P} have?"),
    ("number", "The code to the {T} cabinet in {P} is {X}.",
     "What is the code to the {T} cabinet in {P}?"),
    ("phrase", "To open the {Pl} of {P} you must {X}.",
     "What must you do to open the {Pl} of {P}?"),
    ("entity", "The {T} of {N} is kept in {X}.",
     "Where is the {T} of {N} kept?"),
)


def _word(rng: random.Random, syllables: int) -> str:
    w = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)) + rng.choice(_CODAS)
    return w.capitalize()


def _answer(kind: str, template: str, rng: random.Random) -> str:
    if kind == "name":
        return f"{_word(rng, 2)} {_word(rng, rng.choice((2, 3)))}"
    if kind == "number":
        if "code" in template:
            return "-".join(str(rng.randrange(10, 100)) for _ in range(3))
        return str(rng.randrange(101, 9999))
    if kind == "phrase":
        action = rng.choice(_ACTIONS)
        return action.format(c=rng.choice(_COLOURS), a=rng.choice(_ANIMALS), t=rng.choice(_THINGS),
                             w=_word(rng, 2).lower())
    return f"the {rng.choice(_COLOURS)} {rng.choice(_PLACES)} of {_word(rng, 2)}"


def generate_needles(n: int, seed: int, *, types: Sequence[str] = ANSWER_TYPES,
                     prefix: str = "gen") -> list[Needle]:
    """``n`` fresh needles from templates, drawn with ``seed`` (the same seed, the same set).

    Places, people and answers are invented words, so a model can only answer from the
    context. ``types`` picks the answer types (cycled in order); ids are ``<prefix><seed>-<i>``.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"n must be an integer >= 1, got {n!r}")
    bad = [t for t in types if t not in ANSWER_TYPES]
    if bad or not types:
        raise ConfigError(f"answer types are {', '.join(ANSWER_TYPES)}, got {list(types)!r}")
    rng = random.Random(f"rhlens-needles-{seed}")
    out: list[Needle] = []
    used: set[str] = set()
    while len(out) < n:
        kind = types[len(out) % len(types)]
        needle_t, question_t = rng.choice([(a, b) for k, a, b in _TEMPLATES if k == kind])
        place = _word(rng, rng.choice((2, 3)))
        if place in used:
            continue
        fill = {"P": place, "N": f"{_word(rng, 2)} {_word(rng, 2)}", "T": rng.choice(_THINGS),
                "Pl": rng.choice(_PLACES).lower()}
        answer = _answer(kind, needle_t, rng)
        needle = needle_t.format(X=answer, **fill)
        question = question_t.format(**fill)
        used.add(place)
        out.append(Needle(needle, question, answer, id=f"{prefix}{seed}-{len(out)}"))
    return out


# ---------------------------------------------------------------------------------------
# Haystacks per split
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RotatedHaystack(Haystack):
    """The standard-library docstrings started at a seeded sentence (seed 0: unrotated, the
    ordinary ``stdlib`` haystack's text), so two splits hide their needles in different text."""

    seed: int = 0
    name = "stdlib-docs-rotated"

    def _start(self, text: str) -> int:
        if self.seed == 0:
            return 0
        ends = [m.end() for m in re.finditer(r"[.!?] ", text)]
        if not ends:
            return 0
        return random.Random(f"rhlens-haystack-{self.seed}").choice(ends)

    def describe(self) -> dict:
        return {"haystack": self.name, "seed": self.seed}

    def text(self, min_chars: int) -> str:
        base = make_haystack("stdlib").text(1)  # raises where there are no docstrings
        k = self._start(base)
        rotated = base[k:] + " " + base[:k] if k else base
        reps = -(-min_chars // len(rotated))
        return " ".join([rotated] * max(1, reps))

    def source_text(self) -> str:
        return self.text(len(_stdlib_text()))


def split_haystack(split: str, seeds: Mapping[str, int] = HAYSTACK_SEEDS) -> Haystack:
    """The haystack a split's probes are built in (seed 0 gives the plain stdlib haystack)."""
    seed = seeds[_check_split(split)]
    return make_haystack("stdlib") if seed == 0 else RotatedHaystack(seed)


def split_probes(tokenizer, split: str, *, lengths: Sequence[int], depths: Sequence[float],
                 needles: Sequence[Needle] | None = None, n_needles: int | None = None,
                 cycle_depths: bool = True, haystack_seeds: Mapping[str, int] = HAYSTACK_SEEDS,
                 max_length: int | None = None, config: ProbeConfig | None = None):
    """The probes of one split: its needles (default: the packaged ones of that split, the
    first ``n_needles``) in its own haystack.

    With ``cycle_depths`` each needle appears once per length, at ``depths[i % len(depths)]``
    (needle ``i``): many needles at few probes; otherwise the full grid needles x depths.
    Returns ``(probes, record)``; ``record`` says what the split is made of (for ``run.json``).
    """
    _check_split(split)
    needles = list(needles) if needles is not None else packaged_needles(split)
    if n_needles is not None:
        needles = needles[:n_needles]
    hay = split_haystack(split, haystack_seeds)
    base = config or ProbeConfig()
    probes = []
    if cycle_depths:
        for i, d in enumerate(depths):
            group = needles[i::len(depths)]
            if group:
                cfg = dataclasses.replace(base, lengths=tuple(lengths), depths=(d,))
                probes += list(build_probes(tokenizer, config=cfg, needles=group, haystack=hay,
                                            max_length=max_length))
    else:
        cfg = dataclasses.replace(base, lengths=tuple(lengths), depths=tuple(depths))
        probes = list(build_probes(tokenizer, config=cfg, needles=needles, haystack=hay,
                                   max_length=max_length))
    record = {"split": split, "needles": [n.id for n in needles], "haystack": hay.describe(),
              "haystack_sha256": hay.sha256(), "n_probes": len(probes),
              "lengths": list(lengths), "depths": list(depths), "cycle_depths": cycle_depths}
    return probes, record


# ---------------------------------------------------------------------------------------
# Choose on one split, report on the other
# ---------------------------------------------------------------------------------------
def choose_setting(settings: Sequence[Any], evaluate: Callable[[Any], float], *,
                   maximize: bool = True) -> tuple[Any, list[list[Any]]]:
    """The setting with the best ``evaluate(setting)`` (ties: the earlier one), and every
    setting's score as ``[[setting, score], ...]``. ``evaluate`` should read the choosing split
    only; :func:`choose_then_report` makes sure of it."""
    settings = list(settings)
    if not settings:
        raise ConfigError("no settings to choose from")
    scored = [[s, float(evaluate(s))] for s in settings]
    if any(v != v for _, v in scored):
        raise ConfigError(f"a setting scored NaN on the choosing split: {scored}")
    sign = 1 if maximize else -1
    best = max(range(len(scored)), key=lambda i: (sign * scored[i][1], -i))
    return scored[best][0], scored


def choose_then_report(settings: Sequence[Any], evaluate: Callable[[Any, str], float], *,
                       choose: str = "choose", report: str = "report",
                       maximize: bool = True) -> dict[str, Any]:
    """The setting that scores best on the ``choose`` split, and its score on ``report``.

    ``evaluate(setting, split)`` returns a number; it is called once per setting on the
    choosing split and once, for the chosen setting only, on the report split, so nothing of
    the report split can sway the choice. Ties go to the earlier setting.

    Returns ``{"chosen", "choose_split", "report_split", "choose_scores": [[setting, score]],
    "chosen_score_on_choose", "report_score", "maximize"}``.
    """
    _check_split(choose)
    _check_split(report)
    if choose == report:
        raise ConfigError(f"choosing and reporting on the same split ({choose!r}) is what this "
                          "guards against; give two different splits")
    chosen, scored = choose_setting(settings, lambda s: evaluate(s, choose), maximize=maximize)
    on_choose = next(v for s, v in scored if s == chosen)
    return {"chosen": chosen, "choose_split": choose, "report_split": report,
            "choose_scores": scored, "chosen_score_on_choose": on_choose,
            "report_score": float(evaluate(chosen, report)), "maximize": maximize}


def record_split(run_dir: str | Path, record: Mapping[str, Any]) -> Path:
    """Say which split a run's probes are and what they served: ``split.json`` in ``run_dir``
    and a top-level ``"heldout"`` entry in every ``*run.json`` header there (a resume keeps it)."""
    from rhlens.results import read_json, write_json

    run_dir = Path(run_dir)
    record = json.loads(json.dumps(dict(record), default=str))
    for path in sorted(run_dir.glob("*run.json")):
        doc = read_json(path, path.name)
        if isinstance(doc, dict) and doc.get("heldout") != record:
            doc["heldout"] = record
            write_json(path, doc)
    return write_json(run_dir / "split.json", record)
