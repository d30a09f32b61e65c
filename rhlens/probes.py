"""Needle-in-a-haystack probes: haystacks, needles, the probe grid, and exact needle spans.

A probe is built at the token level, as the paper's harness does: the haystack is
tokenized once, cut to the length budget, the needle's tokens are inserted at the depth's
position moved back to the nearest sentence end, and the prompt template's tokens are put
around it. Because the needle's tokens are placed (not searched for), its span is known
exactly; the answer (``real_needle``) is located inside the needle through the tokenizer's
character offsets, so a tokenizer that merges across the answer's edge still gets the
right tokens. Anything that cannot be located raises :class:`ProbeError` (the paper's code
silently scored such probes 0).
"""

from __future__ import annotations

import importlib
import inspect
import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from rhlens.errors import ConfigError, ProbeError
from rhlens.probe import Probe

__all__ = [
    "BUILTIN_NEEDLES",
    "DirectoryHaystack",
    "Haystack",
    "Needle",
    "ProbeConfig",
    "StdlibHaystack",
    "SyntheticHaystack",
    "build_probe",
    "build_probes",
    "load_needles",
    "make_haystack",
]


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
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"needles file {path} does not exist")
    needles = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
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
            needles.append(Needle(obj["needle"], obj["question"], obj["real_needle"],
                                  str(obj.get("id", f"{path.stem}-{lineno}"))))
        except ProbeError as exc:
            raise ConfigError(f"{path}, line {lineno}: {exc}") from exc
    if not needles:
        raise ConfigError(f"needles file {path} holds no needles")
    return needles


# --------------------------------------------------------------------------------------
# Haystacks
# --------------------------------------------------------------------------------------
class Haystack:
    """Filler text. Subclasses return the same text for the same settings (deterministic)."""

    name = "haystack"

    def text(self, min_chars: int) -> str:  # pragma: no cover - interface
        raise NotImplementedError

    def describe(self) -> dict:
        return {"haystack": self.name}


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


@dataclass(frozen=True)
class DirectoryHaystack(Haystack):
    """All ``.txt`` files of a directory, in name order (the paper used Paul Graham's essays)."""

    directory: str

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"dir:{self.directory}"

    def text(self, min_chars: int) -> str:
        folder = Path(self.directory)
        if not folder.is_dir():
            raise ConfigError(f"haystack directory {folder} does not exist")
        files = sorted(folder.glob("*.txt"))
        if not files:
            raise ConfigError(f"haystack directory {folder} holds no .txt files")
        texts = [_clean(f.read_text(encoding="utf-8", errors="replace")) for f in files]
        texts = [t for t in texts if t]
        if not texts:
            raise ConfigError(f"the .txt files in {folder} are all empty")
        parts, total = [], 0
        while total < min_chars:  # cycle through the files when they are short
            for chunk in texts:
                parts.append(chunk)
                total += len(chunk) + 1
                if total >= min_chars:
                    break
        return " ".join(parts)


_STDLIB_MODULES = (
    "collections", "json", "pathlib", "functools", "itertools", "argparse", "datetime",
    "decimal", "fractions", "statistics", "textwrap", "difflib", "string", "calendar",
    "csv", "heapq", "bisect", "enum", "dataclasses", "contextlib", "shutil", "tarfile",
    "zipfile", "random", "re", "io", "queue", "threading", "subprocess", "socket", "uuid",
    "base64", "html", "inspect", "logging", "typing", "unittest", "urllib.parse",
    "email.message", "http.client", "math", "os",
)


@lru_cache(maxsize=1)
def _stdlib_text() -> str:
    paragraphs: list[str] = []
    for mod_name in _STDLIB_MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:  # a trimmed Python build; the rest is still deterministic
            continue
        docs = [inspect.getdoc(mod)]
        for attr in sorted(vars(mod)):
            obj = vars(mod)[attr]
            if attr.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
                continue
            if inspect.isclass(obj) or inspect.isfunction(obj):
                docs.append(inspect.getdoc(obj))
        for doc in docs:
            if not doc:
                continue
            # Keep prose, drop doctest and indented code lines.
            lines = [ln for ln in doc.splitlines()
                     if not ln.lstrip().startswith((">>>", "...")) and not ln.startswith("    ")]
            para = _clean(" ".join(lines))
            if len(para) > 40:
                paragraphs.append(para if para.endswith((".", "!", "?")) else para + ".")
    return " ".join(paragraphs)


@dataclass(frozen=True)
class StdlibHaystack(Haystack):
    """Docstrings of the installed Python standard library, read at run time.

    Needs no download and puts no third-party text in the repository. Deterministic for a
    given Python version.
    """

    name = "stdlib-docs"

    def text(self, min_chars: int) -> str:
        text = _stdlib_text()
        if not text:
            raise ConfigError("no standard-library docstrings found (python -OO strips them); "
                              "use --haystack DIR or the synthetic haystack")
        reps = -(-min_chars // len(text))
        return " ".join([text] * max(1, reps))


_SUBJECTS = ("the river", "a merchant", "the old clock", "our neighbour", "the committee",
             "a small boat", "the library", "the orchestra", "a farmer", "the winter wind",
             "the baker", "a student", "the city council", "the mountain path", "a painter")
_VERBS = ("crossed", "described", "repaired", "watched", "visited", "measured", "ignored",
          "followed", "counted", "painted", "remembered", "carried", "opened", "studied")
_OBJECTS = ("the northern bridge", "a quiet market", "the harbour lights", "an empty field",
            "the long corridor", "a wooden fence", "the evening train", "a pile of letters",
            "the stone well", "a narrow street", "the village square", "a box of tools")
_TAILS = ("before the rain began", "without saying a word", "for the third time that week",
          "while the sun was setting", "after a long discussion", "in the early morning",
          "as everyone expected", "with great care", "despite the noise", "just in time")


@dataclass(frozen=True)
class SyntheticHaystack(Haystack):
    """Seeded random sentences from a small grammar: cheap, endless, and fact-free."""

    seed: int = 0
    name = "synthetic"

    def describe(self) -> dict:
        return {"haystack": self.name, "seed": self.seed}

    def text(self, min_chars: int) -> str:
        rng = random.Random(self.seed)
        parts, total = [], 0
        while total < min_chars:
            s = (f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} "
                 f"{rng.choice(_TAILS)}.")
            s = s[0].upper() + s[1:]
            parts.append(s)
            total += len(s) + 1
        return " ".join(parts)


