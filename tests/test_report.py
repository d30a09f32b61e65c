"""The HTML/Markdown report: built from synthetic run directories whose content is known.

No model runs here: the run directories are written with the results' own ``save`` and the
run writers of :mod:`rhlens.runs` (what the commands call), so the report is tested against
the real file layout. The report must render saved results only: tests below make every
analysis raise while the report is built.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest
import torch

from rhlens.errors import ConfigError
from rhlens.niah import MaskSweepResult, NIAHConfig, NIAHResult, sweep_masks
from rhlens.official import find_official_dir
from rhlens.report import Report, build_report
from rhlens.retrieval import DetectConfig
from rhlens.runs import read_run, save_detection_run, save_mask_sweep_run, save_niah_run
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
                           probes=probes, config=DetectConfig())


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
    return NIAHResult(records=records, model_name="toy-model", config=NIAHConfig(max_new_tokens=8),
                      masks={k: {"heads": v, "mode": "uniform", "phase": "decode", "label": k}
                             for k, v in masks.items()})


def _detection_run(path: Path, **kw) -> Path:
    save_detection_run(path, _scores(**kw), wall_seconds=12.0, figures=False)
    return path


def _sweep() -> MaskSweepResult:
    niah = _niah({"none": [], "top-2": [[2, 1], [3, 0]], "random-2-s0": [[0, 0], [1, 1]]})
    return MaskSweepResult(ks=[0, 2], niah=niah, seeds=[0])


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


@pytest.fixture
def forbid_analyses(monkeypatch):
    """Call it once the runs are written: from then on every analysis a report could rerun,
    and the model loader, raise, so the report must render what is saved and nothing else."""
    import rhlens.models
    import rhlens.patching
    import rhlens.properties

    def forbidden(*args, **kwargs):
        raise AssertionError("the report recomputed an analysis or loaded a model")

    def forbid() -> None:
        for name in ("sparse", "dynamic", "stability", "detection_properties"):
            monkeypatch.setattr(rhlens.properties, name, forbidden)
        monkeypatch.setattr(rhlens.patching, "patching_vs_retrieval", forbidden)
        monkeypatch.setattr(rhlens.models, "load_model", forbidden)

    return forbid


def test_detection_run_report(tmp_path, forbid_analyses):
    run = tmp_path / "det"
    save_detection_run(run, _scores(), wall_seconds=12.0, figures=False)
    forbid_analyses()
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
    assert "1000 resamples" in html_text  # the saved stability's own settings, not other ones
    top_table = next(t for t in report.tables() if t.caption.startswith("Best"))
    assert [row[1] for row in top_table.rows[:2]] == ["L2H1", "L3H0"]
    assert top_table.header[-2] == "95% interval"
    md = _check_markdown(report.to_markdown(tmp_path / "out" / "r.md"), report)
    assert "## Run det" in md and "| L2H1 |" in md


def _write_old_run(path: Path, scores: RetrievalScores) -> None:
    """A detection run folder as rhlens wrote it before results were saved one way: scores
    as ``meta.json`` + ``tensors.safetensors``, no properties."""
    from dataclasses import asdict

    from safetensors.torch import save_file

    (path / "scores").mkdir(parents=True)
    save_file({"per_probe": scores.per_probe.float().contiguous(),
               "success": scores.success.to(torch.uint8).contiguous()},
              str(path / "scores" / "tensors.safetensors"))
    meta = {"kind": "RetrievalScores", "model_name": scores.model_name,
            "n_kv_heads": scores.n_kv_heads, "probes": scores.probes,
            "config": asdict(scores.config)}
    (path / "scores" / "meta.json").write_text(json.dumps(meta, indent=1))
    (path / "summary.json").write_text(json.dumps({"model": scores.model_name, "probes": 6}))


def test_old_run_folder_says_what_is_missing_and_how_to_make_it(tmp_path, monkeypatch):
    from rhlens.runs import save_properties

    run = tmp_path / "old"
    _write_old_run(run, _scores())
    with monkeypatch.context() as m:
        import rhlens.properties

        m.setattr(rhlens.properties, "stability", lambda *a, **k: pytest.fail("recomputed"))
        report = build_report([run])
    titles = report.titles()
    assert "Detection" in titles and "Top heads" in titles
    assert not {"Sparse", "Dynamic", "Stability"} & set(titles)
    text = report.to_html(tmp_path / "old.html").read_text()
    assert "no saved sparse, dynamic, stability result" in text
    assert "save_properties" in text
    top_table = next(t for t in report.tables() if t.caption.startswith("Best"))
    assert "interval" not in " ".join(top_table.header)  # none saved, none invented

    save_properties(run)  # what the note says to do
    assert {"Sparse", "Dynamic", "Stability"} <= set(build_report([run]).titles())


def test_every_kind_of_result(tmp_path, forbid_analyses):
    from rhlens.cot.experiment import CoTResult
    from rhlens.patching import HeadPatchingResult

    run = _detection_run(tmp_path / "full")
    save_niah_run(run, _niah({"none": [], "top-2": [[2, 1], [3, 0]]}), figures=False)
    effects = torch.zeros(2, N_LAYERS, N_HEADS)
    effects[:, 2, 1] = 0.7
    HeadPatchingResult(effects=effects, patched=effects.clone(), clean=torch.tensor([3.0, 2.5]),
                       corrupted=torch.tensor([-1.0, -0.5]), model_name="toy-model",
                       config={"mode": "exact", "direction": "denoise", "positions": "answer",
                               "metric": "logit_diff"},
                       pairs=[{"key": "p0", "clean_answer": "amber", "corrupted_answer": "iron"},
                              {"key": "p1", "clean_answer": "blue", "corrupted_answer": "green"}],
                       seconds=[1.0, 1.0]).save(run / "patching")
    records = [{"key": f"{mask}|{mode}|{i}", "task": "arithmetic", "mask": mask, "group": mask,
                "mode": mode, "id": i, "gold": "4", "output": f"{mode} {mask}", "extracted": "4",
                "correct": not (mask != "none" and mode == "cot")}
               for mode in ("cot", "direct") for mask in ("none", "top-2") for i in range(3)]
    cot = CoTResult(task="arithmetic", task_kind="number", model_name="toy-model", records=records,
                    masks={"none": {}, "top-2": {}}, config={"n_boot": 200, "level": 0.9, "seed": 0})
    cot.save(run / "cot" / "arithmetic")

    forbid_analyses()
    report = build_report([run])
    titles = report.titles()
    for title in ("Detection", "NIAH under masks", "Answers under top-2, side by side",
                  "Head patching", "Chain of thought", "Answers broken by a mask"):
        assert title in titles, title
    assert "Masking sweep" not in titles
    html_text = _check_html(report.to_html(tmp_path / "all.html"), report)
    assert "dragons sing under the moon" in html_text  # the hallucination, next to ...
    assert "smoked blue cardamom" in html_text  # ... the unmasked answer
    assert "no saved comparison" in html_text  # patching + scores, comparison not saved
    acc = next(t for t in report.tables() if t.caption == "Accuracy")
    assert acc.header[5] == "90% interval"  # the CoT run's own level
    row = next(r for r in acc.rows if r[1:3] == ("top-2", "cot"))
    assert row[3:6] == ("3", "0%", "[0%, 0%]") and row[6].startswith("+100")
    patch = next(t for t in report.tables() if t.header[:3] == ("rank", "head", "effect"))
    assert patch.rows[0][1] == "L2H1"
    _check_markdown(report.to_markdown(tmp_path / "all.md"), report)


def test_saved_patching_comparison_is_rendered(tmp_path, forbid_analyses):
    from rhlens.patching import PatchingVsRetrieval

    run = _detection_run(tmp_path / "p")
    effect = torch.zeros(N_LAYERS, N_HEADS)
    effect[2, 1] = 0.9
    PatchingVsRetrieval(effect=effect, score=_scores().mean, spearman=0.5, pearson=0.25,
                        causal_not_retrieval=[], retrieval_not_causal=[(3, 0, 0.0, 0.5)],
                        both=[(2, 1, 0.9, 0.8)], effect_threshold=0.1, score_threshold=0.1,
                        model_name="toy-model").save(run / "patching_vs_retrieval.json")
    forbid_analyses()
    report = build_report([run])
    assert "Patching effect vs retrieval score" in report.titles()
    groups = next(t for t in report.tables() if t.header[0] == "group")
    assert groups.rows[0][:2] == ("both", "L2H1")


def test_masking_sweep_section(tmp_path, forbid_analyses):
    sweep_dir = tmp_path / "sweep"
    save_mask_sweep_run(sweep_dir, _sweep(), figures=False)
    forbid_analyses()
    report = build_report([sweep_dir])
    assert {"Run sweep", "Masking sweep", "Answers under top-2, side by side"} <= set(report.titles())
    assert "Detection" not in report.titles()
    k_table = next(t for t in report.tables() if t.caption == "NIAH score against K")
    assert [row[:3] for row in k_table.rows] == [("0", "100.0", "100.0 ± 0.0"),
                                                 ("2", "50.0", "100.0 ± 0.0")]
    html_text = _check_html(report.to_html(tmp_path / "s.html"), report)
    assert "dragons sing under the moon" in html_text
    _check_markdown(report.to_markdown(tmp_path / "s.md"), report)
    # a sweep saved by itself (the folder is the result) reads the same
    _sweep().save(tmp_path / "bare")
    bare = build_report([tmp_path / "bare"])
    assert next(t for t in bare.tables() if t.caption == "NIAH score against K").rows == k_table.rows


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


def test_unfinished_runs_are_noted(tmp_path):
    run = tmp_path / "partial"
    run.mkdir()
    (run / "probes.jsonl").write_text("")
    (run / "cot_lookup.jsonl").write_text("")
    report = build_report([run])
    assert report.titles() == ["Run partial"]
    text = report.to_html(tmp_path / "p.html").read_text()
    assert "has not finished" in text and "cot_lookup.jsonl" in text


def test_cli_writes_both_files(tmp_path, capsys):
    from rhlens.cli import main

    run = _detection_run(tmp_path / "det")
    assert main(["report", str(run), "--out", str(tmp_path / "rep" / "report.html")]) == 0
    assert (tmp_path / "rep" / "report.html").exists()
    assert (tmp_path / "rep" / "report.md").exists()
    assert (tmp_path / "rep" / "report_files").is_dir()
    assert "report.html" in capsys.readouterr().out
    assert main(["report"]) == 2


# ---- one top-K rule: masks, properties and the report pick the same heads ------------------------
def test_tie_heavy_scores_give_the_same_heads_everywhere(tmp_path):
    """Most heads tie (at 0, and a group at 0.5): every consumer of "the top K heads" must
    pick the same K, which an independent sort with ties by (layer, head) predicts."""
    from rhlens.properties import intrinsic, stability, universal

    n_layers, n_heads, k = 5, 6, 7
    grid = torch.zeros(n_layers, n_heads)
    grid[4, 5] = 0.9
    for la, h in [(3, 1), (0, 4), (2, 2), (4, 0), (1, 5), (0, 0), (2, 5), (3, 3)]:
        grid[la, h] = 0.5  # eight heads tie at the K-th place
    per_probe = grid.repeat(4, 1, 1)  # every probe alike: the means tie exactly
    probes = [{"key": f"p{i}", "length": 500, "depth": 25.0 * i, "needle_id": "n",
               "rouge_recall": 1.0, "success": True, "response": "x"} for i in range(4)]
    scores = RetrievalScores(per_probe, torch.ones(4, dtype=torch.bool), "ties", probes=probes,
                             config=DetectConfig())
    cells = [(la, h) for la in range(n_layers) for h in range(n_heads)]
    expected = sorted(cells, key=lambda c: (-float(grid[c]), c))[:k]  # independent rule
    assert expected[1:] == [(0, 0), (0, 4), (1, 5), (2, 2), (2, 5), (3, 1)]

    assert scores.top_heads(k) == expected
    assert [(la, h) for la, h, _ in scores.top(k)] == expected
    mask = sweep_masks(scores, ks=[k], seeds=1)[1]
    assert mask.label == f"top-{k}" and set(mask.heads) == set(expected)
    assert stability(scores, k=k, n_boot=20, repeats=2).top == expected
    assert intrinsic(scores, scores, k=k).top_a == expected
    assert [(la, h) for la, h, _ in universal([scores], top_k=k).rows[0].top] == expected
    assert scores.retrieval_heads(0.1) == sorted(
        [c for c in cells if grid[c] > 0.1], key=lambda c: (-float(grid[c]), c))

    run = tmp_path / "ties"
    save_detection_run(run, scores, figures=False)
    summary = json.loads((run / "summary.json").read_text())
    assert [(h["layer"], h["head"]) for h in summary["top_heads"][:k]] == expected
    assert read_run(run).saved_property("stability").top == stability(scores, k=10).top[:10]
    report = build_report([run], top=k)
    table = next(t for t in report.tables() if t.caption.startswith("Best"))
    assert [(int(r[2]), int(r[3])) for r in table.rows] == expected


# ---- the paper's released scores (skipped when absent) ----------------------------------------
def test_official_scores_enter_the_comparisons(tmp_path):
    folder = find_official_dir()
    if folder is None or not (folder / "Mixtral-8x7B-v0.1.json").exists():
        pytest.skip("official head scores not found (set RHLENS_OFFICIAL_SCORES)")
    files = [folder / "Mistral-7B-v0.2-hf.json", folder / "Mixtral-8x7B-v0.1.json"]
    report = build_report([_detection_run(tmp_path / "det")], official=files)
    uni = next(t for t in report.tables() if t.caption == "Retrieval heads in every score set")
    assert [row[0] for row in uni.rows] == ["toy-model", "Mistral-7B-v0.2-hf", "Mixtral-8x7B-v0.1"]
    assert uni.rows[1][3] == "43"  # heads above 0.1 in the released Mistral file
    intr = next(t for t in report.tables() if t.header[0] == "model A")
    assert len(intr.rows) == 1  # the toy grid matches neither 32 x 32 model
    assert intr.rows[0][:2] == ("Mistral-7B-v0.2-hf", "Mixtral-8x7B-v0.1")
    assert float(intr.rows[0][3]) > 0.8  # the MoE variant keeps its base's retrieval heads
    _check_html(report.to_html(tmp_path / "o.html"), report)
