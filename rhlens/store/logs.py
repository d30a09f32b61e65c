"""Run directories: a lock per folder, append-only logs that survive a crash, and progress.

* :func:`prepare_output` checks that a folder can be written (not a file, not read-only)
  and :func:`lock_output` takes it for this process, so a second process on the same folder
  is refused at once instead of computing everything twice.
* :class:`ProbeLog` is a run's log: ``run.json`` holds its identity
  (:mod:`rhlens.identity`), and reopening the folder with any difference is refused.
* :class:`Records` keeps a sweep's finished records and shows a progress bar whose ETA is
  weighted by each item's cost (its prompt tokens), so it means something.
* :class:`ShardLog` is one process's part of a run's log (``shards/<launch>/r<rank>/<log>``,
  written by the ranks of a ``torchrun`` launch or a notebook's shard); :func:`read_done`
  reads a log with every shard of it, and :func:`merge_logs` folds the shards into the log.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rhlens.errors import ConfigError
from rhlens.store.eta import Eta
from rhlens.store.files import atomic_write_text, json_normal, read_jsonl, write_json
from rhlens.store.identity import RunHeader, diff_identity, merge_identity
from rhlens.store.layout import LOCK_FILE, PROBES_LOG, SHARDS, run_json_of
from rhlens.validate import check_output_dir, own_file

__all__ = ["ProbeLog", "Records", "ShardLog", "check_resume", "header_path", "holds_output", "lock_output",
           "merge_logs", "open_header", "prepare_output", "read_done", "read_jsonl", "read_run_json",
           "shard_dir", "shard_files", "unlock_output", "write_json"]



# ---- the output folder ---------------------------------------------------------------------
def prepare_output(out: str | Path) -> Path:
    """Create ``out`` if needed and check that files can be written in it (one-line errors)."""
    out = check_output_dir(out)  # not empty, not a file, not a link to nothing
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".rhlens-write-test.")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(f"cannot write in the output directory {out}: "
                          f"{exc.strerror or exc}") from None
    return out


_HELD: dict[str, int] = {}


def lock_output(out: str | Path) -> Path:
    """Take ``out`` for this process until it exits (or :func:`unlock_output`).

    A second process asking for the same folder gets a ConfigError naming the holder's pid;
    this process asking again is a no-op. Without ``fcntl`` (Windows) nothing is locked.
    """
    out = prepare_output(out)
    key = str(out.resolve())
    if key in _HELD:
        return out
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on POSIX
        return out
    fd = _open_lock(out / LOCK_FILE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise ConfigError(f"{out} is in use by another rhlens process (pid {holder}); wait "
                          "for it to finish or choose another output directory") from None
    # Held, and checked to be rhlens' own lock file: only now is it rewritten.
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _HELD[key] = fd
    return out


def _open_lock(path: Path) -> int:
    """The lock file's descriptor, opened without following a symbolic link and refused
    unless it is rhlens' own: a regular file with one name, holding at most a pid. A link,
    a special file, a hard link or a file with other content is someone else's file, which
    rhlens must never truncate: the command is refused and the file is left untouched."""
    import stat

    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) \
        | getattr(os, "O_CLOEXEC", 0)
    refuse = (f"{path} is not rhlens' lock file ({{}}); rhlens leaves it untouched: remove it "
              "if it is yours to remove, or choose another output directory")
    if os.path.islink(path):
        raise ConfigError(refuse.format(f"a symbolic link to {os.readlink(path)!r}"))
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as exc:
        if os.path.islink(path):  # made between the check and the open (O_NOFOLLOW refused it)
            raise ConfigError(refuse.format("a symbolic link")) from None
        raise ConfigError(f"cannot open the lock file {path}: {exc.strerror or exc}") from None
    st = os.fstat(fd)
    content = os.pread(fd, 64, 0) if stat.S_ISREG(st.st_mode) else b""
    why = ("not a regular file" if not stat.S_ISREG(st.st_mode) else
           f"a hard link: it has {st.st_nlink} names" if st.st_nlink > 1 else
           "it holds something other than a pid" if st.st_size > 32 or
           (content.strip() and not content.strip().isdigit()) else "")
    if why:
        os.close(fd)
        raise ConfigError(refuse.format(why))
    if hasattr(os, "O_NONBLOCK"):
        os.set_blocking(fd, True)
    return fd


def holds_output(out: str | Path) -> bool:
    """Whether this process holds ``out`` (:func:`lock_output`)."""
    return str(Path(out).resolve()) in _HELD


def unlock_output(out: str | Path) -> None:
    """Release a folder :func:`lock_output` took (nothing if this process does not hold it)."""
    fd = _HELD.pop(str(Path(out).resolve()), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the lock


def read_run_json(path: str | Path) -> dict[str, Any]:
    """A run's header file, or a ConfigError saying it is damaged."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
    except (ValueError, OSError) as exc:
        raise ConfigError(f"{path} is damaged ({exc}); the run in {path.parent} cannot be "
                          "resumed safely: choose another output directory") from None
    return data


