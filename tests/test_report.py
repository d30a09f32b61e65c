"""The HTML/Markdown report: built from synthetic run directories whose content is known.

No model runs here: the run directories are written with the result types' own ``save``
methods (and :func:`rhlens.runs.save_detection_run`), which is what the commands write, so
the report is tested against the real file layout.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
from pathlib import Path

import pytest
import torch

from rhlens.errors import ConfigError
from rhlens.niah import MaskSweepResult, NIAHResult
from rhlens.report import Report, add_report_parser, build_report
from rhlens.runs import save_detection_run
from rhlens.scores import RetrievalScores

N_LAYERS, N_HEADS = 4, 3
PLANTED = [(2, 1), (3, 0)]  # (2, 1) copies on every probe, (3, 0) on half of them


def _scores(name: str = "toy-model", seed: int = 0, n_probes: int = 6) -> RetrievalScores:
    g = torch.Generator().manual_seed(seed)
    per_probe = 0.02 * torch.rand(n_probes, N_LAYERS, N_HEADS, generator=g)
    per_probe[:, 2, 1] = 0.8
    per_probe[::2, 3, 0] = 0.6
    success = torch.ones(n_probes, dtype=torch.bool)
    success[-1] = False
    probes = [{"key": f"len{length}-depth{depth:g}-n", "length": length, "depth": depth,
               "needle_id": "n", "rouge_recall": 1.0 if i < n_probes - 1 else 0.2,
               "success": i < n_probes - 1, "response": f"the answer {i}"}
              for i, (length, depth) in enumerate(
                  [(500, 0.0), (500, 50.0), (500, 100.0), (1000, 0.0), (1000, 50.0),
                   (1000, 100.0)][:n_probes])]
    return RetrievalScores(per_probe=per_probe, success=success, model_name=name, n_kv_heads=1,
                           probes=probes, config={"mode": "unique", "success_threshold": 0.5})


def _niah(masks: dict[str, list[list[int]]]) -> NIAHResult:
    """Answers under each mask: correct unmasked, hallucinated under the top-K masks."""
    records = []
    for label in masks:
        for length in (500, 1000):
            for depth in (0.0, 100.0):
                key = f"len{length}-depth{depth:g}-n"
                broken = label.startswith("top-") and depth == 0.0
                response = "dragons sing under the moon" if broken else "smoked blue cardamom"
                recall = 0.0 if broken else 1.0
                records.append({"key": key, "probe": key, "mask": label, "length": length,
                                "depth": depth, "needle_id": "n", "question": "What is it?",
                                "expected": "smoked blue cardamom", "response": response,
                                "rouge_recall": recall, "score": 100 * recall,
                                "answer_class": "hallucination" if broken else "correct"})
    return NIAHResult(records=records, model_name="toy-model", config={"max_new_tokens": 8},
                      masks={k: {"heads": v, "mode": "uniform", "phase": "decode", "label": k}
                             for k, v in masks.items()})


def _detection_run(path: Path, **kw) -> Path:
    save_detection_run(path, _scores(**kw), wall_seconds=12.0, figures=False)
    return path


def _sweep_run(path: Path) -> Path:
    """What ``rhlens mask-sweep`` writes: ``niah_result.json`` + ``mask_sweep.json``.

    Written by hand rather than with ``MaskSweepResult.save`` because ``save`` stores
    ``curve()``, whose return annotation the test-time type checker rejects (see
    :func:`_curve_checked`); the files are the same.
    """
    niah = _niah({"none": [], "top-2": [[2, 1], [3, 0]], "random-2-s0": [[0, 0], [1, 1]]})
    niah.save(path)
    (path / "mask_sweep.json").write_text(json.dumps({"kind": "MaskSweepResult", "ks": [0, 2],
                                                      "seeds": [0]}))
    return path


def _curve_checked(path: Path) -> None:
    """The saved sweep reloads and its curve is well-formed (types checked at test time)."""
    curve = MaskSweepResult.load(path).curve()
    assert curve["k"] == [0, 2]


def _check_html(path: Path, report: Report) -> str:
    """The HTML is one file: every image inline as a real PNG, nothing fetched from outside."""
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    assert "<link" not in text and "<script" not in text and "url(" not in text
    srcs = re.findall(r'<img[^>]*src="([^"]+)"', text)
    assert len(srcs) == len(report.images()) > 0
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    return text


def _check_markdown(path: Path, report: Report) -> str:
    text = path.read_text(encoding="utf-8")
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(links) == len(report.images())
    for link in links:
        assert link.startswith(f"{path.stem}_files/")
        assert (path.parent / link).read_bytes()[:4] == b"\x89PNG"
    assert len(list((path.parent / f"{path.stem}_files").glob("*.png"))) == len(links)
    return text


def test_detection_run_report(tmp_path):
    run = _detection_run(tmp_path / "det")
    report = build_report([run], title="detection only")
    titles = report.titles()
    for title in ("Run det", "Detection", "Top heads", "Score map and distribution",
                  "Needle in a haystack", "Sparse", "Dynamic", "Stability"):
        assert title in titles
    for absent in ("Masking sweep", "NIAH under masks", "Head patching", "Chain of thought",
                   "Across score sets"):
        assert absent not in titles

    html_text = _check_html(report.to_html(tmp_path / "out" / "r.html"), report)
    assert "L2H1" in html_text and "detection only" in html_text
    top_table = next(t for t in report.tables() if t.caption.startswith("Best"))
    assert [row[1] for row in top_table.rows[:2]] == ["L2H1", "L3H0"]
    md = _check_markdown(report.to_markdown(tmp_path / "out" / "r.md"), report)
    assert "## Run det" in md and "| L2H1 |" in md


def test_every_kind_of_result(tmp_path):
    from rhlens.patching import HeadPatchingResult

    run = _detection_run(tmp_path / "full")
    _niah({"none": [], "top-2": [[2, 1], [3, 0]]}).save(run)
    effects = torch.zeros(2, N_LAYERS, N_HEADS)
    effects[:, 2, 1] = 0.7
    HeadPatchingResult(effects=effects, patched=effects.clone(), clean=torch.tensor([3.0, 2.5]),
                       corrupted=torch.tensor([-1.0, -0.5]), model_name="toy-model",
                       config={"mode": "exact", "direction": "denoise", "positions": "answer",
                               "metric": "logit_diff"},
                       pairs=[{"key": "p0", "clean_answer": "amber", "corrupted_answer": "iron"},
                              {"key": "p1", "clean_answer": "blue", "corrupted_answer": "green"}],
                       seconds=[1.0, 1.0]).save(run / "patching")
    cot = [{"task": "arithmetic", "mode": mode, "id": i, "gold": "4", "mask": mask,
            "correct": not (mask != "none" and mode == "cot"), "output": f"{mode} {mask}"}
           for mode in ("cot", "direct") for mask in ("none", "top-2") for i in range(3)]
    (run / "cot.jsonl").write_text("".join(json.dumps(r) + "\n" for r in cot))

    report = build_report([run])
    titles = report.titles()
    for title in ("Detection", "NIAH under masks", "Answers under top-2, side by side",
                  "Head patching", "Patching effect vs retrieval score", "Chain of thought",
                  "Answers broken by a mask"):
        assert title in titles, title
    assert "Masking sweep" not in titles
    html_text = _check_html(report.to_html(tmp_path / "all.html"), report)
    assert "dragons sing under the moon" in html_text  # the hallucination, next to ...
    assert "smoked blue cardamom" in html_text  # ... the unmasked answer
    acc = next(t for t in report.tables() if t.caption == "Accuracy")
    assert ("arithmetic", "top-2", "3", "0%", "100%") in acc.rows
    patch = next(t for t in report.tables() if t.header[:3] == ("rank", "head", "effect"))
    assert patch.rows[0][1] == "L2H1"
    _check_markdown(report.to_markdown(tmp_path / "all.md"), report)


def test_masking_sweep_section(tmp_path):
    sweep = _sweep_run(tmp_path / "sweep")
    _curve_checked(sweep)
    report = build_report([sweep])
    assert {"Run sweep", "Masking sweep", "Answers under top-2, side by side"} <= set(report.titles())
    assert "Detection" not in report.titles()
    k_table = next(t for t in report.tables() if t.caption == "NIAH score against K")
    assert [row[:3] for row in k_table.rows] == [("0", "100.0", "100.0 ± 0.0"),
                                                 ("2", "50.0", "100.0 ± 0.0")]
    html_text = _check_html(report.to_html(tmp_path / "s.html"), report)
    assert "dragons sing under the moon" in html_text
    _check_markdown(report.to_markdown(tmp_path / "s.md"), report)


def test_runs_are_compared_when_grids_match(tmp_path):
    a = _detection_run(tmp_path / "a", name="model-a", seed=0)
    b = _detection_run(tmp_path / "b", name="model-b", seed=1)
    report = build_report([a, b])
    assert {"Across score sets", "Universal", "Intrinsic"} <= set(report.titles())
    intr = next(t for t in report.tables() if t.header[0] == "model A")
    assert intr.rows[0][:2] == ("model-a", "model-b")


def test_missing_inputs(tmp_path):
    with pytest.raises(FileNotFoundError):
        build_report([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no rhlens results"):
        build_report([tmp_path / "empty"])
    with pytest.raises(ConfigError, match="nothing to report"):
        build_report([])


def test_unfinished_detection_is_noted(tmp_path):
    run = tmp_path / "partial"
    run.mkdir()
    (run / "probes.jsonl").write_text("")
    report = build_report([run])
    assert report.titles() == ["Run partial"]
    assert "has not finished" in report.to_html(tmp_path / "p.html").read_text()


def test_cli_writes_both_files(tmp_path, capsys):
    run = _detection_run(tmp_path / "det")
    parser = argparse.ArgumentParser(prog="rhlens")
    add_report_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["report", str(run), "--out", str(tmp_path / "rep" / "report.html")])
    assert args.func(args) == 0
    assert (tmp_path / "rep" / "report.html").exists()
    assert (tmp_path / "rep" / "report.md").exists()
    assert (tmp_path / "rep" / "report_files").is_dir()
    assert "report.html" in capsys.readouterr().out
    args = parser.parse_args(["report"])
    with pytest.raises(ConfigError):
        args.func(args)


# ---- the paper's released scores (skipped when absent) ----------------------------------------
def _official_dir() -> Path:
    env = os.environ.get("RHLENS_OFFICIAL_SCORES")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "data" / "official_head_scores"


def test_official_scores_enter_the_comparisons(tmp_path):
    folder = _official_dir()
    files = [folder / "Mistral-7B-v0.2-hf.json", folder / "Mixtral-8x7B-v0.1.json"]
    if not all(f.exists() for f in files):
        pytest.skip(f"official head scores not found in {folder} (set RHLENS_OFFICIAL_SCORES)")
    report = build_report([_detection_run(tmp_path / "det")], official=files)
    uni = next(t for t in report.tables() if t.caption == "Retrieval heads in every score set")
    assert [row[0] for row in uni.rows] == ["toy-model", "Mistral-7B-v0.2-hf", "Mixtral-8x7B-v0.1"]
    assert uni.rows[1][3] == "43"  # heads above 0.1 in the released Mistral file
    intr = next(t for t in report.tables() if t.header[0] == "model A")
    assert len(intr.rows) == 1  # the toy grid matches neither 32 x 32 model
    assert intr.rows[0][:2] == ("Mistral-7B-v0.2-hf", "Mixtral-8x7B-v0.1")
    assert float(intr.rows[0][3]) > 0.8  # the MoE variant keeps its base's retrieval heads
    _check_html(report.to_html(tmp_path / "o.html"), report)
