"""The paper's released score files: fetched (through a stand-in for the network), checked
against their pinned hashes, loaded as scores."""

from __future__ import annotations

import hashlib
import json
import urllib.error

import pytest
import torch

from rhlens.errors import ConfigError
from rhlens.official import (
    COMMIT,
    OFFICIAL_MODELS,
    OfficialScoresError,
    fetch_official_scores,
    find_official_dir,
    load_official,
)
from rhlens.scores import RetrievalScores


def _paper_file(seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    data = {f"{la}-{h}": [0, *torch.rand(2, generator=g).tolist()] for la in range(2) for h in range(3)}
    return json.dumps(data).encode()


def _git_hash(data: bytes) -> str:
    return hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()


@pytest.fixture
def served(monkeypatch):
    """Two fake released files, pinned as if they were the real ones; returns the log of
    URLs asked for."""
    import rhlens.official

    files = {"llama-2-7b-80k": _paper_file(0), "Qwen1.5-14B": _paper_file(1)}
    monkeypatch.setattr(rhlens.official, "OFFICIAL_MODELS",
                        {**OFFICIAL_MODELS, **{k: _git_hash(v) for k, v in files.items()}})
    asked: list[str] = []

    def opener(url: str, timeout: float) -> bytes:
        asked.append(url)
        return files[url.rsplit("/", 1)[1].removesuffix(".json")]

    return opener, asked


def test_fetch_writes_checked_files_once(tmp_path, served):
    opener, asked = served
    paths = fetch_official_scores(tmp_path / "off", ["llama-2-7b-80k", "Qwen1.5-14B"], opener=opener)
    assert [p.name for p in paths] == ["llama-2-7b-80k.json", "Qwen1.5-14B.json"]
    assert asked == [f"https://raw.githubusercontent.com/nightdessert/Retrieval_Head/{COMMIT}/"
                     f"head_score/{n}.json" for n in ("llama-2-7b-80k", "Qwen1.5-14B")]
    assert paths[0].read_bytes() == _paper_file(0)
    fetch_official_scores(tmp_path / "off", ["llama-2-7b-80k"], opener=opener)
    assert len(asked) == 2  # already there with the right content: not downloaded again
    loaded = load_official(tmp_path / "off")
    assert sorted(loaded) == ["Qwen1.5-14B", "llama-2-7b-80k"]
    one = load_official(paths[0])
    assert isinstance(one, RetrievalScores) and one.model_name == "llama-2-7b-80k"
    assert one.per_probe.shape == (3, 2, 3)


def test_fetch_failures_are_one_line_errors(tmp_path, served):
    opener, asked = served

    def offline(url: str, timeout: float) -> bytes:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    with pytest.raises(OfficialScoresError, match=r"cannot download .*name resolution"):
        fetch_official_scores(tmp_path / "x", ["llama-2-7b-80k"], opener=offline)
    with pytest.raises(OfficialScoresError, match="content hash differs"):
        fetch_official_scores(tmp_path / "x", ["llama-2-7b-80k"],
                              opener=lambda url, timeout: b'{"0-0": [1]}')
    assert not (tmp_path / "x" / "llama-2-7b-80k.json").exists()
    with pytest.raises(ConfigError, match=r"unknown official model.*gpt-5"):
        fetch_official_scores(tmp_path / "x", ["gpt-5"], opener=opener)
    assert asked == []  # refused before any download
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="is a file"):
        fetch_official_scores(tmp_path / "file", opener=opener)


def test_load_official_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="fetch_official_scores"):
        load_official(tmp_path / "none")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no paper-format"):
        load_official(tmp_path / "empty")
    (tmp_path / "bad.json").write_text(json.dumps({"0-0": ["x"]}))
    with pytest.raises(ConfigError, match="must all be numbers"):
        load_official(tmp_path / "bad.json")


def test_find_official_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("RHLENS_OFFICIAL_SCORES", str(tmp_path))
    assert find_official_dir() == tmp_path
    monkeypatch.setenv("RHLENS_OFFICIAL_SCORES", str(tmp_path / "missing"))
    assert find_official_dir() is None
    monkeypatch.delenv("RHLENS_OFFICIAL_SCORES")
    repo = tmp_path / "checkout" / "repo"
    repo.mkdir(parents=True)
    assert find_official_dir(repo) is None
    (tmp_path / "checkout" / "shared" / "data" / "official_head_scores").mkdir(parents=True)
    assert find_official_dir(repo) == tmp_path / "checkout" / "shared" / "data" / "official_head_scores"


def test_the_pinned_hashes_match_the_files_here():
    """The files this checkout has (if any) are the released ones the pins describe."""
    folder = find_official_dir()
    files = sorted(folder.glob("*.json")) if folder is not None else []
    if not files:
        pytest.skip("official head scores not found (set RHLENS_OFFICIAL_SCORES)")
    for f in files:
        assert _git_hash(f.read_bytes()) == OFFICIAL_MODELS[f.stem], f.name