def make_haystack(spec: str | Path | Haystack | None = None, seed: int = 0) -> Haystack:
    """``None``/``"stdlib"``: standard-library docstrings; ``"synthetic"``; or a directory."""
    if isinstance(spec, Haystack):
        return spec
    if spec is None or str(spec) == "stdlib":
        return StdlibHaystack()
    if str(spec) == "synthetic":
        return SyntheticHaystack(seed)
    return DirectoryHaystack(str(spec))


# --------------------------------------------------------------------------------------
# Prompt and probe grid
# --------------------------------------------------------------------------------------
DEFAULT_TEMPLATE = (
    "This is a very long document:\n<document>\n{context}\n</document>\n"
    "Based on the content of the document, answer the question in a short sentence.\n"
    "Question: {question}"
)


@dataclass(frozen=True)
class ProbeConfig:
    """The probe grid: context lengths x needle depths x needles.

    Attributes:
        lengths: total prompt budgets in tokens (prompt + ``answer_buffer``).
        depths: needle depths in percent (0 = start of the haystack, 100 = end).
        answer_buffer: tokens left free for the answer, as in the paper's harness (200).
        chat_template: wrap the prompt in the tokenizer's chat template when it has one.
        template: the user message; must contain ``{context}`` and ``{question}``.
        haystack_seed: seed of the synthetic haystack.
    """

    lengths: Sequence[int] = (500, 1000, 1500, 2000)
    depths: Sequence[float | int] = (0.0, 25.0, 50.0, 75.0, 100.0)
    answer_buffer: int = 200
    chat_template: bool = True
    template: str = DEFAULT_TEMPLATE
    haystack_seed: int = 0
    min_haystack_tokens: int = 16

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
        if self.answer_buffer < 0:
            raise ConfigError("answer_buffer must be >= 0")
        if "{context}" not in self.template or "{question}" not in self.template:
            raise ConfigError("template must contain {context} and {question}")

    @staticmethod
    def linspace(lo: float | int, hi: float | int, count: int, *, integer: bool = True) -> tuple:
        """``count`` values from ``lo`` to ``hi`` inclusive, evenly spaced (the paper's grid)."""
        if count < 1:
            raise ConfigError("count must be >= 1")
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


def _needle_tokens(tokenizer, needle: Needle) -> tuple[list[int], tuple[int, int]]:
    """The needle's tokens (with a leading space, as after a sentence) and the answer's span."""
    text = " " + needle.needle.strip()
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    c0 = text.index(needle.real_needle.strip())
    c1 = c0 + len(needle.real_needle.strip())
    inside = [i for i, (a, b) in enumerate(offsets) if a < c1 and b > c0 and b > a]
    if not inside:
        raise ProbeError(f"needle {needle.id!r}: its answer maps to no token")
    return ids, (inside[0], inside[-1] + 1)


def build_probe(tokenizer, haystack_ids: Sequence[int], needle: Needle, length: int,
                depth: float | int, config: ProbeConfig | None = None,
                meta: dict | None = None) -> Probe:
    """One probe of ``length`` tokens (prompt + answer buffer) with ``needle`` at ``depth``%."""
    config = config or ProbeConfig()
    parts = _prompt_parts(tokenizer, config.template, needle.question, config.chat_template)
    needle_ids, (a0, a1) = _needle_tokens(tokenizer, needle)
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
    point = budget if depth >= 100 else _sentence_end(tokenizer, hay, int(budget * depth / 100))
    context = hay[:point] + needle_ids + hay[point:]
    start = len(parts.prefix) + point
    prompt = parts.prefix + context + parts.suffix
    span = (start + a0, start + a1)
    # The answer must be readable at the span: a last guard against off-by-one placement.
    if prompt[span[0]:span[1]] != needle_ids[a0:a1]:  # pragma: no cover - internal invariant
        raise ProbeError(f"needle {needle.id!r} could not be located in the prompt")
    return Probe(prompt_ids=tuple(prompt), needle_span=span, real_needle=needle.real_needle,
                 length=length, depth=depth, needle_id=needle.id, question=needle.question,
                 meta={"insert_token": start, "needle_tokens": len(needle_ids), **(meta or {})})


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
    if len({n.id for n in needles}) != len(needles):
        raise ConfigError("needle ids must be unique")
    if max_length is not None and max(config.lengths) > max_length:
        raise ProbeError(
            f"length {max(config.lengths)} exceeds the model's maximum context of {max_length} "
            "tokens; choose shorter lengths"
        )
    hs = make_haystack(haystack, config.haystack_seed)
    hay_ids = _haystack_ids(tokenizer, hs, max(config.lengths))
    meta = hs.describe()
    probes = [build_probe(tokenizer, hay_ids, n, length, depth, config, meta)
              for length in config.lengths for depth in config.depths for n in needles]
    return ProbeSet(probes=probes, config=config, needles=needles, haystack=meta)
