"""Per-activation patching (rhlens.patching.patch_activation and patch_heads' generic path),
checked against TransformerLens' own patching functions and a known-answer toy model.

The toy model's copy head L1H2 reads the needle at the same positions in the clean and the
corrupted run (only the needle's value words differ), so its whole effect must go through
what it moves (v, ov, z) and none through where it looks (q, k, pattern).
"""

from __future__ import annotations

import pandas as pd
import pytest
import torch
import transformer_lens.patching as tlp
from test_patching import KNOWN, toy_pair

from rhlens.errors import ConfigError
from rhlens.patching import PatchConfig, PatchPair, make_pair, patch_activation, patch_heads

TL_ALL_POS = {
    "z": tlp.get_act_patch_attn_head_out_all_pos,
    "q": tlp.get_act_patch_attn_head_q_all_pos,
    "k": tlp.get_act_patch_attn_head_k_all_pos,
    "v": tlp.get_act_patch_attn_head_v_all_pos,
    "pattern": tlp.get_act_patch_attn_head_pattern_all_pos,
}


def logit_diff(pair: PatchPair):
    def metric(logits):
        return (logits[:, pair.answer_pos, pair.clean_token]
                - logits[:, pair.answer_pos, pair.corrupted_token])

    return metric


@pytest.fixture(scope="module")
def toy_run(toy_model):
    model, tok = toy_model
    pair = toy_pair(tok, 0)
    clean_logits, cache = model.run_with_cache(torch.tensor([pair.clean_ids]))
    return model, pair, torch.tensor([pair.corrupted_ids]), cache, clean_logits


@pytest.fixture
def forwards(toy_run):
    """Counts forwards of the toy model's HF module (to show a refusal came before compute)."""
    from rhlens.engine import hf_model

    calls = []
    handle = hf_model(toy_run[0]).register_forward_pre_hook(lambda *a: calls.append(1))
    yield calls
    handle.remove()


@pytest.mark.parametrize("activation", sorted(TL_ALL_POS))
def test_same_effects_as_transformer_lens(toy_run, activation, tmp_path):
    model, pair, corrupted, cache, clean_logits = toy_run
    metric = logit_diff(pair)
    reference = TL_ALL_POS[activation](model, corrupted, cache, lambda lg: metric(lg)[0])
    ours = patch_activation(model, corrupted, cache, metric, activation=activation,
                            clean_logits=clean_logits)
    assert ours.patched.shape == (1, 2, 4)
    assert (ours.patched[0] - reference.cpu()).abs().max() <= 1e-5
    # the known answer: the copy head moves the answer, it does not choose where to look
    effect = float(ours.effects[0][KNOWN])
    if activation in ("z", "v"):
        assert effect > 0.9
    else:
        assert abs(effect) < 0.05
    # TransformerLens' result type, normalised, is the same effect
    tl = ours.to_transformer_lens()
    assert torch.allclose(tl.normalized(ours.clean).permute(2, 0, 1), ours.effects, atol=1e-5)
    from rhlens.plotting.patching import plot_patching_heatmap

    plot_patching_heatmap(ours).savefig(tmp_path / "heatmap.png")


def test_ov_path_is_v_patching_without_grouped_queries(toy_run):
    """With one KV head per query head, the head's own pattern times the clean values is
    exactly what patching its values gives."""
    model, pair, corrupted, cache, clean_logits = toy_run
    metric = logit_diff(pair)
    ov = patch_activation(model, corrupted, cache, metric, activation="ov")
    v = patch_activation(model, corrupted, cache, metric, activation="v")
    assert torch.allclose(ov.patched, v.patched, atol=1e-5)
    # pattern + ov together rebuild the head's clean output: the same as patching z
    both = patch_activation(model, corrupted, cache, metric, activation="pattern+ov")
    z = patch_activation(model, corrupted, cache, metric, activation="z")
    assert torch.allclose(both.patched, z.patched, atol=1e-4)


def test_result_is_z_through_w_o(toy_run):
    model, pair, corrupted, _, clean_logits = toy_run
    metric = logit_diff(pair)
    model.set_use_attn_result(True)
    try:
        _, cache = model.run_with_cache(torch.tensor([pair.clean_ids]))
    finally:
        model.set_use_attn_result(False)
    result = patch_activation(model, corrupted, cache, metric, activation="result")
    z = patch_activation(model, corrupted, cache, metric, activation="z")
    assert torch.allclose(result.patched, z.patched, atol=1e-4)
    assert model.cfg.use_attn_result is False  # switched on for the runs only
    # and over pairs, where rhlens caches the source run itself
    config = PatchConfig(activation="result", positions="all")
    by_result = patch_heads(model, [pair], config=config)
    by_z = patch_heads(model, [pair], config=PatchConfig(positions="all"))
    assert torch.allclose(by_result.patched, by_z.patched, atol=1e-4)
    assert model.cfg.use_attn_result is False


