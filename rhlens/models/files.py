"""Model files on disk and on the hub: rhlens' cache, content hashes, GGUF headers, hub checks.

What :mod:`rhlens.models` needs to know about a model's files before (and without) loading
them: the SHA-256 of a weights file (remembered per file version, so an unchanged file is
read once), whether a ``.gguf`` file is whole, and whether a hub id can be had at all
(in seconds, instead of a minute of retries without a network).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from rhlens.errors import ModelLoadError
from rhlens.models.packaged import PACKAGED_MODELS
from rhlens.store.files import atomic_write_text

__all__ = ["cache_dir", "file_sha256", "folder_weights_sha256", "hub_check", "is_offline",
           "read_gguf_header"]

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def cache_dir() -> Path:
    """``$RHLENS_CACHE``, else ``$XDG_CACHE_HOME/rhlens``, else ``~/.cache/rhlens``."""
    if os.environ.get("RHLENS_CACHE"):
        return Path(os.environ["RHLENS_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "rhlens"


# ---- content hashes ------------------------------------------------------------------------
def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, remembered per (inode, size, mtime, ctime) in the cache.

    A file replaced by another, even of the same name and size, changes its ctime, so the
    hash is computed again; an unchanged file is hashed once.
    """
    path = Path(path).resolve()
    st = path.stat()
    stamp = f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"
    memo_path = cache_dir() / "sha256.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    entry = memo.get(str(path))
    if isinstance(entry, dict) and entry.get("stamp") == stamp:
        return str(entry["sha256"])
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    digest = h.hexdigest()
    memo[str(path)] = {"stamp": stamp, "sha256": digest}
    with contextlib.suppress(OSError):  # a read-only cache only costs the hash again next time
        atomic_write_text(memo_path, json.dumps(memo, indent=0))
    return digest


def folder_weights_sha256(folder: Path) -> str | None:
    """One hash over a model folder's weight files (names and contents)."""
    marker = folder / "rhlens_source.json"
    if marker.exists():  # a folder rhlens made from a GGUF: the GGUF is the identity
        try:
            return str(json.loads(marker.read_text())["gguf_sha256"])
        except (OSError, ValueError, KeyError):
            pass
    files = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix in _WEIGHT_SUFFIXES)
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        # A hub cache snapshot links to blobs named by their SHA-256: no need to read them.
        blob = Path(os.path.realpath(f)).name if f.is_symlink() else ""
        digest = (blob if len(blob) == 64 and all(c in "0123456789abcdef" for c in blob)
            else file_sha256(f))
        h.update(f"{f.name}:{digest}\n".encode())
    return h.hexdigest()


# ---- GGUF files ----------------------------------------------------------------------------
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                 10: "<Q", 11: "<q", 12: "<d"}


def read_gguf_header(path: str | Path) -> dict[str, Any]:
    """The scalar metadata of a GGUF file, after checking that the file is whole.

    Parses the header (magic, key/value pairs, tensor table) and checks that every tensor's
    bytes lie inside the file, so a text file named ``.gguf`` or a truncated download is
    refused with one line instead of failing deep inside the loader.
    """
    import struct

    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as fh:
        data = fh.read()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        n = struct.calcsize(fmt)
        if pos + n > len(data):
            raise EOFError
        (value,) = struct.unpack_from(fmt, data, pos)
        pos += n
        return value

    def text() -> str:
        nonlocal pos
        n = take("<Q")
        if pos + n > len(data):
            raise EOFError
        s = data[pos:pos + n].decode("utf-8", errors="replace")
        pos += n
        return s

    def value(kind: int):
        if kind in _GGUF_SCALARS:
            return take(_GGUF_SCALARS[kind])
        if kind == 8:
            return text()
        if kind == 9:
            item, count = take("<I"), take("<Q")
            for _ in range(count):
                value(item)
            return None  # arrays (the vocabulary) are skipped, not kept
        raise ValueError(f"unknown value type {kind}")

    try:
        if data[:4] != b"GGUF":
            raise ValueError("it does not start with the GGUF magic bytes")
        pos = 4
        version = take("<I")
        if version < 2:
            raise ValueError(f"GGUF version {version} is too old")
        n_tensors, n_kv = take("<Q"), take("<Q")
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = text()
            meta[key] = value(take("<I"))
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        end = 0
        for _ in range(n_tensors):
            text()
            dims = [take("<Q") for _ in range(take("<I"))]
            kind, offset = take("<I"), take("<Q")
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
            count = 1
            for d in dims:
                count *= d
            end = max(end, offset + count // block * type_size)
        align = int(meta.get("general.alignment", 32))
        start = -(-pos // align) * align
    except EOFError:
        raise ModelLoadError(f"{path} is not a complete GGUF file: it ends inside its header "
                             "(a truncated download?); download it again") from None
    except (ValueError, KeyError) as exc:
        raise ModelLoadError(f"{path} is not a GGUF model file: {exc}") from None
    if start + end > size:
        raise ModelLoadError(
            f"{path} is truncated: its tensors need {start + end:,} bytes, the file has "
            f"{size:,} (an interrupted download?); download it again")
    return meta


def is_offline(offline: bool | None) -> bool:
    if offline is not None:
        return offline
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_check(name: str, offline: bool) -> None:
    """Fail in seconds, not after a minute of retries, for a hub id that cannot be had."""
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(name, "config.json")
    except ValueError as exc:  # not a valid repo id at all
        raise ModelLoadError(unknown_model(name, f"{name!r} is not a valid hub id ({exc})")) from None
    if isinstance(cached, str):
        return
    if offline:
        raise ModelLoadError(unknown_model(name, "offline mode (--offline or HF_HUB_OFFLINE=1) only "
                                            "uses models already in the local Hugging Face cache"))
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        get_hf_file_metadata(hf_hub_url(name, "config.json"), timeout=10)
    except GatedRepoError as exc:
        raise ModelLoadError(f"{name} is gated on the Hugging Face hub: accept its licence and "
                             f"log in (`hf auth login`) first ({first_line(exc)})") from None
    except RepositoryNotFoundError:
        raise ModelLoadError(unknown_model(name, "the Hugging Face hub has no such model (or it is "
                                            "private: log in with `hf auth login`)")) from None
    except Exception as exc:
        raise ModelLoadError(unknown_model(
            name, f"the Hugging Face hub cannot be reached ({first_line(exc)}); check the "
                  "network, or pass --offline to use only models in the local cache")) from None


def unknown_model(name: str, why: str) -> str:
    return (f"cannot load {name!r}: it is neither one of rhlens' packaged models "
            f"({', '.join(sorted(PACKAGED_MODELS))}) nor an existing local folder or .gguf file, "
            f"and {why}")


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