# ---- the log -------------------------------------------------------------------------------
def header_path(out: str | Path, name: str = PROBES_LOG) -> Path:
    """The header file of the log ``name`` in ``out``: ``run.json`` for ``probes.jsonl``,
    ``<stem>.run.json`` beside any other log."""
    out = Path(out)
    return out / run_json_of(name)


_header_path = header_path  # the older private name


def check_resume(out: str | Path, header: RunHeader, name: str = PROBES_LOG, *,
                 only: tuple[str, ...] | None = None,
                 ignore: tuple[str, ...] = ()) -> dict[str, Any] | None:
    """The header of the run already in ``out`` (``None`` if there is none), once checked.

    Raises ConfigError, naming the differences, when that run's identity differs from
    ``header``'s (only the parts in ``only``, when given: a check made before everything
    is known), when its header or log is damaged, or when it was written by an rhlens that
    did not record a full identity.
    """
    out = Path(out)
    head_path = _header_path(out, name)
    if not head_path.exists():
        if (out / name).exists() and (out / name).stat().st_size:
            raise ConfigError(f"{out / name} holds records but {head_path.name} is missing, so "
                              "what made them is unknown; choose another output directory")
        return None
    old = read_run_json(head_path)
    if "identity" not in old:
        raise ConfigError(
            f"{out} holds a run started by an earlier rhlens, whose {head_path.name} does not "
            "record everything that shapes results (weights, haystack, needles); it cannot be "
            "resumed safely: choose another output directory")
    new = header.to_dict()["identity"]
    differences = diff_identity(old["identity"], new, only=only, ignore=ignore)
    if differences:
        raise ConfigError(f"{out} holds a run with other settings ({'; '.join(differences)}); "
                          "resume with the same settings or choose another output directory")
    if (out / name).exists():
        read_jsonl(out / name, strict=True)
    return old


def open_header(out: str | Path, header: RunHeader | Mapping[str, Any],
                name: str = PROBES_LOG) -> dict[str, Any]:
    """Check ``header`` against the run in ``out`` (:func:`check_resume`) and write it (a new
    run) or what it adds (probes added to the grid, how this session ran); returns the header
    file's content. The caller holds the folder (:func:`lock_output`)."""
    out = Path(out)
    if not isinstance(header, RunHeader):
        header = RunHeader(json_normal(dict(header)))
    doc = header.to_dict()
    head_path = header_path(out, name)
    old = check_resume(out, header, name)
    if old is None:
        write_json(head_path, doc)
        return doc
    updated = json.loads(json.dumps(old))
    # Probes added to the grid join the identity, so later resumes check them too.
    updated["identity"] = merge_identity(old["identity"], doc["identity"])
    if old.get("recorded") != doc["recorded"] and doc["recorded"] not in old.get("resumes", []):
        updated.setdefault("resumes", []).append(doc["recorded"])  # how later sessions ran
    if updated != old:
        write_json(head_path, updated)
    return updated


def _records_by_key(path: Path) -> dict[str, dict[str, Any]]:
    done: dict[str, dict[str, Any]] = {}
    for rec in read_jsonl(path, strict=True):
        if "key" not in rec:
            raise ConfigError(f"{path} holds a record without a key; the run cannot "
                              "be resumed: choose another output directory")
        done[rec["key"]] = rec
    return done


