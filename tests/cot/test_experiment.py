"""The CoT-vs-direct experiment: user items and masks on models of known behaviour, the
bootstrap against a naive loop, and results that save, load, and read the older format."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from rhlens.ablation import Mask
from rhlens.cot import Question, TaskItem, as_task, get_task
from rhlens.cot.experiment import CoTConfig, CoTResult, as_masks, cot_ablation
from rhlens.errors import ConfigError
from rhlens.results import ResultError, load_result
from rhlens.scores import RetrievalScores

from toy import sample_toy_words

FIXTURES = Path(__file__).parent / "fixtures"


# ---------------------------------------------------------------------- toy model (known head)
def _toy_questions(n: int) -> list[Question]:
    """Toy prompts as text (the tokenizer adds <bos>), asked the same way in both modes."""
    out = []
    for i in range(n):
        words, _, values = sample_toy_words(random.Random(100 + i), 20 + 30 * i)
        text = " ".join(words[1:])
        out.append(Question(text, " ".join(values), id=f"toy-{i}", cot_prompt=text, direct_prompt=text))
    return out


def test_masking_the_copy_head_of_the_toy_model(toy_model, tmp_path):
    """The toy model copies through L1H2 only: top-1 of its scores is that head, and masking it
    (given as scores + k, or as a (layer, head) pair) makes every answer wrong; a random
    non-retrieval head changes nothing."""
    model, tok = toy_model
    items = _toy_questions(3)
    # Scores where L1H2 leads, as detection finds on this model.
    per_probe = torch.zeros(2, 2, 4)
    per_probe[:, 1, 2] = 1.0
    per_probe[:, 0, 1] = 0.05
    scores = RetrievalScores(per_probe=per_probe, success=torch.ones(2, dtype=torch.bool),
                             model_name="toy")
    config = CoTConfig(max_new_tokens_cot=10, max_new_tokens_direct=10, chat_template=False,
                       n_boot=200)
    res = cot_ablation(model, items, masks=scores, k=1, seeds=[0], config=config, tokenizer=tok)
    assert [m for m in res.masks] == ["none", "top-1", "random-1-s0"]
    assert res.masks["top-1"]["heads"] == [[1, 2]]
    assert (1, 2) not in {tuple(h) for h in res.masks["random-1-s0"]["heads"]}
    for mode in ("cot", "direct"):
        assert res.accuracy("none", mode) == 1.0
        assert res.accuracy("top-1", mode) == 0.0
        assert res.accuracy("random-1", mode) == 1.0
        drop, lo, hi = res.drop("top-1", mode)
        assert drop == 1.0 and lo == hi == 1.0
    none = [r for r in res.records if r["mask"] == "none"]
    assert all(r["output"] == r["gold"] for r in none)  # graded by text: the values, in order
    # The same head as a plain (layer, head) pair, and the saved run reloads.
    pairs = cot_ablation(model, items[:1], masks=[(1, 2)], config=config, tokenizer=tok)
    assert list(pairs.masks) == ["none", "heads-1"]
    assert pairs.accuracy("heads-1", "direct") == 0.0
    back = CoTResult.load(res.save(tmp_path / "cot" / "items"))
    assert back.table() == res.table() and back.config == config


# ------------------------------------------------------------- default model, two user items
def test_two_user_items_on_the_default_model(default_model, tmp_path):
    model, tok = default_model
    items = [("What is the capital of France?", "Paris"), ("How many legs does a spider have?", 8)]
    masks = [Mask.none(), Mask(((14, 3), (18, 6)), label="top-2"),
             Mask(((2, 1), (7, 5)), label="random-2-s0")]
    config = CoTConfig(max_new_tokens_cot=48, max_new_tokens_direct=12, n_boot=200)
    res = cot_ablation(model, items, masks=masks, config=config, tokenizer=tok, out=tmp_path)
    assert len(res.records) == 2 * 3 * 2
    assert {r["mode"] for r in res.records} == {"cot", "direct"}
    assert all(isinstance(r["correct"], bool) for r in res.records)
    direct = {r["id"]: r for r in res.records if r["mask"] == "none" and r["mode"] == "direct"}
    assert direct["items-0"]["correct"], direct  # "Paris", graded as text
    assert direct["items-1"]["correct"], direct  # "8", graded as a number
    table = res.table()
    assert len(table) == 2 * 3
    for row in table:
        assert 0 <= row["low"] <= row["accuracy"] <= row["high"] <= 1
        assert ("drop" in row) == (row["mask"] != "none")
    saved = res.save(tmp_path / "cot" / "items")
    assert CoTResult.load(saved).table() == table
    assert CoTResult.load(saved / "result.json").table() == table
    # A rerun resumes from the log and recomputes nothing.
    log = tmp_path / "cot_items.jsonl"
    lines = log.read_text().splitlines()
    again = cot_ablation(model, items, masks=masks, config=config, tokenizer=tok, out=tmp_path)
    assert log.read_text().splitlines() == lines
    assert again.records == res.records
    # Other prompts under the same ids are refused rather than mixed into the old answers.
    with pytest.raises(ConfigError, match="other settings"):
        cot_ablation(model, [("What is the capital of Spain?", "Madrid"), items[1]], masks=masks,
                     config=config, tokenizer=tok, out=tmp_path)


# ----------------------------------------------------------------------------- bootstrap
def _records(correct: dict[str, list[int]], mode: str = "cot") -> list[dict]:
    return [{"task": "t", "mask": mask, "group": mask.split("-s")[0] if mask != "none" else "none",
             "mode": mode, "id": f"i{i:02d}", "correct": bool(c)}
            for mask, values in correct.items() for i, c in enumerate(values)]


def _naive_interval(values: list[float], n_boot: int, seed: int, level: float) -> tuple[float, float]:
    """Resample items with a plain loop (the same draws as the seeded generator), then take
    numpy's linear-interpolation percentiles."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(values), (n_boot, len(values)), generator=g).tolist()
    means = [sum(values[j] for j in row) / len(row) for row in idx]
    a = (1 - level) / 2
    return float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def test_intervals_and_paired_drops_match_a_naive_resampling_loop():
    rng = random.Random(0)
    base = [int(rng.random() < 0.8) for _ in range(25)]
    masked = [int(rng.random() < 0.4) for _ in range(25)]
    res = CoTResult("t", "context", "m", _records({"none": base, "top-3": masked}), {},
                    CoTConfig(n_boot=300, seed=5, level=0.9))
    lo, hi = res.interval("top-3", "cot")
    assert (lo, hi) == pytest.approx(_naive_interval(masked, 300, 5, 0.9), abs=1e-12)
    diff = [b - m for b, m in zip(base, masked)]
    drop, dlo, dhi = res.drop("top-3", "cot")
    assert drop == pytest.approx(sum(diff) / 25)
    assert (dlo, dhi) == pytest.approx(_naive_interval(diff, 300, 5, 0.9), abs=1e-12)
    assert res.accuracy("none", "cot") == pytest.approx(sum(base) / 25)


