"""The per-head scores Wu et al. (2024) released: fetch them once, load them as scores.

The authors' repository (``nightdessert/Retrieval_Head``, folder ``head_score/``) holds one
JSON file per model, ``{"<layer>-<head>": [score on each successful probe]}``. With them,
the paper's properties (sparse, universal, intrinsic, dynamic) can be checked on the
authors' own numbers, for models far larger than a laptop runs::

    from rhlens.retrieval.official import fetch_official_scores, load_official
    fetch_official_scores("data/official")            # needs network access, once
    scores = load_official("data/official")            # {model name: RetrievalScores}

Files are taken from one pinned commit and checked against their git blob hashes, so a
fetched file is byte for byte the one the tests and the README describe.
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rhlens.errors import ConfigError, RhlensError
from rhlens.retrieval.scores import RetrievalScores
from rhlens.store.results import atomic_write_text

__all__ = [
    "OFFICIAL_MODELS",
    "OfficialScoresError",
    "fetch_official_scores",
    "find_official_dir",
    "load_official",
]

REPOSITORY = "nightdessert/Retrieval_Head"
COMMIT = "3ac171a6f71ce7ef1cda57d4215c390fb6ab51f2"
URL = f"https://raw.githubusercontent.com/{REPOSITORY}/{COMMIT}/head_score/{{name}}.json"

# model (file stem) -> git blob hash of its file at COMMIT
OFFICIAL_MODELS: dict[str, str] = {
    "Mistral-7B-v0.2-hf": "07359c8fce67f6539f8dff0d470f55db6ab8d95b",
    "Mixtral-8x7B-v0.1": "49ecc632e9303d0e57a5905029420eec109b53c2",
    "Qwen1.5-14B": "e614eb77843834e573d55bed81ff0717908e2a3d",
    "Qwen1.5-14B-Chat": "edb13d0d8ed8db8bc4e67b10be0337b02efe29da",
    "Yi-6B-200K": "3d723389959f9234ba68908f3162073a6b67157d",
    "llama-2-13b-64k": "e2b74a61dde08bf3ccc868b26ba6a808e8324c2f",
    "llama-2-7b-80k": "745343c284ffec84a692ebf702f0e73ee5da3318",
}
ENV_VAR = "RHLENS_OFFICIAL_SCORES"


class OfficialScoresError(RhlensError):
    """The official score files could not be fetched (offline, or a changed file)."""


def _blob_hash(data: bytes) -> str:
    """The hash git gives a file with this content (what the pinned list holds)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _download(url: str, timeout: float) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:  # a fixed https URL
        return response.read()


def fetch_official_scores(directory: str | Path, models: Sequence[str] | None = None, *,
                          timeout: float = 60.0,
                          opener: Callable[[str, float], bytes] | None = None) -> list[Path]:
    """Download the paper's per-head score files into ``directory`` (``<model>.json`` each).

    Files already there with the right content are kept (nothing is downloaded for them).

    Args:
        directory: where to write them (created).
        models: file stems from :data:`OFFICIAL_MODELS` (default: all seven).
        timeout: seconds per download.
        opener: ``opener(url, timeout) -> bytes`` (tests and proxies); default urllib.

    Returns:
        The paths of the requested files.

    Raises:
        ConfigError: an unknown model name (nothing is downloaded).
        OfficialScoresError: no network, or a file whose content is not the released one.
    """
    names = list(OFFICIAL_MODELS) if models is None else list(models)
    unknown = [m for m in names if m not in OFFICIAL_MODELS]
    if unknown or not names:
        raise ConfigError(f"unknown official model(s) {', '.join(unknown) or '(none given)'}; "
                          f"choose from {', '.join(OFFICIAL_MODELS)}")
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"{directory} is a file; give a directory for the score files")
    opener = opener or _download
    paths = []
    for name in names:
        path = directory / f"{name}.json"
        paths.append(path)
        if path.is_file() and _blob_hash(path.read_bytes()) == OFFICIAL_MODELS[name]:
            continue
        url = URL.format(name=name)
        try:
            data = opener(url, timeout)
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise OfficialScoresError(f"cannot download {url} ({reason}); check the network "
                                      f"or copy the files into {directory} by hand") from exc
        if _blob_hash(data) != OFFICIAL_MODELS[name]:
            raise OfficialScoresError(f"{url} does not hold the released file (content hash "
                                      "differs); not written")
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, data.decode("utf-8"))
    return paths


def _load_file(path: Path) -> RetrievalScores:
    try:
        data: Any = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
    if isinstance(data, dict):  # the files mix integer zeros with floats
        data = {k: [float(x) if isinstance(x, int) and not isinstance(x, bool) else x
                    for x in v] if isinstance(v, list) else v for k, v in data.items()}
    try:
        return RetrievalScores.from_paper_dict(data, model_name=path.stem)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def load_official(path_or_dir: str | Path) -> RetrievalScores | dict[str, RetrievalScores]:
    """Official scores: one file as :class:`RetrievalScores` (named after the file), or a
    folder as ``{model: RetrievalScores}`` over every ``*.json`` file in it."""
    path = Path(path_or_dir)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; fetch the files with "
                                "rhlens.official.fetch_official_scores (or rhlens official --fetch)")
    if path.is_file():
        return _load_file(path)
    files = sorted(path.glob("*.json"))
    if not files:
        raise ConfigError(f"{path} holds no paper-format *.json score files")
    return {f.stem: _load_file(f) for f in files}


def find_official_dir(start: str | Path | None = None) -> Path | None:
    """Where this checkout keeps the official files: ``$RHLENS_OFFICIAL_SCORES``, else a
    ``shared/data/official_head_scores`` folder beside the repository or above it; ``None``
    when there is none."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env) if Path(env).is_dir() else None
    here = Path(start) if start is not None else Path(__file__).resolve().parents[1]
    for parent in [here, *here.parents][:4]:
        candidate = parent / "shared" / "data" / "official_head_scores"
        if candidate.is_dir():
            return candidate
    return None
