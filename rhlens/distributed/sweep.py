"""The sweep every analysis runs its items through: records, shard logs, the queue, the merge."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rhlens.distributed.group import Group, current_group, on_main
from rhlens.distributed.plan import Shard, Unit, plan_units, schedule
from rhlens.errors import ConfigError
from rhlens.store.identity import RunHeader
from rhlens.store.logs import (
    ProbeLog,
    Records,
    ShardLog,
    header_path,
    holds_output,
    lock_output,
    merge_logs,
    open_header,
    read_done,
    read_run_json,
    shard_dir,
    shard_files,
    unlock_output,
    write_json,
)

__all__ = ["Sweep", "merge_shards", "shard_log_names"]


@contextlib.contextmanager
def _briefly_locked(out: Path) -> Iterator[Path]:
    """``out`` locked for the duration (released after, unless this process held it before)."""
    held = holds_output(out)
    path = lock_output(out)
    try:
        yield path
    finally:
        if not held:
            unlock_output(out)


def merge_shards(out: str | Path) -> dict[str, int]:
    """Fold every shard log under ``out/shards/`` into ``out``'s logs (the shards of a
    torchrun launch that died, or of :func:`shard` processes); returns the number of records
    of each merged log. A shard another process still writes is merged as far as it goes
    and kept."""
    out = Path(out)
    if not out.is_dir():
        raise ConfigError(f"{out} is not a run directory")
    with _briefly_locked(out):
        return {name: len(merge_logs(out, name)) for name in shard_log_names(out)}


def shard_log_names(out: str | Path) -> list[str]:
    """The logs that have shards under ``out``."""
    return sorted({p.name for p in shard_files(out, "*.jsonl")})



@dataclass
class _Stats:
    rank: int
    host: str = field(default_factory=socket.gethostname)
    device: str | None = None
    items: int = 0
    tokens: float = 0.0
    busy_s: float = 0.0
    units: int = 0
    prefill_tokens: int = 0  # prompt tokens the engine prefilled (computed)
    reused_tokens: int = 0  # prompt tokens whose KV it copied from the previous prompt instead
    decode_tokens: int = 0  # tokens generated (decode steps of each prompt)


_TOTALS = ("items", "tokens", "busy_s", "units", "prefill_tokens", "reused_tokens", "decode_tokens")


def _launch_entry(launch: str, world: int, stats: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """A launch's line in a log's header: each rank's stats, and their sums (``total``)."""
    def rounded(v):
        return round(v, 3) if isinstance(v, float) else v

    return {"launch": launch, "world": world,
            "ranks": [{k: rounded(v) for k, v in s.items()} for s in stats],
            "total": {k: rounded(sum(s.get(k, 0) for s in stats)) for k in _TOTALS}}