def test_random_seeds_pool_into_one_group():
    recs = _records({"none": [1, 1], "random-5-s0": [1, 0], "random-5-s1": [0, 0]})
    res = CoTResult("t", "context", "m", recs, {}, {"n_boot": 100})  # a dict config still works
    assert res.groups == ["none", "random-5"]
    assert res.accuracy("random-5", "cot") == pytest.approx(0.25)
    drop, lo, hi = res.drop("random-5", "cot")
    assert drop == pytest.approx(0.75) and lo <= drop <= hi
    with pytest.raises(ConfigError, match="no answers"):
        res.accuracy("top-5", "cot")
    numbered = [dict(r, id=int(r["id"][1:])) for r in recs]  # integer item ids work too
    assert CoTResult("t", "context", "m", numbered, {}).drop("random-5", "cot")[0] == drop


# --------------------------------------------------------------------------- save / load
def test_reads_the_older_format_written_by_the_previous_version(tmp_path):
    """``fixtures/cot_v0/cot_arithmetic.json`` was written by the previous ``CoTResult.save``."""
    old_file = FIXTURES / "cot_v0" / "cot_arithmetic.json"
    old = json.loads(old_file.read_text())
    for source in (old_file, old_file.parent):
        res = CoTResult.load(source)
        assert (res.task, res.task_kind, res.model_name) == ("arithmetic", "context",
                                                            "SmolLM2-135M-Instruct")
        assert res.records == old["records"] and res.masks == old["masks"]
        assert res.config == CoTConfig(max_new_tokens_cot=48, max_new_tokens_direct=12,
                                       n_boot=500, seed=3)
    # The accuracies and drops are those the old file lists (its intervals came from
    # another random generator).
    for new, was in zip(res.table(), old["table"], strict=True):
        assert (new["mask"], new["mode"], new["n"]) == (was["mask"], was["mode"], was["n"])
        assert new["accuracy"] == pytest.approx(was["accuracy"])
        assert new.get("drop") == pytest.approx(was.get("drop"))
    # Saved again, it is a current result.
    res.save(tmp_path / "again")
    doc = json.loads((tmp_path / "again" / "result.json").read_text())
    assert (doc["kind"], doc["schema_version"]) == ("CoTResult", 1)
    back = load_result(tmp_path / "again")
    assert isinstance(back, CoTResult) and back.records == res.records and back.config == res.config


