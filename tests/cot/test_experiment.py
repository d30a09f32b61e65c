"""The CoT-vs-direct experiment end to end on the default model, with a handful of items."""

from __future__ import annotations

import pytest

from rhlens.ablation import Mask
from rhlens.cot.experiment import CoTConfig, CoTResult, cot_ablation
from rhlens.cot.tasks import get_task
from rhlens.errors import ConfigError


def test_short_run_gives_a_complete_loadable_result(default_model, tmp_path):
    model, tok = default_model
    task = get_task("arithmetic").head(2)
    masks = [Mask.none(), Mask(((14, 3), (18, 6)), label="top-2"),
             Mask(((2, 1), (7, 5)), label="random-2-s0")]
    config = CoTConfig(max_new_tokens_cot=48, max_new_tokens_direct=12, n_boot=200)
    res = cot_ablation(model, task, masks=masks, config=config, tokenizer=tok, out=tmp_path)
    assert len(res.records) == 2 * 3 * 2
    assert {r["mode"] for r in res.records} == {"cot", "direct"}
    assert all(isinstance(r["correct"], bool) for r in res.records)
    table = res.table()
    assert len(table) == 2 * 3
    for row in table:
        assert 0 <= row["low"] <= row["accuracy"] <= row["high"] <= 1
        assert ("drop" in row) == (row["mask"] != "none")
    res.save(tmp_path)
    back = CoTResult.load(tmp_path)
    assert back.table() == table
    # A rerun resumes from the log and recomputes nothing.
    lines = (tmp_path / f"cot_{task.name}.jsonl").read_text().splitlines()
    again = cot_ablation(model, task, masks=masks, config=config, tokenizer=tok, out=tmp_path)
    assert (tmp_path / f"cot_{task.name}.jsonl").read_text().splitlines() == lines
    assert again.records == res.records


def test_random_seeds_pool_into_one_group():
    recs = []
    for mask, correct in (("none", [1, 1]), ("random-5-s0", [1, 0]), ("random-5-s1", [0, 0])):
        for i, c in enumerate(correct):
            recs.append({"task": "t", "mask": mask, "group": mask.split("-s")[0]
                         if mask != "none" else "none", "mode": "cot", "id": str(i),
                         "correct": bool(c)})
    res = CoTResult("t", "context", "m", recs, {}, {"n_boot": 100})
    assert res.groups == ["none", "random-5"]
    assert res.accuracy("random-5", "cot") == pytest.approx(0.25)
    drop, lo, hi = res.drop("random-5", "cot")
    assert drop == pytest.approx(0.75) and lo <= drop <= hi


def test_bad_settings():
    with pytest.raises((ConfigError, TypeError)):
        CoTConfig(prompting=("socratic",))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="level"):
        CoTConfig(level=1.5)
