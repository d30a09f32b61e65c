"""Haystacks: the filler text a needle hides in (the standard library's docstrings, seeded
synthetic sentences, or a folder of ``.txt`` files), each deterministic and content-hashed."""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import random
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from rhlens.errors import ConfigError

__all__ = ["DirectoryHaystack", "Haystack", "StdlibHaystack", "SyntheticHaystack", "make_haystack",
           "sha256_text"]


def sha256_text(text: str) -> str:
    """SHA-256 of a string's UTF-8 bytes: the content hashes a run's identity is made of."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class Haystack:
    """Filler text. Subclasses return the same text for the same settings (deterministic)."""

    name = "haystack"

    def text(self, min_chars: int) -> str:  # pragma: no cover - interface
        raise NotImplementedError

    def describe(self) -> dict:
        return {"haystack": self.name}

    def source_text(self) -> str:
        """The whole text the haystack draws from, before cutting or cycling (hashed into a
        run's identity)."""
        return self.text(4096)

    def sha256(self) -> str:
        return sha256_text(self.source_text())


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


@dataclass(frozen=True)
class DirectoryHaystack(Haystack):
    """All ``.txt`` files of a directory, in name order (the paper used Paul Graham's essays)."""

    directory: str

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"dir:{self.directory}"

    def _texts(self) -> list[tuple[str, str]]:
        from rhlens.validate import input_dir, input_file

        folder = input_dir(self.directory, "haystack directory",
                           hint="--haystack takes a folder of .txt files, 'stdlib' or 'synthetic'")
        files = sorted(folder.glob("*.txt"))
        if not files:
            raise ConfigError(f"haystack directory {folder} holds no .txt files")
        for f in files:  # before any is read: a FIFO or a device would block or never end
            input_file(f, "haystack file", hint="a haystack folder holds ordinary .txt files")
        texts = [(f.name, _clean(f.read_text(encoding="utf-8", errors="replace"))) for f in files]
        texts = [(n, t) for n, t in texts if t]
        if not texts:
            raise ConfigError(f"the .txt files in {folder} are all empty")
        return texts

    def source_text(self) -> str:
        return json.dumps(self._texts())

    def text(self, min_chars: int) -> str:
        texts = [t for _, t in self._texts()]
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

    def source_text(self) -> str:
        return _stdlib_text()


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
