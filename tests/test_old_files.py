"""Files written before results were saved one way still open, as the same results.

Each old file is written here exactly as the old code wrote it (``meta.json`` +
``tensors.safetensors`` bundles of ``rhlens/_result.py``, and the single JSON files of
``UniversalTable``, ``NIAHResult`` and ``MaskSweepResult``), then loaded with today's code.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from rhlens.niah import MaskSweepResult, NIAHConfig, NIAHResult
from rhlens.properties import (
    DynamicResult,
    IntrinsicResult,
    SparsityResult,
    StabilityResult,
    UniversalTable,
    dynamic,
    intrinsic,
    sparse,
    stability,
    universal,
)
from rhlens.results import load_result
from rhlens.retrieval import DetectConfig
from rhlens.runs import read_run
from rhlens.scores import RetrievalScores


def _old_bundle(directory: Path, tensors: dict[str, torch.Tensor], meta: dict, kind: str) -> Path:
    """``rhlens._result.save_bundle`` as it was."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
              str(directory / "tensors.safetensors"))
    (directory / "meta.json").write_text(json.dumps({"kind": kind, **meta}, indent=1))
    return directory


def _old_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, default=str))


def _heads(heads) -> list[list[int]]:
    return [[int(la), int(h)] for la, h in heads]


def _scores(name: str = "old") -> RetrievalScores:
    g = torch.Generator().manual_seed(0)
    per = 0.05 * torch.rand(5, 3, 4, generator=g)
    per[:, 1, 2] = 0.9
    per[::2, 2, 0] = 0.6
    return RetrievalScores(per, torch.tensor([True, True, True, True, False]), name, n_kv_heads=2,
                           probes=[{"key": f"p{i}", "length": 500, "depth": 10.0 * i}
                                   for i in range(5)],
                           config=DetectConfig(max_new_tokens=24))


def _same(a, b) -> None:
    """Field by field: tensors equal in value, everything else equal."""
    assert type(a) is type(b)
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor):
            assert torch.equal(x.to(y.dtype), y), f.name
        else:
            assert x == y, f.name


def test_old_retrieval_scores_and_detection_run(tmp_path):
    s = _scores()
    run = tmp_path / "run"
    # RetrievalScores.save of the old code: per_probe float, success as uint8, config a dict
    _old_bundle(run / "scores", {"per_probe": s.per_probe.float(), "success": s.success.to(torch.uint8)},
                {"model_name": s.model_name, "n_kv_heads": s.n_kv_heads, "probes": s.probes,
                 "config": dataclasses.asdict(s.config)}, kind="RetrievalScores")
    back = RetrievalScores.load(run / "scores")
    _same(back, s)
    assert back.success.dtype == torch.bool
    assert isinstance(back.config, DetectConfig) and back.config.max_new_tokens == 24
    assert isinstance(load_result(run / "scores"), RetrievalScores)
    assert RetrievalScores.from_any(run).top_heads(2) == s.top_heads(2)
    assert read_run(run).scores.n_probes == 5
    # an imported paper file kept {"source": "paper_json"} as its config: no detection settings
    _old_bundle(tmp_path / "paper", {"per_probe": s.per_probe, "success": s.success.to(torch.uint8)},
                {"model_name": "p", "n_kv_heads": None, "probes": [],
                 "config": {"source": "paper_json"}}, kind="RetrievalScores")
    assert RetrievalScores.load(tmp_path / "paper").config is None


