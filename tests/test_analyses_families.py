"""Every analysis on a family with another attention layout: a tiny random-weight Gemma-3 (text)
folder (a sliding-window layer of 16 tokens and a global layer, per-head q/k norms, sandwich
norms), through the commands a user types, and two checks against independent computations:
the KV cache's bytes as HF holds them, and head patching as plain full forwards."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_families import make_tiny_model

from rhlens.cli import main

from oracle import naive_z_patch

GRID = ["--lengths", "400", "--depths", "50", "--n-needles", "1", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    from rhlens.models import load_tokenizer

    return make_tiny_model("gemma3", tmp_path_factory.mktemp("gemma3"), load_tokenizer())


@pytest.fixture(scope="module")
def detect_run(gemma3, tmp_path_factory):
    """A detection run of the tiny Gemma-3; a random model answers no probe, so the masks of
    the analyses below read a copy of it whose probe counts as answered, with varied scores."""
    import dataclasses

    from rhlens import load_result
    from rhlens.runs import save_detection_run

    root = tmp_path_factory.mktemp("runs")
    assert main(["detect", "--model", str(gemma3), *GRID, "--max-new-tokens", "6",
                 "--out", str(root / "detect")]) == 0
    scores = load_result(root / "detect" / "scores")
    assert scores.per_probe.shape[1:] == (2, 4) and scores.n_successful == 0
    ranked = torch.zeros(1, 2, 4)
    ranked[0, 1, 2], ranked[0, 0, 1], ranked[0, 1, 0] = 0.6, 0.3, 0.05  # two retrieval heads (> 0.1)
    save_detection_run(root / "ranked", dataclasses.replace(scores, per_probe=ranked,
                                                          success=torch.ones(1, dtype=torch.bool)))
    return root / "ranked"


def test_every_analysis_runs_on_gemma3(gemma3, detect_run, tmp_path):
    m = ["--model", str(gemma3)]
    scores = ["--scores", str(detect_run)]
    assert json.loads((detect_run / "summary.json").read_text())
    assert main(["niah", *m, *GRID, *scores, "--mask", "top:2", "--max-new-tokens", "6",
                 "--out", str(tmp_path / "niah")]) == 0
    assert main(["patch", *m, *GRID, *scores, "--layers", "0,1", "--top", "2",
                 "--out", str(tmp_path / "patch")]) == 0
    assert (tmp_path / "patch" / "patching.jsonl").exists()
    assert main(["cot", *m, "--task", "arithmetic", "--n-items", "1", "--k", "2", "--seeds", "1", *scores,
                 "--max-new-tokens-cot", "8", "--max-new-tokens-direct", "4", "--device", "cpu", "--quiet",
                 "--out", str(tmp_path / "cot")]) == 0
    assert main(["compress", *m, *GRID, *scores, "--budgets", "0.9", "--sink", "2", "--window", "8",
                 "--seeds", "1", "--out", str(tmp_path / "compress")]) == 0
    assert main(["scores", *m, *GRID, "--family", "copy,mass", "--max-new-tokens", "6",
                 "--out", str(tmp_path / "scores")]) == 0
    runs = [str(detect_run), *(str(tmp_path / d) for d in ("niah", "patch", "cot", "compress", "scores"))]
    assert main(["report", *runs, "--out", str(tmp_path / "report.html")]) == 0
    assert (tmp_path / "report.html").stat().st_size > 1000


def test_gemma3_cache_layout_counts_what_hf_holds(gemma3):
    """The sliding layer holds its window, the global layer every token: the layout's bytes
    equal the bytes of HF's own cache after a forward of the context."""
    from transformers import AutoModelForCausalLM

    from rhlens.compress import CacheLayout
    from rhlens.models import load_model

    model, _ = load_model(str(gemma3), device="cpu")
    layout = CacheLayout.of(model)
    assert layout.sliding == (16, None)
    hf = AutoModelForCausalLM.from_pretrained(str(gemma3), dtype=torch.float32)
    for context in (10, 16, 17, 100):
        with torch.no_grad():
            cache = hf(input_ids=torch.arange(300, 300 + context)[None], use_cache=True).past_key_values
        held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
        assert layout.full_bytes(context) == held, context


def test_gemma3_head_patching_matches_full_forwards(gemma3):
    """Exact head patching (a prefix KV cache, then the answer rows through the bridge) on a
    prompt far longer than the sliding window equals a naive patch of full bridge forwards."""
    from rhlens.models import load_model
    from rhlens.patching import PatchConfig, make_pairs, patch_heads
    from rhlens.probes import BUILTIN_NEEDLES, ProbeConfig, build_probes

    model, tok = load_model(str(gemma3), device="cpu")
    probes = build_probes(tok, config=ProbeConfig(lengths=(400,), depths=(50,)), needles=[BUILTIN_NEEDLES[1]])
    pair = make_pairs(tok, probes)[0]
    result = patch_heads(model, [pair], config=PatchConfig(mode="exact", layers=(0, 1)))
    for (layer, head), want in naive_z_patch(model, pair, (0, 1), 4).items():
        assert result.patched[0, layer, head].item() == pytest.approx(want, abs=1e-4), (layer, head)