def test_what_load_accepts_and_refuses(tmp_path):
    res = CoTResult.load(FIXTURES / "cot_v0")
    old = (FIXTURES / "cot_v0" / "cot_arithmetic.json").read_text()
    two = tmp_path / "two"
    two.mkdir()
    for task in ("arithmetic", "lookup"):
        (two / f"cot_{task}.json").write_text(old)
    (two / "cot_arithmetic.run.json").write_text("{}")  # a log's settings, not a result
    assert CoTResult.load(two / "cot_lookup.json").records == res.records
    with pytest.raises(ResultError, match="holds 2 CoT results"):
        CoTResult.load(two)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ResultError, match="no saved rhlens result"):
        CoTResult.load(tmp_path / "empty")
    (tmp_path / "cot_bad.json").write_text('{"kind": "NIAHResult"}')
    with pytest.raises(ResultError, match="holds no CoTResult"):
        CoTResult.load(tmp_path / "cot_bad.json")
    (tmp_path / "cot_damaged.json").write_text('{"kind": "CoTResult", "task": "t"}')
    with pytest.raises(ResultError, match="without 'task_kind'"):
        CoTResult.load(tmp_path / "cot_damaged.json")


# ------------------------------------------------------------------------ items and masks
def test_user_items_and_their_grading():
    task = as_task([("Where is Rivo?", "Daln"), Question("How many?", "12", id="q", aliases=("twelve",))])
    assert task.answer_type == "text" and [it.id for it in task] == ["items-0", "q"]
    assert "Answer with just the answer." in task.items[0].direct_prompt
    assert task.grade("Rivo is in the country of Daln.", task.items[0])
    assert not task.grade("I don't know", task.items[0])
    numbers = as_task([("2 + 2?", 4), ("3 + 3?", "6")], name="sums")
    assert numbers.answer_type == "number" and numbers.items[0].answer == "4"
    assert numbers.grade("2 + 2 = 4.\nAnswer: 4", numbers.items[0])
    assert not numbers.grade("Answer: 44", numbers.items[0])
    own = as_task([("Say hi", "hi")], grade=lambda out, gold: out.lower().startswith(gold))
    assert own.grade("Hi there", own.items[0]) and not own.grade("Hello", own.items[0])
    item = TaskItem.ask("x", "q?", "a")
    assert as_task([item]).items == (item,)
    builtin = get_task("counts", n=2)
    assert as_task(builtin) is builtin
    with pytest.raises(ConfigError, match="grades its own"):
        as_task(builtin, grade=lambda o, g: True)
    with pytest.raises(ConfigError, match="item 1 must be"):
        as_task([("q", "a"), ("only a prompt",)])
    with pytest.raises(ConfigError, match="empty prompt"):
        as_task([(" ", "a")])
    with pytest.raises(ConfigError, match="no items"):
        as_task([])
    with pytest.raises(ConfigError, match="two items with id"):
        as_task([Question("a", "b", id="same"), Question("c", "d", id="same")])


