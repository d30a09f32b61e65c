"""The rhlens command: runs end to end, writes its files, and fails with clear messages."""

from __future__ import annotations

import json

import pytest

from rhlens.cli import main


@pytest.fixture(scope="module")
def detect_run(tmp_path_factory, default_model):
    out = tmp_path_factory.mktemp("cli") / "detect"
    code = main(["detect", "--lengths", "450", "--depths", "50", "--n-needles", "2",
                 "--max-new-tokens", "24", "--out", str(out), "--quiet"])
    assert code == 0
    return out


def test_detect_writes_every_file(detect_run, capsys):
    for name in ("probes.jsonl", "run.json", "summary.json", "scores/result.json", "niah.png"):
        assert (detect_run / name).exists(), name
    lines = (detect_run / "probes.jsonl").read_text().splitlines()
    assert len(lines) == 2
    rec = json.loads(lines[0])
    for field in ("length", "depth", "needle_id", "prompt_ids", "needle_span", "response_ids",
                  "response", "rouge_recall", "success", "scores"):
        assert field in rec
    assert len(rec["scores"]) == 30 and len(rec["scores"][0]) == 9
    summary = json.loads((detect_run / "summary.json").read_text())
    assert summary["probes"] == 2 and summary["layers"] == 30
    if summary["successful_probes"]:
        paper = json.loads((detect_run / "head_scores.json").read_text())
        assert len(paper) == 270 and len(paper["0-0"]) == summary["successful_probes"]
        assert (detect_run / "heatmap.png").exists()


def test_rerun_resumes_without_recomputing(detect_run, capsys):
    before = (detect_run / "probes.jsonl").read_text()
    assert main(["detect", "--lengths", "450", "--depths", "50", "--n-needles", "2",
                 "--max-new-tokens", "24", "--out", str(detect_run), "--quiet"]) == 0
    assert (detect_run / "probes.jsonl").read_text() == before
    assert main(["detect", "--lengths", "450", "--depths", "50", "--n-needles", "2",
                 "--max-new-tokens", "30", "--out", str(detect_run), "--quiet"]) == 2
    assert "other settings" in capsys.readouterr().out


def test_niah_with_masks_from_a_run(detect_run, tmp_path, capsys):
    out = tmp_path / "niah"
    code = main(["niah", "--lengths", "450", "--depths", "50", "--n-needles", "1",
                 "--max-new-tokens", "24", "--scores", str(detect_run), "--mask", "none",
                 "--mask", "heads:0.1,2.3", "--out", str(out), "--quiet"])
    assert code == 0
    data = json.loads((out / "niah" / "result.json").read_text())
    assert set(data["fields"]["masks"]) == {"none", "heads:0.1,2.3"}
    assert (out / "niah_heatmaps.png").exists()


@pytest.mark.parametrize(("argv", "message"), [
    (["niah", "--mask", "top:3", "--out", "x"], "needs --scores"),
    (["niah", "--mask", "best:3", "--out", "x"], "--mask must be"),
    (["mask-sweep", "--scores", "/no/such/file.json", "--out", "x"], "does not exist"),
    (["detect", "--lengths", "100", "--out", "x"], "too short"),
])
def test_errors_are_one_line_messages(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert message in capsys.readouterr().out


def test_bad_numbers_are_argparse_errors(capsys):
    with pytest.raises(SystemExit):
        main(["detect", "--lengths", "5OO", "--out", "x"])
    assert "comma-separated integers" in capsys.readouterr().err
