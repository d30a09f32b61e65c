"""Run directories (rhlens.runs): outputs rewritten from every record, stale ones removed,
and a folder's results found by what they are."""

from __future__ import annotations

import json

import pytest
import torch

from rhlens.errors import ConfigError
from rhlens.probe import Probe
from rhlens.properties import PropertySettings, sparse, stability
from rhlens.retrieval import DetectConfig, detect_retrieval_heads
from rhlens.runs import RunDir, find_scores, read_run, save_detection_run, save_properties
from rhlens.scores import RetrievalScores

from toy import make_toy_probe


def _toy_probes(tok, fillers=(20, 60, 110, 140)):
    out = []
    for i, n_filler in enumerate(fillers):
        ids, span, answer = make_toy_probe(tok, n_filler, seed=100 + i)
        out.append(Probe(prompt_ids=ids, needle_span=span, real_needle=answer,
                         length=len(ids), depth=float(i), needle_id="toy"))
    return out


def test_rerunning_a_subset_keeps_every_probe_in_the_outputs(toy_model, tmp_path):
    """Issue 14, item 6: a rerun on part of the grid must not shrink head_scores.json."""
    model, tok = toy_model
    probes = _toy_probes(tok)
    cfg = DetectConfig(max_new_tokens=8)
    out = tmp_path / "run"
    full = detect_retrieval_heads(model, probes, config=cfg, out=out)
    save_detection_run(out, full, figures=False)
    before = json.loads((out / "head_scores.json").read_text())
    assert len(before["1-2"]) == 4

    subset = detect_retrieval_heads(model, probes[:2], config=cfg, out=out)
    assert subset.n_probes == 2
    save_detection_run(out, subset, figures=False)
    assert json.loads((out / "head_scores.json").read_text()) == before
    summary = json.loads((out / "summary.json").read_text())
    assert summary["probes"] == 4 and summary["successful_probes"] == 4
    saved = RetrievalScores.load(out / "scores")
    assert [p["key"] for p in saved.probes[:2]] == [p.key for p in probes[:2]]
    assert sorted(p["key"] for p in saved.probes) == sorted(p.key for p in probes)
    assert torch.equal(saved.mean, full.mean)


def _scores(success: bool, n: int = 3) -> RetrievalScores:
    per = torch.zeros(n, 2, 3)
    per[:, 1, 2] = 0.8
    probes = [{"key": f"p{i}", "length": 500, "depth": 50.0 * i, "rouge_recall": 1.0 * success,
               "success": success, "response": "x"} for i in range(n)]
    return RetrievalScores(per, torch.full((n,), success), "m", probes=probes,
                           config=DetectConfig())


def test_outputs_that_no_longer_apply_are_removed(tmp_path):
    """Issue 14, item 6: when no probe succeeds, no head scores, heatmaps or properties of an
    earlier run may stay beside a summary that says 0 succeeded."""
    out = tmp_path / "run"
    written = save_detection_run(out, _scores(True))
    for name in ("head_scores", "heatmap", "distribution", "niah", "sparse", "dynamic", "stability"):
        assert written[name].exists(), name
    save_detection_run(out, _scores(False))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["successful_probes"] == 0
    run = RunDir(out)
    for gone in (run.head_scores, run.heatmap, run.distribution, run.properties / "sparse",
                 run.properties / "dynamic", run.properties / "stability"):
        assert not gone.exists(), gone
    assert run.niah_figure.exists()  # the answers themselves are still mapped
    assert RetrievalScores.load(run.scores).n_successful == 0
    # without figures, old figures do not survive either
    save_detection_run(out, _scores(True), figures=False)
    assert not run.niah_figure.exists() and not run.heatmap.exists()
    # one successful probe: sparse and dynamic, but no stability (nothing to resample)
    one = _scores(True, n=1)
    save_detection_run(out, one, figures=False)
    assert (run.properties / "sparse").exists() and not (run.properties / "stability").exists()


