"""``rhlens scores``: bad input refused before the model loads; one tiny run end to end, resumed, reported."""

from __future__ import annotations

import json

import pytest

from rhlens.cli import main

TINY = ["--lengths", "450", "--depths", "50", "--n-needles", "1", "--max-new-tokens", "24", "--quiet"]


@pytest.mark.parametrize("argv, message", [
    (["--family", "copy,bogus"], "unknown score family 'bogus'"),
    (["--family", "copy,copy"], "score family given twice: copy"),
    (["--needle-set", "nonliteral", "--needles", "x.jsonl"], "--needle-set and --needles"),
    (["--needle-set", "poetic"], "invalid choice"),
    (["--judge", "--ks", "0"], "must be >= 1"),
    (["--judge", "--ks", "1,300"], "exceeds the model's 270 heads"),
    (["--judge", "--family", "induction"], "--judge answers NIAH probes"),
    (["--n-needles", "9", "--needle-set", "nonliteral"], "the nonliteral set has 4 needles"),
    (["--sequences", "0"], "must be >= 1"),
])
def test_bad_input_is_one_line_before_the_model_loads(argv, message, tmp_path, monkeypatch, capsys):
    import rhlens.models

    def refuse(*a, **k):
        raise AssertionError("the weights must not load")

    monkeypatch.setattr(rhlens.models, "load_model", refuse)
    code = main(["scores", *argv, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("rhlens: error:")
    assert message in err[0]


@pytest.fixture(scope="module")
def reuse_model(default_model):
    """Hand the CLI the default model the session already loaded."""
    import rhlens.models

    real = rhlens.models.load_model

    def load(name=None, *, device=None, dtype=None, offline=None, **more):  # more: device maps
        if name is None and dtype is None:
            return default_model
        return real(name, device=device, dtype=dtype, offline=offline, **more)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rhlens.models, "load_model", load)
        yield


@pytest.mark.slow  # the default model end to end; tests/test_cli_families.py runs the CLI on tiny models
def test_scores_runs_resumes_and_reports(reuse_model, tmp_path, capsys):
    from rhlens.families import DamageResult, FamilySet
    from rhlens.report import build_report
    from rhlens.runs import read_run

    out = tmp_path / "scores"
    argv = ["scores", *TINY, "--family", "copy,mass,query,induction", "--sequences", "2",
            "--device", "cpu", "--judge", "--ks", "1,2", "--seeds", "1", "--out", str(out)]
    assert main(argv) == 0
    for name in ("families.jsonl", "families.run.json", "families", "head_scores_copy.json",
                 "head_scores_induction.json", "families.png", "family_tops.png", "damage",
                 "damage.png"):
        assert (out / name).exists(), name
    fs = FamilySet.load(out / "families")
    assert fs.names == ["copy", "mass", "query", "induction"] and fs.needle_set == "literal"
    assert fs["copy"].n_successful == 1  # the probe is answered: the comparison is not vacuous
    damage = DamageResult.load(out / "damage")
    assert damage.rankings == ["copy", "mass", "query", "induction"] and damage.ks == [1, 2]
    rec = json.loads((out / "families.jsonl").read_text().splitlines()[0])
    assert {"copy", "mass", "query", "question_span", "response"} <= set(rec)
    # A rerun resumes: the probe's record is not made again.
    before = (out / "families.jsonl").read_text()
    assert main(argv) == 0
    assert (out / "families.jsonl").read_text() == before
    # Another setting in the same folder is refused, naming it.
    capsys.readouterr()
    assert main([*argv[:-2], "--answers", "reference", "--out", str(out)]) == 2
    assert "answers" in capsys.readouterr().err
    run = read_run(out)
    assert run.scores is None and len(run.of_kind("FamilySet")) == 1  # not detection scores
    report = build_report(out)
    titles = report.titles()
    assert "Score families" in titles and any(t.startswith("Masking each family") for t in titles)
