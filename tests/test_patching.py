"""Causal head patching (rhlens.patching) on the toy model, whose copy head is known (L1H2).

In the toy model only L1H2 of the last layer writes to the residual stream, and it copies the
needle's value words; layer 0 only prepares its keys. So patching L1H2 must carry the whole
clean-vs-corrupted difference and every other head (almost) none of it.
"""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
from torch import Tensor

from rhlens.errors import ConfigError, ProbeError
from rhlens.patching import (
    HeadPatchingResult,
    PatchConfig,
    PatchingVsRetrieval,
    PatchPair,
    compare_patching,
    make_pair,
    make_pairs,
    patch_head_set,
    patch_heads,
    patching_vs_retrieval,
)
from rhlens.scores import RetrievalScores

from toy import TOY_MODEL_DIR, VALUE_WORDS, make_toy_probe

KNOWN = tuple(json.loads((TOY_MODEL_DIR / "known_head.json").read_text())[k] for k in ("layer", "head"))


def toy_pair(tokenizer, seed: int, n_filler: int = 30) -> PatchPair:
    """The toy probe, and the same probe with every value word of the needle replaced."""
    ids, (s, e), _ = make_toy_probe(tokenizer, n_filler, seed)
    values = ids[s:e]
    pool = [v for v in tokenizer.convert_tokens_to_ids(list(VALUE_WORDS)) if v not in values]
    other = pool[seed % 5: seed % 5 + len(values)]
    return make_pair(ids, ids[:s] + other + ids[e:], values, other, labels={"key": f"toy-{seed}"})


@pytest.fixture(scope="module")
def toy(toy_model):
    model, tok = toy_model
    return model, tok, [toy_pair(tok, seed) for seed in (0, 1, 2)]


@pytest.fixture(scope="module")
def exact_answer(toy):
    model, _, pairs = toy
    return patch_heads(model, pairs, config=PatchConfig(positions="answer"))


def others(result: HeadPatchingResult) -> Tensor:
    mask = torch.ones(result.n_layers, result.n_heads, dtype=torch.bool)
    mask[KNOWN] = False
    return result.effects[:, mask]


# ---------------------------------------------------------------------------------------
# Pairs
# ---------------------------------------------------------------------------------------
def test_make_pair_aligns_and_teacher_forces():
    pair = make_pair([1, 2, 3, 4], [1, 9, 3, 4], [5, 6, 7], [5, 8, 7], response_prefix=[10, 11])
    assert pair.clean_ids == (1, 2, 3, 4, 10, 11, 5, 6)
    assert pair.corrupted_ids == (1, 9, 3, 4, 10, 11, 5, 6)
    # the answers share their first token, so it is fed and the metric reads the second
    assert pair.first_diff == 1 and pair.answer_pos == 6
    assert (pair.clean_token, pair.corrupted_token) == (6, 8)
    assert pair.targets == (6, 7) and pair.n_answer == 2
    assert PatchPair.from_dict(pair.to_dict()) == pair
    with pytest.raises(ProbeError, match="equal lengths"):
        make_pair([1, 2, 3], [1, 2], [5], [6])
    with pytest.raises(ProbeError, match="no differing token"):
        make_pair([1, 2], [1, 3], [5, 6], [5, 6])


def test_builtin_pairs_differ_only_in_the_needle(default_model):
    _, tok = default_model
    from rhlens.probes import BUILTIN_NEEDLES, ProbeConfig, build_probes

    config = ProbeConfig(lengths=(400,), depths=(50.0,), answer_buffer=100)
    swaps = make_pairs(tok, config)
    assert len(swaps) == 4
    for pair in swaps:
        region = pair.labels["needle_region"]
        diff = [i for i, (a, b) in enumerate(zip(pair.clean_ids, pair.corrupted_ids)) if a != b]
        assert diff and region[0] <= diff[0] and diff[-1] < region[1]
        assert pair.corrupted_token != pair.clean_token
        # the reply restates the needle up to the answer: "... is" -> first answer token
        prefix = tok.decode(list(pair.clean_ids[pair.answer_pos - 3: pair.answer_pos + 1]))
        assert prefix.split()[-1] in ("is", "to", "hidden"), prefix
        s0, s1 = pair.labels["needle_span"]
        assert tok.decode(list(pair.corrupted_ids[s0:s1])).strip() == pair.labels["corrupted_answer"]
    removed = make_pairs(tok, config, kind="remove")
    for pair, swap in zip(removed, swaps):
        assert pair.n_tokens == swap.n_tokens and pair.corrupted_token is None
    with pytest.raises(ProbeError, match="alternative"):
        make_pairs(tok, config, alternatives={"orlen-key": ["x"]})
    # without a corrupted answer only the log-prob metric is defined; said before any compute
    model, _ = default_model
    with pytest.raises(ConfigError, match="logprob"):
        patch_heads(model, removed[:1], config=PatchConfig(metric="logit_diff"))
    # with the model: its own reply up to the answer, and the corrupted run's own prediction
    answered = ProbeConfig(lengths=(500,), depths=(50.0,), answer_buffer=100)  # one it answers
    probe = build_probes(tok, config=answered, needles=[BUILTIN_NEEDLES[1]]).probes
    (own,) = make_pairs(tok, probe, kind="remove", answer_prefix="model", model=model)
    assert own.labels["answer_prefix"] == "model"
    assert own.corrupted_token is not None and own.corrupted_token != own.clean_token
    assert tok.decode([own.clean_token]).strip() == "amber"