def test_properties_are_saved_with_their_settings(tmp_path):
    scores = _scores(True, n=4)
    settings = PropertySettings(thresholds=(0.2,), k=2, n_boot=30, repeats=3, seed=5)
    save_detection_run(tmp_path / "r", scores, figures=False, properties=settings)
    found = read_run(tmp_path / "r")
    stab = found.saved_property("stability")
    assert (stab.k, stab.n_boot, stab.repeats, stab.seed) == (2, 30, 3, 5)
    assert stab.top == stability(scores, k=2, n_boot=30, repeats=3, seed=5).top
    assert found.saved_property("sparse").thresholds == (0.2,)
    assert torch.equal(found.saved_property("sparse").counts, sparse(scores, (0.2,)).counts)
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["config"]["type"] == "DetectConfig"
    # rewritten with other settings on request (e.g. for a folder of an older rhlens)
    save_properties(tmp_path / "r", PropertySettings(k=1, n_boot=10, repeats=1))
    assert read_run(tmp_path / "r").saved_property("stability").k == 1
    with pytest.raises(ConfigError, match="n_boot"):
        PropertySettings(n_boot=0)


def test_scores_saved_into_another_runs_folder_are_refused(toy_model, tmp_path):
    model, tok = toy_model
    out = tmp_path / "run"
    detect_retrieval_heads(model, _toy_probes(tok)[:1], config=DetectConfig(max_new_tokens=8),
                           out=out)
    with pytest.raises(ConfigError, match="log of another run"):
        save_detection_run(out, _scores(True), figures=False)


def test_read_run_finds_results_by_kind(tmp_path):
    scores = _scores(True)
    scores.save(tmp_path / "anywhere" / "deep")  # any folder name: found by its kind
    found = read_run(tmp_path / "anywhere")
    assert found.scores is not None and found.scores.n_probes == 3
    assert list(found.results) == ["deep"]
    scores.save(tmp_path / "itself")
    assert read_run(tmp_path / "itself").scores is not None
    (tmp_path / "damaged").mkdir()
    (tmp_path / "damaged" / "result.json").write_text("{oops")
    with pytest.raises(Exception, match="damaged"):
        read_run(tmp_path)
    with pytest.raises(FileNotFoundError):
        read_run(tmp_path / "nope")


def test_find_scores_reads_every_form(tmp_path):
    scores = _scores(True)
    save_detection_run(tmp_path / "run", scores, figures=False)
    assert find_scores(tmp_path / "run").n_probes == 3
    assert find_scores(tmp_path / "run" / "scores").n_probes == 3
    paper = find_scores(tmp_path / "run" / "head_scores.json")
    assert paper.model_name == "head_scores" and torch.allclose(paper.mean, scores.mean)
    only_paper = tmp_path / "paper_only"
    only_paper.mkdir()
    (only_paper / "head_scores.json").write_text((tmp_path / "run" / "head_scores.json").read_text())
    (only_paper / "summary.json").write_text(json.dumps({"model": "named-model"}))
    assert find_scores(only_paper).model_name == "named-model"
    assert RetrievalScores.from_any(only_paper).n_probes == 3
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no retrieval scores"):
        find_scores(tmp_path / "empty")


def test_niah_figure_title_fits(tmp_path):
    """The NIAH map of a small grid used to cut its title off at both sides (niah.png)."""
    from rhlens.plotting import plot_niah_heatmap

    for lengths in ((500,), (500, 1000), tuple(range(500, 5000, 500))):
        fig = plot_niah_heatmap([{"length": n, "depth": d, "rouge_recall": 1.0}
                                 for n in lengths for d in (0.0, 50.0, 100.0)])
        fig.savefig(tmp_path / "niah.png", dpi=80)
        title = fig.axes[0].title.get_window_extent()
        assert title.x0 >= 0 and title.x1 <= fig.bbox.width, lengths
