"""One validation layer for what enters rhlens: heads, spans, token ids, counts, scores, files.

The CLI and the Python API call the same functions, so a notebook user gets the same one-line
reason (a :class:`~rhlens.errors.ConfigError`) as the command line. The rules:

* exact types: a head's layer and index are whole numbers (Python or numpy integers, 0-d
  integer tensors); a string, a float or a bool is refused, never coerced with ``int()``;
* finite values: NaN and infinite scores are refused before anything ranks them;
* shapes that agree: a span is exactly ``(start, end)``, token ids lie in the vocabulary;
* bounded counts: a count is checked against its real limit before anything is expanded;
* files are what they claim to be: inputs must be regular files (a FIFO, a device or a
  socket would block or never end), outputs are never written through a symbolic link.

A ground layer: it imports only :mod:`rhlens.errors` and third-party packages.
"""

from __future__ import annotations

import math
import numbers
import operator
import os
import stat
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from rhlens.errors import ConfigError

__all__ = [
    "DRAWS_WHY",
    "MAX_DRAWS",
    "MAX_GRID_POINTS",
    "check_count",
    "check_finite",
    "check_head",
    "check_heads",
    "check_log_records",
    "check_output_dir",
    "check_resumed",
    "check_span",
    "check_token_ids",
    "check_token_rows",
    "cot_record_problem",
    "detect_record_problem",
    "families_record_problem",
    "input_dir",
    "input_file",
    "niah_record_problem",
    "own_file",
    "parse_head",
    "parse_heads",
    "patching_record_problem",
    "whole_number",
]

MAX_GRID_POINTS = 100_000  # lengths, depths: more than any grid could run
# Random draws averaged into one mean (random-K masks per K, random KV policies per budget,
# the head detectors' sequences): each one reruns the probes, and 10,000 already pin the mean
# to 1% of the draws' spread (its standard error, spread / sqrt(n)).
MAX_DRAWS = 10_000
DRAWS_WHY = ("random draws averaged into one mean: 10,000 already pin it to 1% of their "
             "spread, and each draw is one more run over the probes")


# ---- numbers ---------------------------------------------------------------------------------
def whole_number(value: Any, what: str) -> int:
    """``value`` as an int if it is exactly a whole number (int, numpy integer, 0-d integer
    tensor); a bool, float or string is refused."""
    if isinstance(value, bool) or type(value).__name__ == "bool_" or isinstance(value, (str, bytes)):
        raise ConfigError(f"{what} must be a whole number, got {value!r}")
    if isinstance(value, numbers.Integral):
        return int(value)
    dtype = getattr(value, "dtype", None)
    if dtype is not None and getattr(value, "ndim", None) == 0 and \
            not getattr(dtype, "is_floating_point", True) and str(dtype) != "torch.bool":
        return operator.index(value)
    raise ConfigError(f"{what} must be a whole number, got {value!r}")


def check_count(value: Any, what: str, *, minimum: int = 1, maximum: int | None = None,
                why: str = "") -> int:
    """A whole number in ``[minimum, maximum]``; the message says the real limit (``why``)."""
    n = whole_number(value, what)
    if n < minimum:
        raise ConfigError(f"{what} must be >= {minimum}, got {n}")
    if maximum is not None and n > maximum:
        raise ConfigError(f"{what} is {n}, above the limit of {maximum}" + (f" ({why})" if why else ""))
    return n


def check_finite(values: Any, what: str) -> Any:
    """Refuse NaN or infinite values in a tensor, array or sequence of numbers."""
    if hasattr(values, "isfinite"):  # a torch tensor
        bad = ~values.isfinite()
        if bool(bad.any()):
            index = tuple(int(i) for i in bad.nonzero()[0].tolist())
            raise ConfigError(f"{what} holds {int(bad.sum())} value(s) that are NaN or infinite "
                              f"(first at index {index}: {values[index].item()}); scores must be "
                              "finite numbers")
        return values
    flat = list(values) if isinstance(values, Iterable) else [values]
    for i, v in enumerate(flat):
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise ConfigError(f"{what}: item {i} is {v!r}, not a number")
        if not math.isfinite(v):
            raise ConfigError(f"{what}: item {i} is {v}; scores must be finite numbers")
    return values


