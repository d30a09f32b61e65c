"""Run directories: append-only probe logs that survive a crash, and finished-run files."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rhlens.errors import ConfigError
from rhlens.results import atomic_write_text

__all__ = ["ProbeLog", "Records", "read_jsonl", "write_json"]


def write_json(path: str | Path, obj: Any) -> Path:
    path = Path(path)
    atomic_write_text(path, json.dumps(obj, indent=1, default=str))
    return path


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Records of a JSONL file; a last line cut by a crash is skipped."""
    out = []
    with Path(path).open(encoding="utf-8") as fh:
        for line in fh:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


class ProbeLog:
    """Append-only JSONL of finished work items, keyed by ``record["key"]``.

    ``run.json`` holds the settings of the run; reopening the directory with other settings
    is refused, since mixing them would silently blend two experiments. Each record is
    flushed and fsynced as it is written, so a killed run loses at most the item in flight.
    """

    def __init__(self, out: str | Path, header: dict[str, Any], name: str = "probes.jsonl") -> None:
        out = Path(out)
        self.path = out / name
        self.done: dict[str, dict[str, Any]] = {}
        out.mkdir(parents=True, exist_ok=True)
        head_path = out / name.replace(".jsonl", ".run.json") if name != "probes.jsonl" \
            else out / "run.json"
        header = json.loads(json.dumps(header, default=str))  # normalise tuples etc.
        if head_path.exists():
            old = json.loads(head_path.read_text())
            if old != header:
                raise ConfigError(
                    f"{out} holds a run with other settings ({_diff(old, header)}); resume with "
                    "the same settings or choose another output directory"
                )
        else:
            write_json(head_path, header)
        if self.path.exists():
            for rec in read_jsonl(self.path):
                self.done[rec["key"]] = rec
            # Rewrite without a torn tail so that appends start on a fresh line.
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.done.values()))

    def append(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.done[record["key"]] = record


class Records:
    """A sweep's finished records: kept by key, appended to the run's log when there is one,
    counted on a progress bar when asked. ``done`` starts with what a resumed log holds."""

    def __init__(self, log: ProbeLog | None, *, progress: bool, total: int, desc: str,
                 unit: str = "answer", initial: int | None = None) -> None:
        self.log = log
        self.done: dict[str, dict[str, Any]] = dict(log.done) if log else {}
        self.bar = None
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=len(self.done) if initial is None else initial,
                            desc=desc, unit=unit)

    def add(self, record: dict[str, Any],
            postfix: Callable[[], dict[str, Any]] | None = None) -> None:
        """Keep ``record``; ``postfix()`` (shown on the bar) is called only when there is one."""
        self.done[record["key"]] = record
        if self.log:
            self.log.append(record)
        if self.bar:
            self.bar.update(1)
            if postfix is not None:
                self.bar.set_postfix(**postfix())

    def close(self) -> None:
        if self.bar:
            self.bar.close()


def _diff(a: dict, b: dict) -> str:
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys[:4])