def test_positions(toy_run):
    model, pair, corrupted, cache, clean_logits = toy_run
    metric = logit_diff(pair)
    span = [i for i, (a, b) in enumerate(zip(pair.clean_ids, pair.corrupted_ids)) if a != b]
    kw = dict(activation="v", heads=[KNOWN], clean_logits=clean_logits)
    needle = patch_activation(model, corrupted, cache, metric, positions=span, **kw)
    elsewhere = [p for p in range(pair.n_tokens) if p not in span]
    rest = patch_activation(model, corrupted, cache, metric, positions=elsewhere, **kw)
    assert needle.effects[0][KNOWN] > 0.9  # the copy head reads the needle's values...
    assert abs(float(rest.effects[0][KNOWN])) < 0.1  # ...and nothing else
    assert torch.isnan(needle.effects[0, 0]).all()  # cells not patched
    # a pair's answer positions, given as the pair or as a list, are the same patch
    by_pair = patch_activation(model, corrupted, cache, metric, activation="z", positions=pair)
    listed = patch_activation(model, corrupted, cache, metric, activation="z",
                              positions=list(range(pair.answer_pos, pair.n_tokens)))
    assert torch.equal(by_pair.patched, listed.patched)


@pytest.mark.parametrize("activation", ["q", "k", "v", "pattern", "ov", "q+k"])
def test_pairs_path_matches_the_cache_path(toy_run, activation):
    """patch_heads' per-activation runs (SDPA where no pattern is needed, logits kept at the
    answer only) give the numbers of full bridge forwards from a user's cache."""
    model, pair, corrupted, cache, clean_logits = toy_run
    ours = patch_heads(model, [pair], config=PatchConfig(activation=activation, positions="all"))
    ref = patch_activation(model, corrupted, cache, logit_diff(pair), activation=activation,
                           clean_logits=clean_logits)
    assert torch.allclose(ours.patched, ref.patched, atol=1e-4)
    assert torch.allclose(ours.clean, ref.clean, atol=1e-4)
    assert torch.allclose(ours.effects, ref.effects, atol=1e-3, equal_nan=True)


def test_pairs_path_noise_and_answer_positions(toy_run):
    model, pair, *_ = toy_run
    for direction in ("denoise", "noise"):
        fast = patch_heads(model, [pair], config=PatchConfig(direction=direction))  # z, answer
        listed = PatchConfig(direction=direction, positions=(pair.answer_pos,))
        generic = patch_heads(model, [pair], config=listed)
        assert torch.allclose(fast.patched, generic.patched, atol=1e-4)
        assert generic.effects[0][KNOWN] > 0.9


def test_grouped_query_heads_on_the_default_model(default_model):
    """SmolLM2: 9 query heads share 3 KV heads. k/v alone are indexed by KV head (as in
    TransformerLens); ov maps each query head to its own KV head."""
    model, tok = default_model
    ids = tok("The key to the red door is under the old blue teapot in the hall.",
              add_special_tokens=False)["input_ids"]
    other = tok("The key to the red door is under the old green teapot in the hall.",
                add_special_tokens=False)["input_ids"]
    assert len(ids) == len(other)
    pair = make_pair(ids, other, [5], [6])  # any two tokens: the metric only has to be defined
    clean, corrupted = torch.tensor([pair.clean_ids]), torch.tensor([pair.corrupted_ids])
    clean_logits, cache = model.run_with_cache(clean)
    metric = logit_diff(pair)
    layer = 3
    for kv in (0, 2):
        index = pd.DataFrame({"layer": [layer], "head": [kv]})
        ref = tlp.generic_activation_patch(model, corrupted, cache, lambda lg: metric(lg)[0],
                                           tlp.layer_head_vector_patch_setter, "v", index_df=index)
        ours = patch_activation(model, corrupted, cache, metric, activation="v", heads=[(layer, kv)])
        assert ours.patched.shape == (1, 30, 3)
        assert abs(float(ours.patched[0, layer, kv]) - float(ref[0])) <= 1e-4
    # patching a run with its own values through its own pattern changes nothing: the
    # einsum rebuilds z exactly when each query head reads its own KV head (h // 3)
    own_logits, own = model.run_with_cache(corrupted)
    heads = [(layer, h) for h in range(9)]
    same = patch_activation(model, corrupted, own, metric, activation="ov", heads=heads)
    base = float(metric(own_logits.detach())[0])
    assert (same.patched[0, layer] - base).abs().max() < 1e-4
    # while another run's values do change it
    moved = patch_activation(model, corrupted, cache, metric, activation="ov", heads=heads)
    assert (moved.patched[0, layer] - base).abs().max() > 1e-4
    with pytest.raises(ConfigError, match="3 KV heads"):
        patch_activation(model, corrupted, cache, metric, activation="k", heads=[(0, 5)])


def test_refused_before_any_compute(toy_run, forwards):
    model, pair, corrupted, cache, _ = toy_run
    metric = logit_diff(pair)
    cases = [
        (dict(activation="x"), "unknown activation"),
        (dict(activation="q+q"), "twice"),
        (dict(layers=[2]), "layers"),
        (dict(heads=[(1, 4)]), "outside"),
        (dict(positions=[0, pair.n_tokens]), "positions"),
        (dict(positions=[1, 1]), "positions"),
        (dict(activation="result"), "set_use_attn_result"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ConfigError, match=message):
            patch_activation(model, corrupted, cache, metric, **kwargs)
    partial = {k: v for k, v in cache.items() if "hook_v" not in k}
    with pytest.raises(ConfigError, match=r"lacks blocks\.0\.attn\.hook_v"):
        patch_activation(model, corrupted, partial, metric, activation="v")
    with pytest.raises(ConfigError, match="shape"):
        patch_activation(model, corrupted[:, :-1], cache, metric)
    with pytest.raises(ConfigError, match="attribution"):
        PatchConfig(mode="attribution", activation="q")
    assert forwards == []
    patch_activation(model, corrupted, cache, metric, heads=[KNOWN])  # the counter counts
    assert len(forwards) == 2  # the unpatched run and one patched run