# ---------------------------------------------------------------------------------------
# Exact patching
# ---------------------------------------------------------------------------------------
def test_known_head_carries_the_answer(exact_answer):
    effects = exact_answer.effects
    assert (effects[:, KNOWN[0], KNOWN[1]] > 0.9).all()
    assert others(exact_answer).abs().max() < 0.05
    assert exact_answer.top_heads(1) == [KNOWN]
    assert (exact_answer.clean > exact_answer.corrupted).all()


@pytest.mark.parametrize("positions", ["all", "answer"])
def test_noising_and_all_positions(toy, positions):
    model, _, pairs = toy
    for direction in ("denoise", "noise"):
        r = patch_heads(model, pairs, config=PatchConfig(positions=positions, direction=direction))
        assert (r.effects[:, KNOWN[0], KNOWN[1]] > 0.9).all(), (positions, direction)
        # the other heads of the last layer write nothing, so they can carry nothing
        silent = [h for h in range(r.n_heads) if h != KNOWN[1]]
        assert r.effects[:, KNOWN[0], silent].abs().max() < 1e-3


@pytest.mark.parametrize(("positions", "metric"),
                         [("all", "logit_diff"), ("answer", "logit_diff"), ("answer", "logprob")])
def test_all_heads_restore_clean_none_leave_corrupted(toy, positions, metric):
    model, _, pairs = toy
    every = [(la, h) for la in range(2) for h in range(4)]
    for direction, full in (("denoise", 1.0), ("noise", 0.0)):
        config = PatchConfig(positions=positions, direction=direction, metric=metric)
        assert torch.allclose(patch_head_set(model, pairs, every, config=config),
                              torch.full((3,), full), atol=1e-3)
        assert torch.allclose(patch_head_set(model, pairs, [], config=config),
                              torch.full((3,), 1.0 - full), atol=1e-3)
    denoise = patch_head_set(model, pairs, [KNOWN], config=PatchConfig(positions=positions,
                                                                      metric=metric))
    assert (denoise > 0.9).all()


def test_matches_transformer_lens_generic_patching(toy):
    """Same numbers as TransformerLens' one-forward-per-head reference (bridge forward)."""
    from transformer_lens.patching import get_act_patch_attn_head_out_all_pos

    model, _, pairs = toy
    pair = pairs[0]
    _, cache = model.run_with_cache(torch.tensor([pair.clean_ids]),
                                    names_filter=lambda name: name.endswith("hook_z"))

    def metric(logits):
        return (logits[0, pair.answer_pos, pair.clean_token]
                - logits[0, pair.answer_pos, pair.corrupted_token])

    reference = get_act_patch_attn_head_out_all_pos(model, torch.tensor([pair.corrupted_ids]),
                                                    cache, metric)
    ours = patch_heads(model, [pair], config=PatchConfig(positions="all"))
    assert torch.allclose(ours.patched[0], reference.cpu(), atol=1e-3)


def test_batching_does_not_change_results(toy, exact_answer):
    model, _, pairs = toy
    for batch in (1, 5, 8):
        r = patch_heads(model, pairs, config=PatchConfig(positions="answer", batch_size=batch))
        assert torch.allclose(r.patched, exact_answer.patched, atol=1e-4)
    all1 = patch_heads(model, pairs[:1], config=PatchConfig(positions="all", batch_size=1))
    all8 = patch_heads(model, pairs[:1], config=PatchConfig(positions="all", batch_size=8))
    assert torch.allclose(all1.patched, all8.patched, atol=1e-4)