# ---- heads -----------------------------------------------------------------------------------
def check_head(item: Any, grid: Sequence[int] | None = None) -> tuple[int, int]:
    """A head ``(layer, head)``: exactly two whole numbers, inside ``grid`` when given."""
    form = f"a head is a (layer, head) pair of whole numbers, got {item!r}"
    if isinstance(item, (str, bytes)):
        raise ConfigError(form)
    if isinstance(item, Sequence) or (hasattr(item, "shape") and getattr(item, "ndim", 0) == 1):
        parts = list(item)  # a tensor or array of two gives its two 0-d elements
    else:
        raise ConfigError(form)
    if len(parts) != 2:
        raise ConfigError(form)
    try:
        layer, head = (whole_number(x, "layer") for x in parts)
    except ConfigError:
        raise ConfigError(form) from None
    if layer < 0 or head < 0:
        raise ConfigError(f"head ({layer}, {head}): layers and heads count from 0")
    if grid is not None:
        n_layers, n_heads = int(grid[0]), int(grid[1])
        if layer >= n_layers or head >= n_heads:
            raise ConfigError(f"head ({layer}, {head}) is outside the model's {n_layers} layers "
                              f"x {n_heads} heads")
    return layer, head


def check_heads(items: Any, grid: Sequence[int] | None = None) -> tuple[tuple[int, int], ...]:
    """Every head of ``items`` (:func:`check_head`), in the given order."""
    if isinstance(items, (str, bytes)) or not isinstance(items, Iterable):
        raise ConfigError(f"heads are a list of (layer, head) pairs, got {items!r}")
    return tuple(check_head(h, grid) for h in items)


def parse_head(text: str, grid: Sequence[int] | None = None) -> tuple[int, int]:
    """``"L.H"`` (e.g. ``"3.1"``) as a head; anything else is refused with the form."""
    parts = str(text).strip().split(".")
    if len(parts) != 2 or not all(p.strip().isdecimal() and p.strip().isascii() for p in parts):
        raise ConfigError(f"heads are written layer.head (e.g. 3.1,10.4), got {str(text).strip()!r}")
    return check_head((int(parts[0]), int(parts[1])), grid)


def parse_heads(text: str, grid: Sequence[int] | None = None) -> tuple[tuple[int, int], ...]:
    """``"L.H,L.H,..."`` as heads (:func:`parse_head`); nothing empty."""
    return tuple(parse_head(item, grid) for item in str(text).split(","))


# ---- spans and tokens ------------------------------------------------------------------------
def check_span(span: Any, limit: int | None = None, what: str = "needle_span") -> tuple[int, int]:
    """``(start, end)``: two whole numbers, ``0 <= start < end`` (``<= limit`` when given)."""
    if hasattr(span, "tolist") and not isinstance(span, Sequence):
        span = span.tolist()
    if isinstance(span, (str, bytes)) or not isinstance(span, Sequence) or len(span) != 2:
        raise ConfigError(f"{what} must be (start, end), two whole numbers, got {span!r}")
    start, end = (whole_number(x, f"{what} bound") for x in span)
    if not 0 <= start < end or (limit is not None and end > limit):
        within = f" inside the {limit}-token prompt" if limit is not None else ""
        raise ConfigError(f"{what} ({start}, {end}) must satisfy 0 <= start < end{within}")
    return start, end


def check_token_ids(ids: Any, vocab_size: int | None = None, what: str = "token ids") -> Any:
    """Integer token ids in ``[0, vocab_size)``; returns them unchanged."""
    if hasattr(ids, "dtype") and hasattr(ids, "min"):
        dtype = ids.dtype
        if getattr(dtype, "is_floating_point", False) or str(dtype) in ("torch.bool", "bool") or \
                (hasattr(dtype, "kind") and dtype.kind not in "iu"):
            raise ConfigError(f"{what} must be integers, got dtype {dtype}")
        if getattr(ids, "numel", lambda: ids.size)() == 0:
            return ids
        lo, hi = int(ids.min()), int(ids.max())
    else:
        values = [whole_number(x, what[:-1] if what.endswith("s") else what)
                  for x in (ids if isinstance(ids, Iterable) and not isinstance(ids, (str, bytes))
                            else [ids])]
        if not values:
            return ids
        lo, hi = min(values), max(values)
    if lo < 0 or (vocab_size is not None and hi >= vocab_size):
        bad = lo if lo < 0 else hi
        limit = f"[0, {vocab_size - 1}]" if vocab_size is not None else ">= 0"
        raise ConfigError(f"{what}: id {bad} is outside the vocabulary ({limit})")
    return ids