def test_old_property_results(tmp_path):
    s = _scores()
    sp = sparse(s)
    _old_bundle(tmp_path / "sparse",
                {"mean": sp.mean.float(), "counts": sp.counts.long(), "fractions": sp.fractions.float(),
                 "per_layer": sp.per_layer.long(), "hist_counts": sp.hist_counts.long(),
                 "hist_edges": sp.hist_edges.float()},
                {"model_name": sp.model_name, "thresholds": list(sp.thresholds),
                 "n_probes": sp.n_probes}, kind="SparsityResult")
    back = SparsityResult.load(tmp_path / "sparse")
    assert back.thresholds == sp.thresholds and back.n_probes == sp.n_probes
    assert torch.equal(back.counts, sp.counts) and torch.allclose(back.fractions.double(), sp.fractions)

    dy = dynamic(s)
    _old_bundle(tmp_path / "dynamic", {"active_fraction": dy.active_fraction.float(),
                                       "mean": dy.mean.float()},
                {"model_name": dy.model_name, "active_threshold": dy.active_threshold,
                 "retrieval_threshold": dy.retrieval_threshold, "n_probes": dy.n_probes,
                 "always_active": _heads(dy.always_active),
                 "context_dependent": _heads(dy.context_dependent)}, kind="DynamicResult")
    _same(DynamicResult.load(tmp_path / "dynamic"), dy)

    st = stability(s, k=3, n_boot=50, repeats=3)
    _old_bundle(tmp_path / "stability",
                {"mean": st.mean.float(), "ci_low": st.ci_low.float(), "ci_high": st.ci_high.float(),
                 "steps": st.steps.long(), "jaccard_mean": st.jaccard_mean.float(),
                 "jaccard_std": st.jaccard_std.float()},
                {"model_name": st.model_name, "k": st.k, "n_boot": st.n_boot, "seed": st.seed,
                 "repeats": st.repeats, "level": st.level, "threshold": st.threshold,
                 "target": st.target, "n_probes": st.n_probes, "n_retrieval": st.n_retrieval,
                 "n_retrieval_ci": list(st.n_retrieval_ci), "top": _heads(st.top),
                 "probes_needed": st.probes_needed}, kind="StabilityResult")
    back = StabilityResult.load(tmp_path / "stability")
    _same(back, st)
    assert isinstance(back.n_retrieval_ci, tuple) and isinstance(back.top[0], tuple)

    it = intrinsic(s, _scores("other"), k=3)
    _old_bundle(tmp_path / "intrinsic", {"mean_a": it.mean_a.float(), "mean_b": it.mean_b.float()},
                {**it.summary(), "top_a": _heads(it.top_a), "top_b": _heads(it.top_b)},
                kind="IntrinsicResult")
    _same(IntrinsicResult.load(tmp_path / "intrinsic"), it)

    un = universal([s, _scores("other")])
    rows = [{"model": r.model, "n_layers": r.n_layers, "n_heads": r.n_heads,
             "n_probes": r.n_probes, "n_retrieval": r.n_retrieval,
             "top": [list(t) for t in r.top]} for r in un.rows]
    _old_json(tmp_path / "universal" / "universal.json",
              {"kind": "UniversalTable", "threshold": un.threshold, "top_k": un.top_k, "rows": rows})
    assert UniversalTable.load(tmp_path / "universal") == un


def _niah() -> NIAHResult:
    records = [{"key": "p0", "probe": "p0", "mask": label, "length": 500, "depth": 0.0,
                "needle_id": "n", "question": "q", "expected": "amber", "response": resp,
                "rouge_recall": r, "score": 100 * r, "answer_class": cls}
               for label, resp, r, cls in (("none", "amber", 1.0, "correct"),
                                           ("top-2", "blue", 0.0, "hallucination"),
                                           ("random-2-s0", "amber", 1.0, "correct"))]
    masks = {label: {"heads": [[0, 1]] if label != "none" else [], "mode": "uniform",
                     "phase": "decode", "label": label} for label in ("none", "top-2", "random-2-s0")}
    return NIAHResult(records=records, masks=masks, model_name="old", config=NIAHConfig(max_new_tokens=9))


def _old_niah_file(directory: Path, niah: NIAHResult) -> None:
    """``NIAHResult.save`` as it was: one ``niah_result.json``, the config as a dict."""
    _old_json(directory / "niah_result.json",
              {"kind": "NIAHResult", "model_name": niah.model_name, "masks": niah.masks,
               "config": dataclasses.asdict(niah.config), "records": niah.records})


def test_old_niah_and_mask_sweep(tmp_path):
    niah = _niah()
    _old_niah_file(tmp_path / "niah", niah)
    back = NIAHResult.load(tmp_path / "niah")
    _same(back, niah)
    assert isinstance(back.config, NIAHConfig) and back.config.max_new_tokens == 9

    sweep = MaskSweepResult(ks=[0, 2], niah=niah, seeds=[0])
    _old_niah_file(tmp_path / "sweep", niah)
    _old_json(tmp_path / "sweep" / "mask_sweep.json",
              {"kind": "MaskSweepResult", "ks": sweep.ks, "seeds": sweep.seeds, "curve": sweep.curve()})
    back = MaskSweepResult.load(tmp_path / "sweep")
    assert back.ks == [0, 2] and back.seeds == [0] and back.curve() == sweep.curve()
    found = read_run(tmp_path / "sweep")
    assert found.sweep is not None and found.niah is None  # the NIAH part belongs to the sweep
    assert read_run(tmp_path / "niah").niah is not None


def test_damaged_old_files_are_clear_errors(tmp_path):
    from rhlens.results import ResultError

    _old_bundle(tmp_path / "d", {"mean": torch.zeros(2, 2)}, {"model_name": "x"}, kind="DynamicResult")
    with pytest.raises(ResultError, match="lacks"):
        DynamicResult.load(tmp_path / "d")
    _old_json(tmp_path / "n" / "niah_result.json", {"kind": "NIAHResult", "records": []})
    with pytest.raises(ResultError, match="lacks"):
        NIAHResult.load(tmp_path / "n")