def _rewrite(path: Path, records) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def _append(path: Path, record: dict[str, Any]) -> None:
    # Never through a symbolic link: a log is appended to only where it is a file of its own.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0),
                     0o666)
    except OSError as exc:
        own_file(path, "log")  # a link: say so in one line
        raise exc
    try:
        with os.fdopen(fd, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        if exc.filename:
            raise
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc  # a full disk


class ShardLog:
    """One process's part of a run's log: append-only JSONL of finished work items, keyed by
    ``record["key"]``, with no header of its own (the run's header is the folder's) and no
    lock (the launch holds it). Each record is flushed and fsynced as it is written; reopening
    it drops a tail cut by a crash."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.done: dict[str, dict[str, Any]] = {}
        own_file(self.path, "log")  # a link or a FIFO in its place is refused, never followed
        if self.path.exists():
            self.done = _records_by_key(self.path)
            # Rewrite without a torn tail so that appends start on a fresh line.
            _rewrite(self.path, self.done.values())

    def append(self, record: dict[str, Any]) -> None:
        _append(self.path, record)
        self.done[record["key"]] = record


class ProbeLog(ShardLog):
    """A run's log in its own folder: a :class:`ShardLog` with the run's header and a lock.

    ``run.json`` (``<name>.run.json`` beside other logs) holds the run's header: its identity
    and what was recorded alongside. Reopening the directory with another identity is
    refused, naming the differences, since mixing them would silently blend two
    experiments. A killed run loses at most the item in flight. The folder is locked for
    this process.

    ``header``: a :class:`~rhlens.identity.RunHeader` (see :func:`rhlens.identity.run_header`),
    or a plain dict taken as the identity.
    """

    def __init__(self, out: str | Path, header: RunHeader | Mapping[str, Any],
                 name: str = PROBES_LOG) -> None:
        out = lock_output(out)
        open_header(out, header, name)
        super().__init__(out / name)


# ---- shard logs ------------------------------------------------------------------------------
def shard_dir(out: str | Path, launch: str, rank: int) -> Path:
    """``out/shards/<launch>/r<rank>``: where one process of a sharded run writes its logs."""
    return Path(out) / SHARDS / str(launch) / f"r{int(rank)}"


def shard_files(out: str | Path, name: str) -> list[Path]:
    """Every shard of the log ``name`` under ``out`` (any launch, any rank), in a fixed order."""
    return sorted((Path(out) / SHARDS).glob(f"*/r*/{name}"))


def read_done(out: str | Path, name: str = PROBES_LOG) -> dict[str, dict[str, Any]]:
    """Every finished record of the log ``name`` in ``out``: the log's, then its shards' (a key
    found twice is one record: the first found)."""
    out = Path(out)
    done: dict[str, dict[str, Any]] = {}
    for path in [out / name, *shard_files(out, name)]:
        if path.exists():
            for key, rec in _records_by_key(path).items():
                done.setdefault(key, rec)
    return done


def merge_logs(out: str | Path, name: str = PROBES_LOG,
               order: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
    """Fold every shard of the log ``name`` into ``out/name``; returns all its records.

    The log keeps its records in their order, and the shards' new records follow: first those
    named in ``order`` (the order a one-process run writes them), then the rest. Merged shard
    files are deleted (empty shard folders too), except those of a folder another process
    holds (a notebook shard still running): their records are merged, their files kept. The
    caller holds ``out`` (:func:`lock_output`). Safe to repeat after a crash at any point.
    """
    out = Path(out)
    log = out / name
    merged = _records_by_key(log) if log.exists() else {}
    files = shard_files(out, name)
    if not files:
        return merged
    fresh: dict[str, dict[str, Any]] = {}
    for path in files:
        for key, rec in _records_by_key(path).items():
            if key not in merged:
                fresh.setdefault(key, rec)
    if fresh:
        ordered = [k for k in dict.fromkeys(order) if k in fresh]
        seen = set(ordered)
        ordered += [k for k in fresh if k not in seen]
        merged.update((k, fresh[k]) for k in ordered)
        _rewrite(log, merged.values())
    for path in files:
        _drop_shard(path)
    _prune_shards(out)
    return merged


def _drop_shard(path: Path) -> None:
    """Delete a merged shard file, unless another process holds its folder (a notebook shard
    still running)."""
    try:
        lock_output(path.parent)
    except ConfigError:
        return  # a shard still being written: its records are merged, the file stays
    try:
        path.unlink(missing_ok=True)
    finally:
        unlock_output(path.parent)


def _prune_shards(out: Path) -> None:
    """Remove the shard folders left empty (a rank that had nothing to do has one too)."""
    root = out / SHARDS
    for folder in sorted(root.glob("*/r*")):
        if [p for p in folder.iterdir() if p.name != LOCK_FILE]:
            continue
        try:
            lock_output(folder)
        except ConfigError:
            continue  # held by a process that has not written yet
        try:
            (folder / LOCK_FILE).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                folder.rmdir()
        finally:
            unlock_output(folder)
    for folder in [*sorted(root.glob("*")), root]:
        with contextlib.suppress(OSError):
            folder.rmdir()  # only when empty


def _clock(clock: Callable[[], float] | None) -> dict[str, Any]:
    return {} if clock is None else {"clock": clock}


def _eta_bar(eta: Eta, **kwargs):
    """A tqdm bar (a notebook's in Jupyter) whose remaining time is ``eta``'s."""
    from tqdm.auto import tqdm

    class EtaBar(tqdm):
        @property
        def format_dict(self):
            d = super().format_dict
            left = d.get("total") and d["total"] - d["n"]
            if left and left > 0:  # tqdm shows (total - n) / rate as the remaining time
                seconds = eta.remaining()
                d["rate"] = 0 if seconds is None else left / max(seconds, 1e-9)  # 0: "?"
            return d

    return EtaBar(**kwargs, smoothing=0)


class Records:
    """A sweep's finished records: kept by key, appended to the run's log when there is one,
    counted on a progress bar when asked. ``done`` starts with what a resumed log holds.

    ``weights`` (key -> cost, e.g. the item's prompt tokens) makes the bar advance by each
    item's cost instead of by one, so its rate and ETA follow the work actually left: probes
    of a grid differ in length by 10x or more, and the short ones come first. The bar's ETA
    is :class:`rhlens.store.eta.Eta`'s: prefill and decode timed apart, shown from the end of
    the first batch (``clock``: its seconds, for tests).
    """

    def __init__(self, log: ProbeLog | None, *, progress: bool, total: int, desc: str,
                 unit: str = "answer", initial: int | None = None,
                 weights: Mapping[str, int | float] | None = None,
                 done: Mapping[str, dict[str, Any]] | None = None,
                 clock: Callable[[], float] | None = None) -> None:
        self.log = log
        self.done: dict[str, dict[str, Any]] = dict(log.done) if log else {}
        self.done.update(done or {})  # records found elsewhere (shards of the run)
        self.weights = dict(weights) if weights is not None else None
        self.total, self.unit = total, unit
        self.elsewhere = 0  # items finished by other processes (see tick)
        self.ahead = 0.0  # advanced before its items finished (see advance)
        self.bar = None
        self.eta: Eta | None = None
        if progress:
            # The bar's ETA is rhlens.store.eta's (prefill and decode timed apart), not tqdm's
            # average rate; no rate is shown, since it would be the ETA's.
            if self.weights is None:
                first = len(self.done) if initial is None else initial
                self.eta = Eta(total - first, total - first, **_clock(clock))
                # whole items shown whole, though advance() moves the bar by parts of one
                self.bar = _eta_bar(self.eta, total=total, initial=first, desc=desc, unit=unit,
                                    bar_format="{l_bar}{bar}| {n:.0f}/{total_fmt} "
                                               "[{elapsed}<{remaining}{postfix}]")
            else:
                done = sum(self.weights.get(k, 0) for k in self.done)
                left = sum(1 for k in self.weights if k not in self.done)
                self.eta = Eta(sum(self.weights.values()) - done, left, **_clock(clock))
                self.bar = _eta_bar(self.eta, total=sum(self.weights.values()), initial=done,
                                    desc=desc, unit="tok", unit_scale=True,
                                    bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} "
                                               "[{elapsed}<{remaining}{postfix}]")
                self.bar.set_postfix_str(self._count(), refresh=False)

    def _count(self) -> str:
        return f"{len(self.done) + self.elsewhere}/{self.total} {self.unit}s"

    def add(self, record: dict[str, Any],
            postfix: Callable[[], dict[str, Any]] | None = None) -> None:
        """Keep ``record``; ``postfix()`` (shown on the bar) is called only when there is one."""
        self.done[record["key"]] = record
        if self.log:
            self.log.append(record)
        if self.bar:
            cost = 1 if self.weights is None else self.weights.get(record["key"], 0)
            self.eta.finish(cost)
            credit = min(self.ahead, cost)  # the part already shown by advance()
            self.ahead -= credit
            self.bar.update(cost - credit)
            extra = postfix() if postfix is not None else {}
            if self.weights is not None:
                self.bar.set_postfix_str(", ".join([self._count(), *(f"{k}={v}" for k, v in
                                                                     extra.items())]))
            elif extra:
                self.bar.set_postfix(**extra)

    def advance(self, amount: int | float, *, share: int | float | None = None,
                prefill: bool = False) -> None:
        """Move the bar by ``amount`` of the cost of items still running (a prefill chunk's
        tokens, a decode step's share), so it moves while a batch runs; finished items are
        then counted net of it. A decode step is timed for the ETA with ``share`` (its even
        share of the batch's cost; default ``amount``); ``prefill``: no step is timed."""
        share = amount if share is None else share
        if self.eta is not None and share > 0 and not prefill:
            self.eta.step(share)
        if self.bar and self.bar.total is not None:  # never past the end: the records finish it
            amount = min(amount, self.bar.total - self.bar.n)
        if self.bar and amount > 0:
            self.ahead += amount
            self.bar.update(amount)

    def tick(self, items: int, weight: float = 0) -> None:
        """Count ``items`` finished elsewhere (other ranks of a launch), of summed cost
        ``weight``, on the bar (their records are not kept here)."""
        self.elsewhere += items
        if self.eta is not None and (items or weight):
            self.eta.elsewhere(items, items if self.weights is None else weight)
        if self.bar and (items or weight):
            self.bar.update(items if self.weights is None else weight)
            if self.weights is not None:
                self.bar.set_postfix_str(self._count())

    def close(self) -> None:
        if self.bar:
            self.bar.close()
