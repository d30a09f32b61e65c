"""The causal judgement on hand-made curves, the damage sweep's masks, save/load of every families result."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rhlens.errors import ConfigError
from rhlens.families import (
    DamageResult,
    FamiliesConfig,
    FamilyScores,
    FamilySet,
    curve_auc,
    damage_masks,
    k_to_halve,
)
from rhlens.niah import NIAHResult
from rhlens.results import load_result
from rhlens.retrieval import DetectConfig
from rhlens.scores import RetrievalScores


# ---- K to halve and the AUC ----------------------------------------------------------------------
def test_k_to_halve_interpolates_between_the_ks_tried():
    ks = [0, 1, 2, 5, 10, 20]
    # 60 at K=2, 40 at K=5: half of 100 is (60 - 50) / (60 - 40) = 0.5 of the way, K = 3.5.
    assert k_to_halve(ks, [100, 80, 60, 40, 20, 0]) == pytest.approx(3.5)
    assert k_to_halve(ks, [80, 40, 40, 0, 0, 0]) == pytest.approx(1.0)  # exactly half at K=1
    assert k_to_halve(ks, [100, 90, 90, 90, 90, 60]) == math.inf  # never halves
    assert math.isnan(k_to_halve(ks, [0, 0, 0, 0, 0, 0]))  # nothing to halve
    with pytest.raises(ConfigError, match="start at 0"):
        k_to_halve([1, 2], [10, 5])


def test_auc_is_the_mean_share_kept_over_k():
    ks = [0, 1, 2, 5, 10, 20]
    curve = [100, 80, 60, 40, 20, 0]
    # Trapezoids of the relative curve [1, .8, .6, .4, .2, 0] over widths [1, 1, 3, 5, 10].
    area = (1 * (1 + .8) + 1 * (.8 + .6) + 3 * (.6 + .4) + 5 * (.4 + .2) + 10 * (.2 + 0)) / 2
    assert curve_auc(ks, curve) == pytest.approx(area / 20)
    assert curve_auc(ks, [50] * 6) == pytest.approx(1.0)  # masking never hurts
    assert curve_auc([0, 10], [50, 0]) == pytest.approx(0.5)
    assert math.isnan(curve_auc(ks, [0] * 6))


# ---- masks ----------------------------------------------------------------------------------------
def test_damage_masks_run_each_head_set_once():
    a = torch.tensor([[3.0, 2.0], [1.0, 0.0]])
    b = torch.tensor([[3.0, 0.0], [1.0, 2.0]])  # agrees with a on the top-1 only
    heads, masks = damage_masks({"a": a, "b": b}, (2, 2), ks=(1, 2), seeds=2)
    assert heads["a:top-1"] == heads["b:top-1"] == [[0, 0]]
    assert heads["a:top-2"] == [[0, 0], [0, 1]] and heads["b:top-2"] == [[0, 0], [1, 1]]
    labels = [m.label for m in masks]
    assert "b:top-1" not in labels and "a:top-1" in labels and "none" in labels
    assert len({m.heads for m in masks}) == len(masks)  # distinct head sets only
    assert set(heads) == {"none", "a:top-1", "a:top-2", "b:top-1", "b:top-2", "random-1-s0",
                          "random-1-s1", "random-2-s0", "random-2-s1"}
    with pytest.raises(ConfigError, match="exceeds"):
        damage_masks({"a": a}, (2, 2), ks=(5,))
    with pytest.raises(ConfigError, match="covers"):
        damage_masks({"a": torch.zeros(3, 2)}, (2, 2), ks=(1,))
    with pytest.raises(ConfigError, match="name"):
        damage_masks({"random": a}, (2, 2), ks=(1,))


# ---- the summary on a hand-made sweep ------------------------------------------------------------
def _damage(scores: dict[str, list[float]], heads: dict[str, list[list[int]]]) -> DamageResult:
    """A DamageResult whose NIAH records give each ran mask the per-probe ``scores``."""
    ran = {label for label in heads if next(o for o, h in heads.items() if h == heads[label]) == label}
    records = [{"mask": label, "key": f"p{i}", "probe": f"p{i}", "score": s, "response": "",
                "answer_class": "correct"}
               for label in ran for i, s in enumerate(scores[label])]
    niah = NIAHResult(records=records, masks={label: {"heads": heads[label]} for label in ran},
                      model_name="hand")
    return DamageResult(niah=niah, heads=heads, rankings=["a"], ks=[1, 2], seeds=[0, 1])


HEADS = {"none": [], "a:top-1": [[0, 0]], "a:top-2": [[0, 0], [0, 1]],
         "random-1-s0": [[1, 1]], "random-1-s1": [[0, 0]],  # the same head as a:top-1: ran once
         "random-2-s0": [[1, 0], [1, 1]], "random-2-s1": [[0, 1], [1, 0]]}
SCORES = {"none": [100, 100, 80, 60], "a:top-1": [50, 40, 40, 30], "a:top-2": [0, 10, 0, 10],
          "random-1-s0": [100, 100, 80, 60], "random-2-s0": [100, 90, 80, 50],
          "random-2-s1": [90, 100, 70, 60]}


def test_damage_summary_on_a_hand_made_sweep(tmp_path):
    res = _damage(SCORES, HEADS)
    assert res.ran("random-1-s1") == "a:top-1" and res.ran("a:top-2") == "a:top-2"
    assert res.curve("a") == pytest.approx([85.0, 40.0, 5.0])
    # random-K averaged over seeds per probe: K=1 -> (s0 + a:top-1) / 2, K=2 -> (s0 + s1) / 2.
    assert res.curve("random") == pytest.approx([85.0, (85 + 40) / 2, (80 + 80) / 2])
    summary = res.summary(n_boot=200, seed=1)
    a = summary["a"]
    assert a["k_half"] == pytest.approx(k_to_halve([0, 1, 2], [85, 40, 5]))
    assert a["auc"] == pytest.approx(curve_auc([0, 1, 2], [85, 40, 5]))
    lo, hi = a["auc_ci"]
    assert lo <= a["auc"] <= hi and hi < 1
    assert summary["random"]["k_half"] == math.inf and summary["random"]["k_half_ci"][1] == math.inf
    assert a["reached_half"] == 1.0
    # save / load keeps everything the summary needs
    back = load_result(res.save(tmp_path / "damage"))
    assert isinstance(back, DamageResult) and back.summary(n_boot=200, seed=1) == summary
    with pytest.raises(ConfigError, match="lacks the masks"):
        DamageResult(niah=res.niah, heads={**HEADS, "b:top-1": [[1, 0], [0, 0]]}, rankings=["a"],
                     ks=[1, 2], seeds=[0, 1])


# ---- save / load of the families results ---------------------------------------------------------
def _family(name: str, seed: int, n_probes: int = 3) -> FamilyScores:
    g = torch.Generator().manual_seed(seed)
    return FamilyScores(per_probe=torch.rand(n_probes, 3, 2, generator=g),
                        success=torch.tensor([True, False, True][:n_probes]), model_name="m",
                        n_kv_heads=1, probes=[{"key": f"p{i}"} for i in range(n_probes)],
                        config=FamiliesConfig(detect=DetectConfig(max_new_tokens=7)), family=name)


def test_family_scores_save_and_load_as_themselves(tmp_path):
    f = _family("mass", 0)
    back = RetrievalScores.load(f.save(tmp_path / "mass"))  # any RetrievalScores reader takes it
    assert isinstance(back, FamilyScores) and back.family == "mass"
    assert torch.equal(back.per_probe, f.per_probe) and torch.equal(back.success, f.success)
    assert back.config == f.config and back.config.detect.max_new_tokens == 7
    assert back.top_heads(3) == f.top_heads(3)
    assert f.subset([0, 2]).family == "mass"
    paper = json.loads(f.to_paper_json(tmp_path / "mass.json").read_text())
    assert paper["0-1"] == [round(float(x), 6) for x in f.successful[:, 0, 1]]
    assert "FamilyScores[mass]" in repr(f)


def test_family_set_save_load_and_agreement(tmp_path):
    copy = _family("copy", 0)
    same = FamilyScores(**{**copy.__dict__, "family": "copy-paper"})
    other = _family("mass", 1)
    fs = FamilySet(families=[copy, same, other], model_name="m", needle_set="literal",
                   layer_types=["sliding", "sliding", "global"], config=copy.config)
    back = FamilySet.load(fs.save(tmp_path / "set"))
    assert back.names == ["copy", "copy-paper", "mass"] and back.layer_types == fs.layer_types
    assert back.spearman("copy", "copy-paper") == pytest.approx(1.0)
    assert back.top_overlap("copy", "copy-paper", 3) == 1.0
    share = back.layer_share("mass", 2)
    tops = back["mass"].top_heads(2)
    assert share["global"] == sum(la == 2 for la, _ in tops) / 2
    assert share["global_layers"] == pytest.approx(1 / 3)
    rows = {r["family"]: r for r in back.table(k=2)}
    assert rows["copy-paper"]["spearman_vs_copy"] == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="twice"):
        FamilySet(families=[copy, copy], model_name="m")