def check_token_rows(tokens: Any, vocab_size: int | None = None, what: str = "tokens", *,
                     form: str = "[batch, pos]") -> Any:
    """``tokens`` as a ``[batch, pos]`` int64 torch tensor (a ``[pos]`` one gets a batch of 1),
    refused with one line when they are not token ids: not whole numbers (floats, bools,
    strings, ``None``), rows of different lengths, another number of dimensions, empty, or an
    id outside ``[0, vocab_size)``. Nothing reaches the model before this passes."""
    import torch

    shape = f"{what} must be {form} token ids (whole numbers)"
    if isinstance(tokens, (str, bytes)):
        raise ConfigError(f"{shape}, got a string {_cut(tokens)}")
    if isinstance(tokens, torch.Tensor):
        t = tokens
    else:
        if hasattr(tokens, "dtype") and hasattr(tokens, "shape"):  # numpy
            kind = getattr(tokens.dtype, "kind", "")
            if kind not in "iu" or not kind:
                raise ConfigError(f"{shape}, got dtype {tokens.dtype}")
        try:
            t = torch.as_tensor(tokens)
        except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
            raise ConfigError(f"{shape}, got {_cut(tokens)} ({str(exc).splitlines()[0][:80]})") from None
    if t.numel() == 0:
        raise ConfigError(f"{shape}, got none (shape {tuple(t.shape)})")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ConfigError(f"{shape}, got dtype {t.dtype}")
    if t.ndim not in (1, 2):
        raise ConfigError(f"{shape}, got shape {tuple(t.shape)}")
    t = t.reshape(-1, t.shape[-1])
    check_token_ids(t, vocab_size, what=what)
    return t.long()


# ---- files -----------------------------------------------------------------------------------
def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "not a regular file"


def input_file(path: str | os.PathLike, what: str, *, hint: str = "") -> Path:
    """``path`` if it is a regular file (symlinks to one are fine); a missing path, a symlink
    loop, a directory, a FIFO, a device or a socket is refused with one line, before any read
    could block on it."""
    if str(path) == "":
        raise ConfigError(f"{what} is empty: give a file")
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise ConfigError(f"{what} {path} is a symbolic link to nothing") from None
        raise ConfigError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"{what} {path} cannot be read: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{what} {path} is {_kind(st.st_mode)}, not a regular file"
                          + (f"; {hint}" if hint else ""))
    return path


