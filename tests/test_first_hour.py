"""What a newcomer trips over first: flags named for what they do (old spellings still work and
say so), every default stated in the help, `report --official FILE RUN_DIR` read as written."""

from __future__ import annotations

import argparse

import pytest

from rhlens.cli import build_parser, main


def _subparsers():
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


def test_every_optional_flag_states_its_default():
    missing = [f"{name} {a.option_strings[0]}" for name, p in _subparsers().items()
               for a in p._actions
               if a.option_strings and not a.required and a.nargs != 0
               and a.help not in (None, argparse.SUPPRESS) and "default" not in a.help.lower()]
    assert missing == []


def test_answer_length_help_agrees_with_the_paper():
    subs = _subparsers()
    for name in ("detect", "scores"):
        act = next(a for a in subs[name]._actions if "--max-new-tokens" in a.option_strings)
        assert f"default {act.default}" in act.help
        assert ("as in the paper" in act.help) == (act.default == 50)


@pytest.mark.parametrize("command,new,old,value", [
    (["detect", "--out", "x"], "--score-formula", "--mode", "paper"),
    (["niah", "--out", "x"], "--knockout", "--mode", "zero"),
    (["mask-sweep", "--out", "x", "--scores", "s"], "--knockout", "--mode", "zero"),
    (["scores", "--out", "x"], "--knockout", "--mode", "zero"),
    (["cot", "--out", "x", "--task", "arithmetic"], "--knockout", "--mode", "zero"),
    (["patch", "--out", "x"], "--method", "--mode", "attribution"),
])
def test_renamed_flags_keep_their_old_spelling(command, new, old, value, capsys):
    parser = build_parser()
    args = parser.parse_args([*command, new, value])
    assert args.mode == value and capsys.readouterr().err == ""
    args = parser.parse_args([*command, old, value])
    assert args.mode == value
    err = capsys.readouterr().err
    assert "deprecated" in err and new in err


def test_report_official_then_run_dir(tmp_path, capsys):
    from test_report import _detection_run, _scores

    run = _detection_run(tmp_path / "det")
    paper = tmp_path / "paper.json"
    _scores(name="other", seed=1).to_paper_json(paper)
    out = tmp_path / "rep" / "report.html"
    assert main(["report", "--official", str(paper), str(run), "--out", str(out)]) == 0
    md = out.with_suffix(".md").read_text()
    assert "Detection" in md and "paper.json" in md  # the run's sections and the official file
    # Two files after one --official are both official; a run after them is still a run.
    paper2 = tmp_path / "paper2.json"
    _scores(name="third", seed=2).to_paper_json(paper2)
    assert main(["report", "--official", str(paper), str(paper2), str(run), "--out", str(out)]) == 0
    md = out.with_suffix(".md").read_text()
    assert "paper2" in md and "Detection" in md


def test_a_bar_moves_before_its_items_finish():
    """advance() moves the bar while a batch decodes; finished items count net of it, and the
    bar never runs past its total."""
    from rhlens.io import Records

    rec = Records(None, progress=True, total=2, desc="t", weights={"a": 100, "b": 300})
    rec.advance(40)
    rec.advance(40)
    assert rec.bar.n == 80
    rec.add({"key": "a"})  # 100: 80 shown already, 20 more
    assert rec.bar.n == 100
    rec.advance(1000)  # clamped at the total
    assert rec.bar.n == 400
    rec.add({"key": "b"})
    assert rec.bar.n == 400
    rec.close()
    items = Records(None, progress=True, total=3, desc="t")
    items.advance(0.5)
    items.add({"key": "x"})
    assert items.bar.n == 1
    items.close()
