"""Issue 28: a notebook resuming score families or a KV budget sweep with ``out=`` gets every
resumed record checked before any answer, as the CLI checks the log before the weights load."""

from __future__ import annotations

import json

import pytest
import torch

import rhlens.compress.sweep as compress_module
import rhlens.families.compute as families_module
import rhlens.store.logs as logs
from rhlens.compress import CompressConfig, compress_sweep
from rhlens.errors import ConfigError
from rhlens.families import FamiliesConfig, score_families
from rhlens.probes.probe import Probe
from rhlens.store.layout import COMPRESS_LOG, FAMILIES_LOG

from toy import make_toy_probe


@pytest.fixture
def probes(toy_model):
    _, tok = toy_model
    ids, span, answer = make_toy_probe(tok, 60, seed=3)
    return [Probe(ids, span, answer, length=70, depth=0.0, needle_id="toy")]


@pytest.fixture
def nothing_runs(monkeypatch):
    """The run's header is taken as matching; any generation fails the test."""
    monkeypatch.setattr(logs, "check_resume", lambda *a, **k: None)

    def generate_many(*a, **k):
        raise AssertionError("an answer was generated before the records were checked")

    for module in (families_module, compress_module):
        monkeypatch.setattr(module, "generate_many", generate_many)


def test_score_families_names_a_malformed_resumed_record(toy_model, probes, tmp_path, nothing_runs):
    model, tok = toy_model
    bad = {"key": probes[0].key, "success": True, "rouge_recall": 1.0, "response": "x",
           "copy": [[0.0] * 3, [0.0] * 4]}  # layer 0 has 3 heads of 4
    (tmp_path / FAMILIES_LOG).write_text(json.dumps(bad) + "\n")
    with pytest.raises(ConfigError, match=r"families.jsonl: the score-families record .* is malformed"):
        score_families(model, probes, config=FamiliesConfig(families=("copy",)), tokenizer=tok,
                       out=tmp_path)


def test_compress_sweep_names_a_malformed_resumed_record(toy_model, probes, tmp_path, nothing_runs):
    model, tok = toy_model
    bad = {"key": f"full|{probes[0].key}", "mask": "full", "probe": probes[0].key, "response": "x",
           "rouge_recall": 1.0, "score": float("nan")}
    (tmp_path / COMPRESS_LOG).write_text(json.dumps(bad) + "\n")
    with pytest.raises(ConfigError, match=r"compress.jsonl: the NIAH record .* is malformed"):
        compress_sweep(model, probes, {"retrieval": torch.rand(2, 4)}, budgets=(0.5,), seeds=1,
                       streaming=False, config=CompressConfig(sink=2, window=8), tokenizer=tok, out=tmp_path)
