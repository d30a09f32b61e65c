"""patch_heads with out=: one record per finished pair, resume after an interruption, refusal of
a changed run, every late failure checked first; and results saved by older rhlens still load."""

from __future__ import annotations

import json

import pytest
import torch
from test_patching import KNOWN, toy_pair

import rhlens.patching.heads as heads_module
from rhlens.errors import ConfigError
from rhlens.patching import (
    HeadPatchingResult,
    PatchConfig,
    PatchingVsRetrieval,
    make_pair,
    patch_heads,
)
from rhlens.results import load_result


@pytest.fixture(scope="module")
def five(toy_model):
    model, tok = toy_model
    return model, [toy_pair(tok, seed) for seed in range(5)]


def same(a: HeadPatchingResult, b: HeadPatchingResult) -> None:
    """The same numbers, bit for bit, for the same pairs."""
    for name in ("effects", "patched", "clean", "corrupted"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0, equal_nan=True)
    assert a.pairs == b.pairs


class Interrupt(BaseException):
    """What a Ctrl-C looks like to the code (not an Exception)."""


def counting(monkeypatch, name: str, stop_after: int | None = None) -> list[int]:
    """Count the pairs actually computed by ``heads_module.<name>``; stop like a Ctrl-C after
    ``stop_after`` of them."""
    real = getattr(heads_module, name)
    calls: list[int] = []

    def wrapper(model, pair, *args, **kwargs):
        if stop_after is not None and len(calls) == stop_after:
            raise Interrupt
        calls.append(1)
        return real(model, pair, *args, **kwargs)

    monkeypatch.setattr(heads_module, name, wrapper)
    return calls


@pytest.mark.parametrize(("config", "runner"), [
    (PatchConfig(), "_fast_pair"),
    (PatchConfig(activation="v", heads=[(1, 1), KNOWN], positions="all"), "_generic_pair"),
])
def test_resume_computes_only_the_missing_pairs(five, tmp_path, monkeypatch, config, runner):
    model, pairs = five
    whole = patch_heads(model, pairs, config=config, out=tmp_path / "whole")
    with monkeypatch.context() as m:
        done = counting(m, runner, stop_after=2)
        with pytest.raises(Interrupt):
            patch_heads(model, pairs, config=config, out=tmp_path / "cut")
        assert len(done) == 2
    lines = (tmp_path / "cut" / "patching.jsonl").read_text().splitlines()
    assert len(lines) == 2  # the finished pairs, on disk
    with monkeypatch.context() as m:
        rest = counting(m, runner)
        resumed = patch_heads(model, pairs, config=config, out=tmp_path / "cut")
        assert len(rest) == 3  # only the missing pairs ran
        same(resumed, whole)
        assert resumed.config == whole.config
        assert resumed.effects[:, KNOWN[0], KNOWN[1]].min() > 0.9
        # a finished run reruns nothing; a different batch size changes no number
        again = patch_heads(model, pairs, config=PatchConfig(**{**vars(config), "batch_size": 2}),
                            out=tmp_path / "cut")
        assert len(rest) == 3
        same(again, whole)


def test_a_changed_run_is_refused(five, tmp_path):
    model, pairs = five
    out = tmp_path / "run"
    patch_heads(model, pairs[:2], config=PatchConfig(layers=(1,)), out=out)
    for config, these in ((PatchConfig(layers=(1,), direction="noise"), pairs[:2]),
                          (PatchConfig(layers=(0, 1)), pairs[:2]),
                          (PatchConfig(layers=(1,)), pairs[:3]),
                          (PatchConfig(layers=(1,)), pairs[1:3])):
        with pytest.raises(ConfigError, match="other settings"):
            patch_heads(model, these, config=config, out=out)