def input_dir(path: str | os.PathLike, what: str, *, hint: str = "") -> Path:
    """``path`` if it is a directory; otherwise one line saying what it is."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"{what} {path} cannot be read: {exc.strerror or exc}") from None
    if not stat.S_ISDIR(st.st_mode):
        kind = "a file" if stat.S_ISREG(st.st_mode) else _kind(st.st_mode)
        raise ConfigError(f"{what} {path} is {kind}, not a directory" + (f"; {hint}" if hint else ""))
    return path


def check_output_dir(path: str | os.PathLike) -> Path:
    """An output folder's path, refused when it cannot be one: empty, a file, a special file,
    a symbolic link that leads nowhere (a loop or a missing target)."""
    if str(path).strip() == "":
        raise ConfigError("the output directory is empty (''): give a directory, e.g. --out runs/x")
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise ConfigError(f"output directory {path} is a symbolic link to nothing "
                              f"({os.readlink(path)!r}); remove it or choose another output "
                              "directory") from None
        return path
    except OSError as exc:
        if os.path.islink(path):
            raise ConfigError(f"output directory {path} is a symbolic link that cannot be followed "
                              f"({exc.strerror or exc}: a loop?); remove it or choose another "
                              "output directory") from None
        raise ConfigError(f"output directory {path}: {exc.strerror or exc}") from None
    if stat.S_ISREG(st.st_mode):
        raise ConfigError(f"output directory {path} is a file; choose a directory")
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"output directory {path} is {_kind(st.st_mode)}; choose a directory")
    return path


def own_file(path: str | os.PathLike, what: str = "file") -> Path:
    """Refuse to write into ``path`` when it is not a plain file of its own: a symbolic link
    (rhlens would write where it points) or a special file. A missing path is fine."""
    path = Path(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return path
    if stat.S_ISLNK(st.st_mode):
        raise ConfigError(f"{path} is a symbolic link; rhlens does not write through links "
                          f"into a {what}: remove it or choose another output directory")
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{path} is {_kind(st.st_mode)}, not a {what} rhlens wrote: remove "
                          "it or choose another output directory")
    return path


# ---- records read back -------------------------------------------------------------------------
def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def detect_record_problem(rec: Any, grid: Sequence[int] | None = None) -> str | None:
    """What is wrong with one record of a detection log (``probes.jsonl``), or ``None``."""
    if not isinstance(rec, dict):
        return "not a JSON object"
    for name, ok, what in (("key", lambda v: isinstance(v, str) and v, "a non-empty string"),
                           ("success", lambda v: isinstance(v, bool), "true or false"),
                           ("rouge_recall", _is_number, "a finite number"),
                           ("response", lambda v: isinstance(v, str), "a string"),
                           ("scores", lambda v: isinstance(v, list) and v, "a [layer][head] list")):
        if name not in rec:
            return f"field {name!r} is missing"
        if not ok(rec[name]):
            return f"field {name!r} must be {what}, got {_cut(rec[name])}"
    rows = rec["scores"]
    n_layers = len(rows) if grid is None else int(grid[0])
    if len(rows) != n_layers:
        return f"'scores' has {len(rows)} layers, the model {n_layers}"
    width = int(grid[1]) if grid is not None else (len(rows[0]) if isinstance(rows[0], list) else 0)
    for layer, row in enumerate(rows):
        if not isinstance(row, list):
            return f"'scores' row {layer} is {_cut(row)}, not a list of per-head scores"
        if len(row) != width or not width:
            return f"'scores' row {layer} has {len(row)} heads, expected {width or 'at least 1'}"
        for head, v in enumerate(row):
            if not _is_number(v):
                return f"'scores' of head ({layer}, {head}) is {_cut(v)}, not a finite number"
    return None


def niah_record_problem(rec: Any) -> str | None:
    """What is wrong with one record of a NIAH log (``niah.jsonl``), or ``None``."""
    if not isinstance(rec, dict):
        return "not a JSON object"
    for name, ok, what in (("key", lambda v: isinstance(v, str) and v, "a non-empty string"),
                           ("mask", lambda v: isinstance(v, str) and v, "a non-empty string"),
                           ("response", lambda v: isinstance(v, str), "a string"),
                           ("rouge_recall", _is_number, "a finite number"),
                           ("score", _is_number, "a finite number"),
                           ("answer_class", lambda v: isinstance(v, str) and v, "a non-empty string")):
        if name not in rec:
            return f"field {name!r} is missing"
        if not ok(rec[name]):
            return f"field {name!r} must be {what}, got {_cut(rec[name])}"
    return None


def _fields(rec: Any, spec) -> str | None:
    """The first field of ``spec`` (``(name, ok, what)``) missing from ``rec`` or wrong."""
    if not isinstance(rec, dict):
        return "not a JSON object"
    for name, ok, what in spec:
        if name not in rec:
            return f"field {name!r} is missing"
        if not ok(rec[name]):
            return f"field {name!r} must be {what}, got {_cut(rec[name])}"
    return None


def _text(v: Any) -> bool:
    return isinstance(v, str) and bool(v)


def _whole(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _grid_problem(name: str, rows: Any, grid: Sequence[int] | None, *,
                  allow_null: bool = False) -> str | None:
    """What is wrong with ``rows`` as a ``[layer][head]`` list of finite numbers (``null``
    too with ``allow_null``), ``grid`` = (layers, heads) when known."""
    if not isinstance(rows, list) or not rows:
        return f"field {name!r} must be a [layer][head] list, got {_cut(rows)}"
    n_layers = len(rows) if grid is None else int(grid[0])
    if len(rows) != n_layers:
        return f"{name!r} has {len(rows)} layers, the model {n_layers}"
    width = int(grid[1]) if grid is not None else (len(rows[0]) if isinstance(rows[0], list) else 0)
    for layer, row in enumerate(rows):
        if not isinstance(row, list):
            return f"{name!r} row {layer} is {_cut(row)}, not a list of per-head values"
        if len(row) != width or not width:
            return f"{name!r} row {layer} has {len(row)} heads, expected {width or 'at least 1'}"
        for head, v in enumerate(row):
            if not (_is_number(v) or (allow_null and v is None)):
                return (f"{name!r} of head ({layer}, {head}) is {_cut(v)}, not a finite number"
                        + (" or null" if allow_null else ""))
    return None


def cot_record_problem(rec: Any) -> str | None:
    """What is wrong with one record of a CoT log (``cot_<task>.jsonl``), or ``None``."""
    return _fields(rec, (
        ("key", _text, "a non-empty string"),
        ("mask", _text, "a non-empty string"),
        ("group", _text, "a non-empty string"),
        ("mode", lambda v: v in ("cot", "direct"), "'cot' or 'direct'"),
        ("id", lambda v: _text(v) or _whole(v), "an item id (a string or a whole number)"),
        ("output", lambda v: isinstance(v, str), "a string"),
        ("correct", lambda v: isinstance(v, bool), "true or false")))


def patching_record_problem(rec: Any, grid: Sequence[int] | None = None) -> str | None:
    """What is wrong with one record of a patching log (``patching.jsonl``), or ``None``;
    ``grid``: (layers, heads patched per layer: KV heads for ``k``/``v``)."""
    wrong = _fields(rec, (
        ("key", _text, "a non-empty string"),
        ("index", lambda v: _whole(v) and v >= 0, "a whole number >= 0"),
        ("clean", lambda v: v is None or _is_number(v), "a finite number or null"),
        ("corrupted", lambda v: v is None or _is_number(v), "a finite number or null"),
        ("seconds", lambda v: _is_number(v) and v >= 0, "a finite number >= 0"),
        ("pair", lambda v: isinstance(v, dict), "a JSON object"),
        ("patched", lambda v: isinstance(v, list), "a [layer][head] list")))
    return wrong or _grid_problem("patched", rec["patched"], grid, allow_null=True)


def families_record_problem(rec: Any, grid: Sequence[int] | None = None,
                            families: Sequence[str] = ()) -> str | None:
    """What is wrong with one record of a score-families log (``families.jsonl``), or
    ``None``: each of ``families`` is a ``[layer][head]`` grid of finite numbers."""
    wrong = _fields(rec, (
        ("key", _text, "a non-empty string"),
        ("success", lambda v: isinstance(v, bool), "true or false"),
        ("rouge_recall", _is_number, "a finite number"),
        ("response", lambda v: isinstance(v, str), "a string")))
    if wrong:
        return wrong
    for family in families:
        if family not in rec:
            return f"field {family!r} is missing"
        wrong = _grid_problem(family, rec[family], grid)
        if wrong:
            return wrong
    return None


def _cut(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_resumed(records: Any, problem, log: str | os.PathLike, what: str = "record") -> None:
    """The records a resumed log holds (``{key: record}``, as a sweep reads them), each checked
    as a whole before any compute: the first malformed one is named by its key and what is
    wrong. The library's side of :func:`check_log_records` (which names the line)."""
    for key, rec in dict(records).items():
        wrong = problem(rec)
        if wrong:
            raise ConfigError(f"{log}: the {what} {key!r} is malformed ({wrong}); the run cannot be "
                              "resumed: delete its line or choose another output directory")


def check_log_records(path: str | os.PathLike, problem, what: str = "record") -> int:
    """Check every record of the JSONL log ``path`` as a whole before it is used: the first
    malformed one is named with its line and what is wrong (a last line cut by a crash is
    skipped, as the log's reader skips it). Returns the number of records."""
    import json

    path = input_file(path, "log")
    lines = path.read_bytes().split(b"\n")
    while lines and not lines[-1].strip():
        lines.pop()
    count = 0
    for i, line in enumerate(lines, start=1):
        try:
            rec = json.loads(line.decode("utf-8"))
        except ValueError as exc:
            if i == len(lines):
                continue  # a torn tail: the run resumes from the record before it
            raise ConfigError(f"{path}, line {i} is damaged ({exc}); the run cannot be resumed: "
                              "delete that line or choose another output directory") from None
        wrong = problem(rec)
        if wrong:
            raise ConfigError(f"{path}, line {i}: {what} is malformed ({wrong}); the run cannot "
                              "be resumed: delete that line or choose another output directory")
        count += 1
    return count