def test_masks_from_scores_pairs_or_masks():
    per_probe = torch.zeros(1, 3, 4)
    per_probe[0, 2, 1], per_probe[0, 0, 3] = 0.9, 0.5
    scores = RetrievalScores(per_probe=per_probe, success=torch.ones(1, dtype=torch.bool),
                             model_name="m")
    masks = as_masks(scores, k=2, seeds=2, mode="zero")
    assert [m.label for m in masks] == ["none", "top-2", "random-2-s0", "random-2-s1"]
    assert masks[1].heads == ((0, 3), (2, 1)) and masks[1].mode == "zero"
    assert [m.label for m in as_masks(scores, k=1)] == ["none", "top-1"]
    assert [m.label for m in as_masks(scores, k=1, seeds=[4])] == ["none", "top-1", "random-1-s4"]
    pairs = as_masks([(2, 1), [0, 3]])
    assert [m.label for m in pairs] == ["none", "heads-2"] and pairs[1].heads == ((0, 3), (2, 1))
    one = Mask(((1, 1),), label="mine")
    assert as_masks(one) == [Mask.none(), one]
    assert as_masks([Mask.none(), one]) == [Mask.none(), one]
    assert as_masks(None) == [Mask.none()]
    with pytest.raises(ConfigError, match="need k >= 1"):
        as_masks(scores)
    with pytest.raises(ConfigError, match="top-K heads of RetrievalScores"):
        as_masks([(1, 1)], k=3)
    with pytest.raises(ConfigError, match="not a mix"):
        as_masks([one, (1, 2)])
    with pytest.raises(ConfigError, match="pairs"):
        as_masks([(1, 2, 3)])
    with pytest.raises(ConfigError, match="unique"):
        as_masks([one, one])
    with pytest.raises(ConfigError, match="while answering"):
        as_masks(Mask(((1, 1),), phase="all"))


def test_heads_outside_the_model_are_refused_before_any_answer(toy_model):
    model, tok = toy_model
    with pytest.raises(ConfigError, match="outside this model"):
        cot_ablation(model, [("KEY v1 END ASK", "v1")], masks=[(5, 0)], tokenizer=tok)


def test_bad_settings():
    with pytest.raises((ConfigError, TypeError)):
        CoTConfig(prompting=("socratic",))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="level"):
        CoTConfig(level=1.5)
    with pytest.raises(ConfigError, match="n_boot"):
        CoTConfig(n_boot=0)
    with pytest.raises(ConfigError, match="no setting"):
        CoTResult("t", "context", "m", [], {}, {"bootstraps": 3})


def test_the_figure_draws_every_saved_accuracy():
    from rhlens.plotting import plot_cot_bars

    res = CoTResult.load(FIXTURES / "cot_v0")
    fig = plot_cot_bars([res])
    bars = list(fig.axes[0].patches)
    table = res.table()
    assert len(bars) == len(table) == 2 * 3  # (cot, direct) x (none, top-2, random-2)
    assert sorted(round(b.get_height(), 9) for b in bars) == sorted(
        round(100 * row["accuracy"], 9) for row in table)
    with pytest.raises(ValueError, match="no CoT results"):
        plot_cot_bars([])