class Sweep:
    """An analysis' finished records, where new ones go, which units this process runs, and
    the progress bar; the one mechanism every sweep (detect, niah, cot, patch, score families,
    the KV budget sweep) shares.

    ``out=None``: nothing is written (inside a launch the records are gathered at
    :meth:`finish`). In one process it is the folder's :class:`~rhlens.io.ProbeLog` and
    :class:`~rhlens.io.Records`, as before; in a launch, see the module's description::

        sweep = Sweep(out, header, "probes.jsonl", total=..., desc=..., weights=...)
        todo = [item for item in work if key(item) not in sweep.done]
        for unit in sweep.run([key(i) for i in todo], costs, links):
            for i in unit: sweep.add(record_of(todo[i]))
        records = sweep.finish()  # every record, every rank's
    """

    def __init__(self, out: str | Path | None, header: RunHeader | Mapping[str, Any] | None,
                 name: str = "probes.jsonl", *, total: int, desc: str, unit: str = "answer",
                 weights: Mapping[str, int | float] | None = None, progress: bool = False,
                 shard: Shard | None = None, device: Any = None, group: Any = "auto") -> None:
        self.out = Path(out) if out is not None else None
        self.name = name
        self.shard = shard
        self.group: Group | None = None if shard is not None else (
            current_group() if group == "auto" else group)
        self.weights = dict(weights) if weights is not None else None
        self.stats = _Stats(rank=self.group.rank if self.group else (shard.rank if shard else 0),
                            device=None if device is None else str(device))
        self.order: list[str] = []
        self.new: dict[str, dict[str, Any]] = {}
        self.log: Any = None
        self._runs = 0
        self._t0 = time.perf_counter()
        self._seq = 0
        if self.group is not None:
            self.group.sweeps += 1
            self._seq = self.group.sweeps
        done: dict[str, dict[str, Any]] = {}
        if self.out is not None:
            if shard is not None:
                done = self._open_shard(header)
            elif self.group is None:
                lock_output(self.out)
                merge_logs(self.out, name)  # shards of a launch that died
                self.log = ProbeLog(self.out, header, name)
                done = read_done(self.out, name)
            else:
                def open_run() -> list[str]:
                    lock_output(self.out)
                    merge_logs(self.out, name)
                    open_header(self.out, header, name)
                    return list(read_done(self.out, name))

                # Every rank plans from rank 0's view of what is done (a notebook's shard may
                # still be growing while the ranks read it).
                keys = set(on_main(self.group, open_run, share=True))
                done = {k: r for k, r in read_done(self.out, name).items() if k in keys}
                self.log = ShardLog(shard_dir(self.out, self.group.launch, self.group.rank) / name)
        self.done = done
        local = self.group is None or not self._shared
        show = progress and (self.group is None or self.group.main)
        self.sink = Records(self.log if isinstance(self.log, ProbeLog) else None,
                            progress=show and local, total=total, desc=desc, unit=unit,
                            weights=weights, done=done)
        self._bar = None
        if show and not local:
            self._bar = _SharedBar(self, total=total, desc=desc, unit=unit)

    @property
    def world(self) -> int:
        """How many processes share this sweep's units (1 in a plain process or a
        :class:`~rhlens.distributed.Shard`, which runs every unit it is given)."""
        return self.group.world if self.group is not None else 1

    @property
    def _shared(self) -> bool:
        return self.group is not None and self.group.store is not None

    def _open_shard(self, header) -> dict[str, dict[str, Any]]:
        with _briefly_locked(self.out):
            open_header(self.out, header, self.name)
        folder = shard_dir(self.out, self.shard.launch, self.shard.rank)
        lock_output(folder)  # two processes must not write one shard
        self.log = ShardLog(folder / self.name)
        return read_done(self.out, self.name)

    # -- the work
    def run(self, keys: Sequence[str], costs: Sequence[int | float],
            links: Sequence[bool], *, records: Sequence[str] | None = None) -> Iterator[list[int]]:
        """The units this process runs, as lists of indices into ``keys`` (the items still to
        do, in the order a one-process run answers them). In one process: all of them, in
        that order; in a launch: taken from the queue, longest first, until none is left.
        Every rank calls ``run`` with the same arguments, as often as the others.
        ``records``: the keys of the records the items make, in the order a one-process run
        writes them, where an item makes several (default: ``keys``); the merged log keeps it."""
        self.order += list(keys if records is None else records)
        units = plan_units(costs, links)
        self._runs += 1
        for unit in self._claim(units):
            t0 = time.perf_counter()
            yield list(unit.items)
            self.stats.busy_s += time.perf_counter() - t0
            self.stats.units += 1

    def _claim(self, units: list[Unit]) -> Iterator[Unit]:
        group = self.group
        if group is None:
            yield from units
            return
        order = sorted(range(len(units)), key=lambda i: (-units[i].cost, i))
        if group.store is None:  # no store to share a queue: the static plan
            for u in schedule(units, group.world)[group.rank]:
                yield units[u]
            return
        key = f"rhlens/{group.launch}/{self._seq}/{self._runs}/next"
        while True:
            claimed = int(group.store.add(key, 1)) - 1
            if claimed >= len(order):
                return
            yield units[order[claimed]]

    def add(self, record: dict[str, Any], postfix=None, *, generation: Any = None) -> None:
        """Keep a finished record (and log it). ``generation``: the engine's
        :class:`~rhlens.engine.Generation` the record came from, whose prefill (tokens
        computed, tokens reused) and decode steps this rank's stats count."""
        key = record["key"]
        if generation is not None:
            self.stats.reused_tokens += int(generation.reused_prefix)
            self.stats.prefill_tokens += int(generation.info.get(
                "prefill_tokens", len(generation.prompt_ids) - 1 - generation.reused_prefix))
            self.stats.decode_tokens += int(generation.n_steps)
        if self.log is not None and not isinstance(self.log, ProbeLog):
            self.log.append(record)
        self.sink.add(record, postfix=postfix if self.sink.bar else None)
        self.new[key] = record
        weight = self.weights.get(key, 0) if self.weights is not None else 0
        self.stats.items += 1
        self.stats.tokens += weight
        if self._shared:
            self.group.store.add(self._counter("items"), 1)
            self.group.store.add(self._counter("weight"), int(weight))

    def advance(self, amount: int | float, **kwargs) -> None:
        """Move this process' bar by ``amount`` of the running unit's cost (e.g. one decode
        step's share of its probes' prompt tokens), before its records arrive
        (``kwargs``: :meth:`~rhlens.store.logs.Records.advance`'s)."""
        self.sink.advance(amount, **kwargs)

    def _counter(self, what: str) -> str:
        return f"rhlens/{self.group.launch}/{self._seq}/{what}"

    # -- the end
    def finish(self) -> dict[str, dict[str, Any]]:
        """Every record of the sweep (earlier sessions', every rank's), by key.

        In a launch every rank waits here for the others; rank 0 then merges the shard logs
        into the run's log and records each rank's timings in its header."""
        self.sink.close()
        group = self.group
        if self.shard is not None:
            unlock_output(shard_dir(self.out, self.shard.launch, self.shard.rank))
        if group is None:
            if self.out is not None and self.shard is None and self.stats.items:
                # one process: its work in the header too, as a launch of one
                path = header_path(self.out, self.name)
                doc = read_run_json(path)
                doc.setdefault("launches", []).append(_launch_entry(
                    f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}", 1,
                    [self.stats.__dict__ | {"wall_s": time.perf_counter() - self._t0}]))
                write_json(path, doc)
            return {**self.done, **self.new}
        stats = group.gather(self.stats.__dict__ | {"wall_s": time.perf_counter() - self._t0})
        if self._bar is not None:  # every rank has counted its last item
            self._bar.close()
        if self.out is None:
            records = dict(self.done)
            for part in group.gather(self.new):
                records.update(part)
            return records

        def merge() -> None:
            merge_logs(self.out, self.name, self.order)
            path = header_path(self.out, self.name)
            doc = read_run_json(path)
            doc.setdefault("launches", []).append(_launch_entry(group.launch, group.world, stats))
            write_json(path, doc)

        on_main(group, merge)
        return read_done(self.out, self.name)


class _SharedBar:
    """Rank 0's bar over every rank's items: a thread reads the store's counters."""

    def __init__(self, sweep: Sweep, *, total: int, desc: str, unit: str) -> None:
        self.sweep = sweep
        self.records = Records(None, progress=True, total=total, desc=desc, unit=unit,
                               weights=sweep.weights, done=sweep.done)
        self.seen = (0, 0)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        store = self.sweep.group.store
        items = int(store.add(self.sweep._counter("items"), 0))
        weight = int(store.add(self.sweep._counter("weight"), 0))
        self.records.tick(items - self.seen[0], weight - self.seen[1])
        self.seen = (items, weight)

    def _poll(self) -> None:
        while not self.stop.wait(0.5):
            with contextlib.suppress(Exception):  # the bar must never take the run down
                self._read()

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        with contextlib.suppress(Exception):
            self._read()
        self.records.close()


