"""RetrievalScores: means over successful probes only, files, the paper's format, GQA pooling."""

from __future__ import annotations

import json

import pytest
import torch

from rhlens.errors import ConfigError
from rhlens.scores import RetrievalScores


def _scores() -> RetrievalScores:
    per = torch.zeros(3, 2, 4)
    per[:, 1, 2] = torch.tensor([1.0, 0.5, 0.9])  # the retrieval head
    per[2, 0, 0] = 1.0  # fires only on the failed probe: must not count
    return RetrievalScores(per, torch.tensor([True, True, False]), "m", n_kv_heads=2,
                           probes=[{"key": str(i)} for i in range(3)])


def test_mean_uses_only_successful_probes():
    s = _scores()
    assert s.mean[1, 2] == pytest.approx(0.75) and s.mean[0, 0] == 0
    assert s.top(1) == [(1, 2, pytest.approx(0.75))]
    assert s.retrieval_heads(0.1) == [(1, 2)]
    assert s.fraction_above(0.1) == pytest.approx(1 / 8)


def test_no_successful_probe_is_an_error_not_a_zero():
    s = RetrievalScores(torch.ones(2, 1, 1), torch.tensor([False, False]), "m")
    with pytest.raises(ConfigError, match="none of the 2 probes"):
        _ = s.mean


def test_kv_aggregate_pools_query_heads_of_a_group():
    s = _scores()
    assert s.kv_aggregate("max").tolist() == [[0.0, 0.0], [0.0, 0.75]]
    assert s.kv_aggregate("mean")[1, 1] == pytest.approx(0.375)
    with pytest.raises(ConfigError, match="n_kv_heads is unknown"):
        RetrievalScores(torch.zeros(1, 1, 2), torch.tensor([True]), "m").kv_aggregate()


def test_save_load_and_paper_json_roundtrip(tmp_path):
    s = _scores()
    s.save(tmp_path / "r")
    back = RetrievalScores.load(tmp_path / "r")
    assert torch.equal(back.per_probe, s.per_probe) and torch.equal(back.success, s.success)
    assert back.probes == s.probes and back.n_kv_heads == 2
    path = s.to_paper_json(tmp_path / "p.json")
    data = json.loads(path.read_text())
    assert set(data) == {f"{la}-{h}" for la in range(2) for h in range(4)}
    assert data["1-2"] == [1.0, 0.5]  # successful probes only, like the paper's files
    imported = RetrievalScores.from_paper_json(path)
    assert torch.allclose(imported.mean, s.mean)
    assert RetrievalScores.from_any(tmp_path / "r").n_probes == 3


def test_paper_json_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"0-0": [0.1, 0.2], "0-1": [0.3]}))
    with pytest.raises(ConfigError, match="different lengths"):
        RetrievalScores.from_paper_json(bad)
    bad.write_text(json.dumps({"zero-0": [0.1]}))
    with pytest.raises(ConfigError, match="not '<layer>-<head>'"):
        RetrievalScores.from_paper_json(bad)
    bad.write_text(json.dumps({"0-0": [0.1], "1-1": [0.2]}))
    with pytest.raises(ConfigError, match=r"2 .* keys .* missing"):
        RetrievalScores.from_paper_json(bad)
    bad.write_text("{oops")
    with pytest.raises(ConfigError, match="not valid JSON"):
        RetrievalScores.from_paper_json(bad)


def test_bootstrap_means_match_direct_resampling():
    s = _scores()
    boot = s.bootstrap(n=50, seed=3)
    assert boot.shape == (50, 2, 4)
    ok = s.successful
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(0, ok.shape[0], (50, ok.shape[0]), generator=g)
    assert torch.allclose(boot, ok[idx].mean(1))


def test_top_is_the_one_rule_and_refuses_too_many_heads():
    per = torch.zeros(2, 2, 3)
    per[:, 1, 0] = 0.5
    per[:, 0, 2] = 0.5  # ties with L1H0: (layer, head) order decides
    s = RetrievalScores(per, torch.ones(2, dtype=torch.bool), "m")
    assert s.top_heads(3) == [(0, 2), (1, 0), (0, 0)]
    assert s.ranked()[:2] == [(0, 2), (1, 0)] and len(s.ranked()) == 6
    assert s.to_dataframe()[["layer", "head"]].values.tolist()[:3] == [[0, 2], [1, 0], [0, 0]]
    assert len(s.top(7)) == 6  # a listing: at most what there is
    with pytest.raises(ConfigError, match="larger than the number of heads"):
        s.top_heads(7)  # a mask of "the top 7" cannot be all 6 heads
    with pytest.raises(ConfigError, match=">= 0"):
        s.top(-1)


def test_config_is_a_detect_config_and_survives_saving(tmp_path):
    from rhlens.retrieval import DetectConfig

    s = _scores()
    s.config = DetectConfig(mode="paper", max_new_tokens=12)
    back = RetrievalScores.load(s.save(tmp_path / "r"))
    assert back.config == DetectConfig(mode="paper", max_new_tokens=12)
    assert json.loads((tmp_path / "r" / "result.json").read_text())["kind"] == "RetrievalScores"
    legacy = RetrievalScores(s.per_probe, s.success, "m", config={"mode": "paper", "gone": 1})
    assert legacy.config == DetectConfig(mode="paper")  # an old dict, unknown settings dropped
    assert RetrievalScores(s.per_probe, s.success, "m", config={}).config is None


def test_paper_json_with_non_numbers_is_refused(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"0-0": ["high"]}))
    with pytest.raises(ConfigError, match="must all be numbers"):
        RetrievalScores.from_paper_json(bad)
    bad.write_bytes(b"\xff\xfe{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        RetrievalScores.from_paper_json(bad)
