"""Held-out needle sets: the packaged needles and their splits, generated needles, choosing on one
split and reporting on the other (never the reverse), and what a held-out KV sweep records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rhlens.compress import CompressConfig
from rhlens.compress.heldout import heldout_compress
from rhlens.compress.policy import CacheLayout
from rhlens.compress.sweep import compress_sweep, sweep_policies
from rhlens.errors import ConfigError
from rhlens.needlesets import (
    NEEDLES_FILE,
    RotatedHaystack,
    choose_setting,
    choose_then_report,
    generate_needles,
    needle_table,
    packaged_needles,
    split_haystack,
    split_needles,
)
from rhlens.niah import NIAHConfig
from rhlens.probe import Probe
from rhlens.probes import load_needles

from toy import make_toy_probe

ROOT = Path(__file__).resolve().parents[1]


# ---- the packaged needles ------------------------------------------------------------------
def test_packaged_needles_are_many_varied_and_split_in_two_disjoint_halves():
    rows = needle_table()
    assert len(rows) >= 48
    assert len(load_needles(NEEDLES_FILE)) == len(rows)  # the ordinary loader reads the file
    choose, report = packaged_needles("choose"), packaged_needles("report")
    assert not {n.id for n in choose} & {n.id for n in report}
    assert len(choose) + len(report) == len(rows)
    assert not {n.needle for n in choose} & {n.needle for n in report}
    for split in ("choose", "report"):  # every answer type on both sides
        types = {r["type"] for r in rows if r["split"] == split}
        assert types == {"name", "number", "phrase", "entity"}
    assert all(r["real_needle"] in r["needle"] for r in rows)
    assert len(packaged_needles("report", types=["number"])) >= 6
    with pytest.raises(ConfigError, match="split"):
        packaged_needles("train")


def test_the_needles_file_ships_with_the_package():
    tomllib = pytest.importorskip("tomllib")
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = data["tool"]["setuptools"]["package-data"]["rhlens"]
    assert any(Path("data/needles.jsonl").match(p) for p in patterns)
    assert NEEDLES_FILE.is_file() and NEEDLES_FILE.parent.name == "data"


def test_a_file_without_splits_cannot_be_asked_for_a_split(tmp_path):
    path = tmp_path / "n.jsonl"
    path.write_text(json.dumps({"needle": "The cat is called Tom.", "question": "What is the cat called?",
                                "real_needle": "Tom"}) + "\n")
    assert len(packaged_needles(path=path)) == 1
    with pytest.raises(ConfigError, match="no split"):
        packaged_needles("choose", path=path)


# ---- generated needles and seeded splits -------------------------------------------------------
def test_generated_needles_are_fixed_by_their_seed_and_differ_between_seeds():
    a, b, c = generate_needles(12, 7), generate_needles(12, 7), generate_needles(12, 8)
    assert a == b
    assert {n.needle for n in a}.isdisjoint({n.needle for n in c})
    assert len({n.id for n in a}) == 12 and all(n.real_needle in n.needle for n in a)
    numbers = generate_needles(4, 1, types=["number"])
    assert all(any(ch.isdigit() for ch in n.real_needle) for n in numbers)
    with pytest.raises(ConfigError):
        generate_needles(3, 1, types=["colour"])


def test_a_seeded_split_is_deterministic_disjoint_and_ignores_order():
    needles = generate_needles(20, 3)
    s1 = split_needles(needles, seed=5)
    s2 = split_needles(list(reversed(needles)), seed=5)
    assert {n.id for n in s1["choose"]} == {n.id for n in s2["choose"]}
    assert not {n.id for n in s1["choose"]} & {n.id for n in s1["report"]}
    assert len(s1["choose"]) + len(s1["report"]) == 20 and len(s1["choose"]) == 10
    assert {n.id for n in split_needles(needles, seed=6)["choose"]} != {n.id for n in s1["choose"]}


def test_each_split_has_its_own_haystack():
    assert split_haystack("choose").describe()["haystack"] == "stdlib-docs"
    report = split_haystack("report")
    assert isinstance(report, RotatedHaystack)
    plain = split_haystack("choose").text(5000)
    assert report.text(5000)[:2000] != plain[:2000]
    assert report.sha256() != split_haystack("choose").sha256()
    assert RotatedHaystack(0).text(3000) == plain[: len(RotatedHaystack(0).text(3000))]


# ---- choosing on one split, reporting on the other ---------------------------------------------
SCORES = {"choose": {"a": 60.0, "b": 70.0, "planted": 10.0},
          "report": {"a": 50.0, "b": 55.0, "planted": 99.0}}  # best on the report split only


def test_the_chooser_reads_only_the_choosing_split():
    calls = []

    def evaluate(setting, split):
        calls.append((setting, split))
        return SCORES[split][setting]

    rec = choose_then_report(["a", "planted", "b"], evaluate)
    assert rec["chosen"] == "b" and rec["report_score"] == 55.0
    assert rec["choose_split"] == "choose" and rec["report_split"] == "report"
    assert [c for c in calls if c[1] == "report"] == [("b", "report")]  # only the chosen is reported
    assert rec["choose_scores"] == [["a", 60.0], ["planted", 10.0], ["b", 70.0]]
    with pytest.raises(ConfigError, match="same split"):
        choose_then_report(["a"], evaluate, choose="report", report="report")
    assert choose_setting([3, 1, 2], lambda s: -s, maximize=False)[0] == 3
    assert choose_setting(["x", "y"], lambda s: 1.0)[0] == "x"  # ties: the earlier setting


# ---- per-window policies in one sweep ---------------------------------------------------------
def test_sweep_policies_take_a_window_per_budget_or_per_ranking(toy_model):
    model, _ = toy_model
    layout = CacheLayout.of(model)
    grid = torch.rand(2, 4)
    pol = {p.label: p for p in sweep_policies(layout, 100, {"r": grid}, (0.4, 0.6), 1,
                                              config=CompressConfig(sink=2, window=8),
                                              windows={0.6: 4})}
    assert pol["r@0.4"].window == 8 and pol["r@0.6"].window == 4 and pol["random-s0@0.6"].window == 4
    pol = {p.label: p for p in sweep_policies(layout, 100, {"r4": grid, "r8": grid}, (0.6,), 0,
                                              config=CompressConfig(sink=2, window=8), streaming=False,
                                              ranking_windows={"r4": 4})}
    assert pol["r4@0.6"].window == 4 and pol["r8@0.6"].window == 8
    assert len(pol["r4@0.6"].full) >= len(pol["r8@0.6"].full)  # a shorter window buys more heads
    with pytest.raises(ConfigError, match="budgets not swept"):
        sweep_policies(layout, 100, {"r": grid}, (0.6,), 0, windows={0.5: 4})
    with pytest.raises(ConfigError, match="names no ranking"):
        sweep_policies(layout, 100, {"r": grid}, (0.6,), 0, ranking_windows={"s": 4})


# ---- the held-out KV sweep ---------------------------------------------------------------------
class _Stub:
    """A sweep result whose ranked score is planted per split and window."""

    def __init__(self, probes, rankings, budgets, windows_of):
        self.split = probes[0].needle_id
        self.windows_of, self.budgets = windows_of, list(budgets)
        self.policies = {f"{n}@{b:g}": {"n_full": 3, "n_selectable": 8} for n in rankings for b in budgets}

    def score(self, label):
        if label == "full":
            return 80.0
        name, b = label.split("@")
        w = self.windows_of(name, float(b))
        return {"choose": {4: 40.0, 8: 60.0, 16: 50.0}, "report": {4: 95.0, 8: 55.0, 16: 70.0}}[self.split][w]

    def share(self, label):
        return 0.3

    def table(self):
        return [{"budget": b, "streaming": 20.0, "random_mean": 10.0, "random_std": 1.0}
                for b in self.budgets]


def _stub_sweep(calls):
    def sweep(model, probes, rankings, *, budgets, seeds, streaming, config, out, windows=None,
              ranking_windows=None, **kw):
        calls.append({"split": probes[0].needle_id, "rankings": list(rankings), "seeds": seeds,
                      "windows": dict(windows or {}), "ranking_windows": dict(ranking_windows or {})})
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "compress.run.json").write_text(json.dumps({"identity": {}}))

        def windows_of(name, b):
            if ranking_windows and name in ranking_windows:
                return ranking_windows[name]
            return (windows or {}).get(b, config.window)
        return _Stub(probes, rankings, budgets, windows_of)
    return sweep


def _probe(split, i):
    return Probe((1, 2, 3, 4), (1, 2), "x", length=10, depth=float(i), needle_id=split)


def test_heldout_compress_chooses_on_the_choosing_split_and_records_the_splits(tmp_path):
    calls = []
    choose = [_probe("choose", i) for i in range(3)]
    report = [_probe("report", i) for i in range(3)]
    doc = heldout_compress(None, choose, report, {"retrieval": torch.zeros(2, 4)}, budgets=(0.3, 0.5),
                           windows=(4, 8, 16), seeds=2, out=tmp_path, sweep=_stub_sweep(calls),
                           splits={"choose": {"needles": ["c1"]}, "report": {"needles": ["r1"]}})
    # window 4 is best on the report split only: never chosen; 8 is best on the choosing split
    assert [r["window"] for r in doc["rows"]] == [8, 8]
    assert doc["rows"][0]["report"]["retrieval"] == 55.0 and doc["rows"][0]["choose"]["retrieval"] == 60.0
    assert doc["rows"][0]["choose_scores"] == [[4, 40.0], [8, 60.0], [16, 50.0]]
    assert [c["split"] for c in calls] == ["choose", "report"]  # the report split is swept once,
    assert calls[1]["windows"] == {0.3: 8, 0.5: 8} and calls[1]["seeds"] == 2  # at the chosen windows
    assert calls[0]["ranking_windows"] == {"retrieval-w4": 4, "retrieval-w8": 8, "retrieval-w16": 16}
    for split in ("choose", "report"):
        run = json.loads((tmp_path / split / "compress.run.json").read_text())
        assert run["heldout"]["split"] == split and (tmp_path / split / "split.json").is_file()
    assert json.loads((tmp_path / "choose" / "split.json").read_text())["needles"] == ["c1"]
    saved = json.loads((tmp_path / "heldout.json").read_text())
    assert saved["splits"]["report"]["needles"] == ["r1"] and saved["rows"][1]["window"] == 8
    with pytest.raises(ConfigError, match="share"):
        heldout_compress(None, choose, choose, {"retrieval": torch.zeros(2, 4)}, budgets=(0.3,),
                         windows=(4,), out=tmp_path, sweep=_stub_sweep([]))


def test_heldout_compress_runs_on_the_toy_model(toy_model, tmp_path):
    model, tok = toy_model
    probes = []
    for seed in range(4):
        ids, span, answer = make_toy_probe(tok, 90, seed=20 + seed)
        probes.append(Probe(ids, span, answer, length=100, depth=float(seed), needle_id=f"toy{seed}"))
    grid = torch.zeros(2, 4)
    grid[1, 2] = 1.0
    doc = heldout_compress(model, probes[:2], probes[2:], {"retrieval": grid}, budgets=(0.4,),
                           windows=(4, 8), seeds=1, config=CompressConfig(sink=2, window=8),
                           out=tmp_path, tokenizer=tok, niah=NIAHConfig(max_new_tokens=6))
    row = doc["rows"][0]
    assert row["window"] in (4, 8) and row["report"]["n_probes"] == 2
    # the report run is an ordinary sweep at the chosen window: the same as running it directly
    direct = compress_sweep(model, probes[2:], {"retrieval": grid}, budgets=(0.4,), seeds=1,
                            config=CompressConfig(sink=2, window=row["window"]),
                            niah=NIAHConfig(max_new_tokens=6), tokenizer=tok)
    assert row["report"]["retrieval"] == direct.score("retrieval@0.4")
    assert row["report"]["full"] == direct.score("full")


# ---- the CLI -----------------------------------------------------------------------------------
def test_cli_compress_chooses_the_window_on_one_split_and_reports_on_the_other(default_model, tmp_path,
                                                                                 monkeypatch):
    from rhlens.cli import main
    from rhlens.scores import RetrievalScores

    per = torch.zeros(2, 30, 9)
    per[:, 18, 6] = per[:, 17, 4] = 0.8
    RetrievalScores(per, torch.ones(2, dtype=torch.bool), "smollm2", n_kv_heads=3).save(tmp_path / "scores")
    import rhlens.models

    monkeypatch.setattr(rhlens.models, "load_model", lambda *a, **k: default_model)
    argv = ["compress", "--scores", str(tmp_path / "scores"), "--budgets", "0.5", "--seeds", "1",
            "--lengths", "400", "--depths", "50", "--n-needles", "1", "--max-new-tokens", "6",
            "--choose-windows", "30,60", "--out", str(tmp_path / "run"), "--quiet"]
    assert main(argv) == 0
    doc = json.loads((tmp_path / "run" / "heldout.json").read_text())
    assert doc["windows"] == [30, 60] and doc["rows"][0]["window"] in (30, 60)
    choose = json.loads((tmp_path / "run" / "choose" / "split.json").read_text())
    report = json.loads((tmp_path / "run" / "report" / "split.json").read_text())
    assert choose["split"] == "choose" and report["split"] == "report"
    assert choose["needles"] == [packaged_needles("choose")[0].id]
    assert report["needles"] == [packaged_needles("report")[0].id]
    assert report["haystack"] != choose["haystack"]
    run = json.loads((tmp_path / "run" / "report" / "compress.run.json").read_text())
    assert run["heldout"]["split"] == "report"
    assert main([*argv[:-3], "--split", "report", "--out", str(tmp_path / "r2")]) == 2  # not both


def test_cli_scores_refuses_a_judge_split_without_judging(capsys):
    from rhlens.cli import main

    assert main(["scores", "--split", "choose", "--judge-split", "report", "--out", "/tmp/x-never"]) == 2
    assert "--judge" in capsys.readouterr().err
