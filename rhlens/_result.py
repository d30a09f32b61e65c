"""Shared plumbing for result types: saving tensors + JSON metadata atomically."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from rhlens.results import atomic_write_text

__all__ = ["atomic_write_text", "config_from_dict", "load_bundle", "save_bundle"]


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