def test_late_failures_are_checked_first(five, tmp_path, monkeypatch):
    model, pairs = five
    computed = counting(monkeypatch, "_fast_pair")
    generic = counting(monkeypatch, "_generic_pair")
    p = pairs[0]
    twin = make_pair(p.clean_ids[:p.answer_pos + 1], p.clean_ids[:p.answer_pos + 1],
                     [p.clean_token], [p.corrupted_token])
    cases = [
        ([*pairs, twin], PatchConfig(), "identical"),
        (pairs, PatchConfig(layers=(0, 2)), "layers"),
        (pairs, PatchConfig(heads=[(1, 7)]), "outside"),
        (pairs, PatchConfig(activation="k", heads=[(0, 4)]), "outside"),
        (pairs, PatchConfig(activation="v", positions=(0, 10_000)), "out of range"),
        (pairs, PatchConfig(metric="custom"), "custom"),
    ]
    for these, config, message in cases:
        with pytest.raises(ConfigError, match=message):
            patch_heads(model, these, config=config, out=tmp_path / "never")
    with pytest.raises((ConfigError, TypeError)):  # TypeError: the test-time type checker
        patch_heads(model, [*pairs, "not a pair"], out=tmp_path / "never")
    labelled = make_pair(p.clean_ids, p.corrupted_ids, p.clean_answer_ids, p.corrupted_answer_ids,
                         labels={"bad": object()})
    with pytest.raises(ConfigError, match="JSON"):
        patch_heads(model, [labelled], out=tmp_path / "never")
    assert computed == [] and generic == []
    assert not (tmp_path / "never").exists()


# ---------------------------------------------------------------------------------------
# Files written by older rhlens (schema 0), exactly as that code wrote them
# ---------------------------------------------------------------------------------------
OLD_CONFIG = {"mode": "exact", "direction": "denoise", "positions": "answer", "metric": "logit_diff",
              "layers": [1], "batch_size": None, "min_gap": 0.001}


def test_old_head_patching_result_loads(tmp_path):
    from safetensors.torch import save_file

    effects = torch.tensor([[[float("nan")] * 4, [0.0, 0.1, 0.95, 0.0]]])
    tensors = {"effects": effects, "patched": effects * 2, "clean": torch.tensor([2.0]),
               "corrupted": torch.tensor([0.0])}
    meta = {"model_name": "toy", "config": OLD_CONFIG,
            "pairs": [{"key": "toy-0", "n_tokens": 40, "answer_pos": 39}], "seconds": [0.5]}
    old = tmp_path / "patching"
    old.mkdir()
    # what rhlens._result.save_bundle wrote
    save_file(tensors, str(old / "tensors.safetensors"))
    (old / "meta.json").write_text(json.dumps({"kind": "HeadPatchingResult", **meta}, indent=1))
    back = HeadPatchingResult.load(old)
    torch.testing.assert_close(back.effects, effects, equal_nan=True)
    assert back.config == PatchConfig(layers=(1,))
    # code that read the config as a dict (the report) still can
    assert back.config.get("mode") == "exact" and back.config["layers"] == (1,)
    assert back.config.get("nothing", "?") == "?"
    assert back.pairs == meta["pairs"] and back.seconds == [0.5]
    assert back.top_heads(1) == [(1, 2)]
    # saved again, the new way, and opened by kind
    again = load_result(back.save(tmp_path / "new"))
    assert isinstance(again, HeadPatchingResult) and again.config == back.config
    assert json.loads((tmp_path / "new" / "result.json").read_text())["schema_version"] == 1


def test_old_patching_vs_retrieval_file_loads(tmp_path):
    old = {"kind": "PatchingVsRetrieval", "model_name": "toy", "scores_model_name": "toy",
           "spearman": 0.5, "pearson": float("nan"), "effect_threshold": 0.1, "score_threshold": 0.1,
           "patch_config": OLD_CONFIG,
           "causal_not_retrieval": [],
           "retrieval_not_causal": [{"layer": 0, "head": 3, "effect": 0.0, "score": 0.5}],
           "both": [{"layer": 1, "head": 2, "effect": 0.95, "score": 0.9}],
           "effect": [[None, None, None, None], [0.0, 0.1, 0.95, 0.0]],
           "score": [[0.0, 0.0, 0.0, 0.5], [0.0, 0.0, 0.9, 0.0]]}
    path = tmp_path / "patching_vs_retrieval.json"
    path.write_text(json.dumps(old, indent=1))  # what PatchingVsRetrieval.save wrote
    back = PatchingVsRetrieval.load(path)
    assert back.both == [(1, 2, 0.95, 0.9)] and back.retrieval_not_causal == [(0, 3, 0.0, 0.5)]
    assert torch.isnan(back.effect[0]).all() and back.score[1, 2] == pytest.approx(0.9)
    assert back.spearman == 0.5 and back.patch_config == PatchConfig(layers=(1,))
    again = PatchingVsRetrieval.load(back.save(tmp_path / "new"))
    assert again.both == back.both and torch.equal(again.score, back.score)
    assert again.to_dict()["both"] == old["both"]
    path.write_text(json.dumps({"kind": "Other"}))
    with pytest.raises(ValueError, match="no PatchingVsRetrieval"):
        PatchingVsRetrieval.load(path)
