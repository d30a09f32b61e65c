"""Files the store writes and reads: atomically written text and JSON, JSON read back with
errors that name the file, append-only JSONL. The one ``write_json`` of rhlens."""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rhlens.errors import ConfigError, ResultError
from rhlens.validate import input_file

__all__ = ["atomic_write", "atomic_write_text", "json_normal", "read_json", "read_jsonl", "write_json"]


def json_normal(obj: Any) -> Any:
    """``obj`` as JSON reads it back, leniently (a run's header, a log record): tuples as lists,
    a dataclass as its ``to_dict()`` (else its fields), any other object as its ``str``. A
    saved result is written strictly instead (:meth:`rhlens.store.results.Result.save`)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = obj.to_dict() if hasattr(obj, "to_dict") else dataclasses.asdict(obj)
    return json.loads(json.dumps(obj, default=str))


def atomic_write(path: str | Path, write: Callable[[str], Any]) -> Path:
    """Write a file so that a crash leaves either the old content or the new, never half.

    ``write(tmp)`` fills a fresh temporary file (created exclusively in the same folder, so no
    link planted there is followed); it is made readable as any other file (``0o666`` less
    the umask) and renamed over ``path`` (a link at ``path`` is replaced, not followed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.close(fd)
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        # mkstemp makes owner-only files; results are meant to be shared like any other file.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and not exc.filename:  # a full disk: say which file
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write a text file atomically (:func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json(path: str | Path, obj: Any) -> Path:
    """``obj`` as indented JSON, written atomically (a value JSON cannot hold is written as
    its ``str``)."""
    return atomic_write_text(path, json.dumps(obj, indent=1, allow_nan=True, default=str))


def read_json(path: str | Path, what: str = "file") -> Any:
    """A JSON file, or a :class:`ResultError` that names it (never a bare traceback)."""
    path = Path(path)
    if not path.exists():
        raise ResultError(f"{path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ResultError(f"{path} is damaged ({what} is not valid JSON: {exc}); "
                          "delete it or rerun the command that wrote it") from exc


def read_jsonl(path: str | Path, *, strict: bool = False) -> list[dict[str, Any]]:
    """Records of a JSONL file; a last line cut by a crash is skipped.

    ``strict``: a damaged line before the last (which no crash can make) raises ConfigError.
    """
    out = []
    if not stat.S_ISREG(os.stat(path).st_mode):
        input_file(path, "log", hint="remove it or choose another output directory")
    lines = Path(path).read_bytes().split(b"\n")
    while lines and not lines[-1].strip():
        lines.pop()
    for i, line in enumerate(lines, start=1):
        try:
            rec = json.loads(line.decode("utf-8"))
            if not isinstance(rec, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            if strict and i < len(lines):
                raise ConfigError(f"{path}, line {i} is damaged ({exc}); the run cannot be "
                                  "resumed: delete that line or choose another output "
                                  "directory") from None
            continue
        out.append(rec)
    return out