def test_layers_subset_leaves_others_nan(toy):
    model, _, pairs = toy
    r = patch_heads(model, pairs[:1], config=PatchConfig(layers=(1,)))
    assert torch.isnan(r.effects[:, 0]).all() and torch.isfinite(r.effects[:, 1]).all()
    assert r.top_heads(1) == [KNOWN]
    with pytest.raises(ConfigError, match="layers"):
        patch_heads(model, pairs[:1], config=PatchConfig(layers=(5,)))


# ---------------------------------------------------------------------------------------
# Attribution patching
# ---------------------------------------------------------------------------------------
def test_attribution_agrees_with_exact(toy, exact_answer):
    model, _, pairs = toy
    attr = patch_heads(model, pairs, config=PatchConfig(mode="attribution", positions="answer"))
    stats = compare_patching(exact_answer, attr, k=3, min_effect=0.01)
    assert stats["spearman"] > 0.8
    assert stats["sign_agreement"] == 1.0
    assert attr.top_heads(1) == [KNOWN]
    # Per pair the linear estimate can miss badly (here the copy head dominates the final
    # RMSNorm, so the metric is far from linear in its z): the mean is what agrees.
    assert attr.mean[KNOWN] > 0.1
    # unpatched runs are the same runs in both modes
    assert torch.allclose(attr.corrupted, exact_answer.corrupted, atol=1e-3)


# ---------------------------------------------------------------------------------------
# Results, comparison with retrieval scores, figures, CLI
# ---------------------------------------------------------------------------------------
def test_result_roundtrip_and_views(tmp_path, exact_answer):
    exact_answer.save(tmp_path / "r")
    back = HeadPatchingResult.load(tmp_path / "r")
    assert torch.equal(back.effects, exact_answer.effects)
    assert back.config == exact_answer.config and back.pairs == exact_answer.pairs
    df = back.to_dataframe()
    assert (df.loc[0, "layer"], df.loc[0, "head"]) == KNOWN and len(df) == 8
    tl = back.to_transformer_lens()
    normalised = tl.normalized(back.clean)  # [layer, head, pair]
    assert torch.allclose(normalised.permute(2, 0, 1), back.effects, atol=1e-5)
    assert tl.stderr().shape == (2, 4)


def test_patching_vs_retrieval_and_figures(tmp_path, exact_answer):
    per_probe = torch.zeros(4, 2, 4)
    per_probe[:, 1, 2] = 0.9  # the copy head is also the retrieval head...
    per_probe[:, 0, 3] = 0.5  # ...and one head copies without mattering
    scores = RetrievalScores(per_probe=per_probe, success=torch.ones(4, dtype=torch.bool),
                             model_name="toy")
    cmp = patching_vs_retrieval(exact_answer, scores)
    assert 0 < cmp.spearman <= 1 and cmp.pearson > 0.5
    assert [(la, h) for la, h, _, _ in cmp.both] == [KNOWN]
    assert [(la, h) for la, h, _, _ in cmp.retrieval_not_causal] == [(0, 3)]
    assert cmp.causal_not_retrieval == []
    back = PatchingVsRetrieval.load(cmp.save(tmp_path / "cmp.json"))
    assert math.isclose(back.spearman, cmp.spearman) and back.both == cmp.both

    from rhlens.plotting.patching import (
        plot_patching_agreement,
        plot_patching_heatmap,
        plot_patching_vs_retrieval,
    )

    for fig in (plot_patching_heatmap(exact_answer), plot_patching_vs_retrieval(cmp),
                plot_patching_agreement(exact_answer, exact_answer)):
        fig.savefig(tmp_path / "f.png")
    with pytest.raises(ConfigError, match="same model"):
        patching_vs_retrieval(exact_answer, RetrievalScores(
            per_probe=torch.zeros(1, 3, 4), success=torch.ones(1, dtype=torch.bool), model_name="x"))


def test_config_errors():
    with pytest.raises(ConfigError, match="batch_size"):
        PatchConfig(batch_size=0)
    with pytest.raises(ConfigError, match="layers"):
        PatchConfig(layers=())
    with pytest.raises((ConfigError, TypeError)):  # TypeError: the test-time type checker
        PatchConfig(mode="fast")


def test_cli_parser():
    from rhlens.patching_cli import add_patch_parser, cmd_patch

    parser = argparse.ArgumentParser()
    add_patch_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["patch", "--lengths", "400,600", "--mode", "attribution",
                              "--layers", "1,2", "--scores", "x.json", "--out", "o"])
    assert args.lengths == (400, 600) and args.layers == (1, 2) and args.func is cmd_patch
    assert (args.positions, args.direction, args.kind) == ("answer", "denoise", "swap")
