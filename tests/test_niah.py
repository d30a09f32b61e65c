"""NIAH sweeps: every argument refused before any compute; results that save and load."""

from __future__ import annotations

import pytest
import torch

import rhlens.niah
from rhlens.ablation import Mask
from rhlens.errors import ConfigError
from rhlens.niah import (
    MaskSweepResult,
    NIAHConfig,
    NIAHResult,
    classify_answer,
    mask_sweep,
    niah_sweep,
    sweep_masks,
)
from rhlens.probe import Probe
from rhlens.runs import read_run, save_mask_sweep_run
from rhlens.scores import RetrievalScores

from toy import make_toy_probe


def _scores(n_layers: int = 2, n_heads: int = 4) -> RetrievalScores:
    per = torch.zeros(2, n_layers, n_heads)
    per[:, 1, 2] = 0.9
    return RetrievalScores(per, torch.ones(2, dtype=torch.bool), "toy")


@pytest.fixture
def no_engine(monkeypatch):
    """The engine raises if reached: a refused argument must be refused before it."""
    def engine(*args, **kwargs):
        raise AssertionError("the engine ran before the arguments were checked")

    monkeypatch.setattr(rhlens.niah, "generate_many", engine)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"seeds": 0}, "seeds must be >= 1"),
    ({"seeds": -2}, "seeds must be >= 1"),
    ({"seeds": []}, "non-empty list"),
    ({"seeds": [1, 1]}, "distinct"),
    ({"seeds": [-1]}, "non-empty list of whole numbers"),
    ({"seeds": True}, "seeds must be"),
    ({"ks": []}, "at least one K > 0"),
    ({"ks": [0]}, "at least one K > 0"),
    ({"ks": [-2, 3]}, "K must be >= 0"),
    ({"ks": [2, 100]}, "exceeds the model's 8 heads"),
    # wrong types: the test-time type checker may refuse them first (a TypeError)
    ({"ks": [2.5]}, "whole number|ks"),
    ({"ks": "5"}, "list of head counts|ks"),
])
def test_mask_sweep_refuses_bad_arguments_before_compute(toy_model, no_engine, kwargs, match):
    """Issue 14, item 10: seeds=0 used to crash with an IndexError after the whole sweep."""
    model, tok = toy_model
    ids, span, answer = make_toy_probe(tok, 20, seed=1)
    probes = [Probe(ids, span, answer, length=len(ids), depth=0.0, needle_id="toy")]
    args = {"ks": [2], "seeds": 1, **kwargs}
    with pytest.raises((ConfigError, TypeError), match=match):
        mask_sweep(model, probes, _scores(), **args)
    with pytest.raises((ConfigError, TypeError), match=match):
        sweep_masks(_scores(), **args)


def test_niah_sweep_refuses_bad_arguments_before_compute(toy_model, no_engine):
    model, tok = toy_model
    ids, span, answer = make_toy_probe(tok, 20, seed=1)
    probes = [Probe(ids, span, answer, length=len(ids), depth=0.0, needle_id="toy")]
    with pytest.raises(ConfigError, match="non-empty sequence of Mask"):
        niah_sweep(model, probes, masks=[])
    with pytest.raises(ConfigError, match="unique"):
        niah_sweep(model, probes, masks=[Mask.none(), Mask.none()])
    with pytest.raises(ConfigError, match="outside this model"):
        niah_sweep(model, probes, masks=[Mask(((5, 0),), label="bad")])
    with pytest.raises((ConfigError, TypeError), match="NIAHConfig"):
        niah_sweep(model, probes, config={"max_new_tokens": 8})
    with pytest.raises(ConfigError, match="scores are for a 3x4 model"):
        mask_sweep(model, probes, _scores(3, 4), ks=[1])
    with pytest.raises(ConfigError, match="max_new_tokens"):
        NIAHConfig(max_new_tokens=0)
    with pytest.raises(ConfigError, match="success_threshold"):
        NIAHConfig(success_threshold=1.5)


def test_sweep_masks_exclude_retrieval_heads_from_random_draws():
    masks = sweep_masks(_scores(), ks=[0, 3], seeds=[4, 7])
    assert [m.label for m in masks] == ["none", "top-3", "random-3-s4", "random-3-s7"]
    assert masks[1].heads[0] == (1, 2) or (1, 2) in masks[1].heads
    for m in masks[2:]:
        assert not set(m.heads) & set(masks[1].heads) and len(m.heads) == 3


def _sweep_result() -> MaskSweepResult:
    records = []
    for label, recall in (("none", 1.0), ("top-1", 0.0), ("random-1-s0", 1.0), ("random-1-s1", 0.5)):
        for depth in (0.0, 50.0):
            records.append({"key": f"d{depth:g}", "probe": f"d{depth:g}", "mask": label,
                            "length": 400, "depth": depth, "needle_id": "n", "question": "q",
                            "expected": "amber", "response": "amber" if recall else "blue",
                            "rouge_recall": recall, "score": 100 * recall,
                            "answer_class": "correct" if recall > 0.5 else "hallucination"})
    masks = {label: {"heads": [], "mode": "uniform", "phase": "decode", "label": label}
             for label in ("none", "top-1", "random-1-s0", "random-1-s1")}
    niah = NIAHResult(records=records, masks=masks, model_name="toy",
                      config=NIAHConfig(max_new_tokens=8))
    return MaskSweepResult(ks=[0, 1], niah=niah, seeds=[0, 1])


def test_mask_sweep_result_saves_and_loads(tmp_path):
    sweep = _sweep_result()
    sweep.save(tmp_path / "s")
    back = MaskSweepResult.load(tmp_path / "s")
    assert back.ks == [0, 1] and back.seeds == [0, 1]
    assert back.niah.records == sweep.niah.records
    assert isinstance(back.niah.config, NIAHConfig) and back.niah.config.max_new_tokens == 8
    curve = back.curve()
    assert curve["top"] == [100.0, 0.0]
    assert curve["random_mean"] == [100.0, 75.0] and curve["random"][1] == [100.0, 50.0]
    assert back.k_below(50.0) == 1
    written = save_mask_sweep_run(tmp_path / "run", sweep)
    assert written["k_curve"].exists() and written["heatmaps"].exists()
    assert read_run(tmp_path / "run").sweep.curve() == curve


def test_mask_sweep_result_refuses_missing_masks():
    sweep = _sweep_result()
    with pytest.raises(ConfigError, match="random-1-s2"):
        MaskSweepResult(ks=[0, 1], niah=sweep.niah, seeds=[0, 2])
    with pytest.raises(ConfigError, match="at least one random seed"):
        MaskSweepResult(ks=[0, 1], niah=sweep.niah, seeds=[])


@pytest.mark.parametrize(("response", "reference", "expected"), [
    ("北京烤鸭", "北京烤鸭", "correct"),
    ("上海小笼包很好吃", "北京烤鸭", "hallucination"),
    ("Η απάντηση είναι Αθήνα", "Αθήνα", "correct"),
    ("Η απάντηση είναι Σπάρτη", "Αθήνα", "hallucination"),
])
def test_answer_classes_in_any_script(response, reference, expected):
    """Non-Latin answers were all 'degenerate' (words were [A-Za-z] only)."""
    assert classify_answer(response, reference) == expected
