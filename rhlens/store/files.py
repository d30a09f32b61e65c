"""Files the store writes and reads: atomically written text and JSON, JSON read back with
errors that name the file, append-only JSONL. The one ``write_json`` of rhlens."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from rhlens.errors import ConfigError, ResultError

__all__ = ["atomic_write_text", "read_json", "read_jsonl", "write_json"]


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write a file so that a crash leaves either the old content or the new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        # mkstemp makes owner-only files; results are meant to be shared like any other file.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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
