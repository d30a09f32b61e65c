"""Shared plumbing for result types: saving tensors + JSON metadata atomically."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

__all__ = ["atomic_write_text", "config_from_dict", "load_bundle", "save_bundle"]


def atomic_write_text(path: str | Path, text: str) -> None:
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


def save_bundle(directory: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                kind: str) -> Path:
    """Save ``tensors`` as ``tensors.safetensors`` and ``meta`` as ``meta.json`` in ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / ".tensors.safetensors.tmp"
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, directory / "tensors.safetensors")
    atomic_write_text(directory / "meta.json", json.dumps({"kind": kind, **meta}, indent=1))
    return directory


def load_bundle(directory: str | Path, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    directory = Path(directory)
    meta_path = directory / "meta.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{directory} holds no saved rhlens result (no meta.json)")
    meta = json.loads(meta_path.read_text())
    if meta.get("kind") != kind:
        raise ValueError(f"{directory} holds a {meta.get('kind')!r} result, not {kind!r}")
    return load_file(str(directory / "tensors.safetensors")), meta


def config_from_dict(cls, data: dict[str, Any] | None):
    """Rebuild a frozen config dataclass from JSON, ignoring keys it no longer has."""
    if data is None:
        return cls()
    names = {f.name for f in dataclasses.fields(cls)}
    clean = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in names}
    return cls(**clean)
