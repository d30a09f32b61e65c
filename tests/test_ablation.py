"""Head ablation changes exactly the targeted heads, and knocks out retrieval."""

from __future__ import annotations

import pytest
import torch

from rhlens.ablation import Mask, ablate_heads, head_means, random_heads
from rhlens.errors import ConfigError
from rhlens.niah import classify_answer, niah_sweep, sweep_masks
from rhlens.probe import Probe
from rhlens.retrieval import DetectConfig, detect_retrieval_heads

from toy import make_toy_probe

PATTERNS = lambda name: name.endswith(("hook_pattern", "hook_z"))  # noqa: E731


@pytest.fixture(scope="module")
def tokens(default_model):
    _, tok = default_model
    return torch.tensor([tok("The cat sat on the mat. The dog sat on the rug.",
                             add_special_tokens=False)["input_ids"]])


def test_uniform_mask_makes_the_head_attend_uniformly_and_nothing_else(default_model, tokens):
    model, _ = default_model
    _, clean = model.run_with_cache(tokens, names_filter=PATTERNS)
    with ablate_heads(model, [(3, 4)], mode="uniform", phase="all"):
        _, masked = model.run_with_cache(tokens, names_filter=PATTERNS)
    T = tokens.shape[1]
    uniform = torch.tril(torch.ones(T, T)) / torch.arange(1, T + 1)[:, None]
    pat, ref = masked["blocks.3.attn.hook_pattern"][0], clean["blocks.3.attn.hook_pattern"][0]
    assert torch.allclose(pat[4], uniform, atol=1e-6)
    others = [h for h in range(9) if h != 4]
    # Heads 3 and 5 share head 4's key/value head (3 KV heads): they must not move.
    assert torch.allclose(pat[others], ref[others], atol=1e-6)
    for layer in range(3):
        assert torch.equal(masked[f"blocks.{layer}.attn.hook_pattern"],
                           clean[f"blocks.{layer}.attn.hook_pattern"])


def test_zero_mask_zeroes_only_that_heads_output(default_model, tokens):
    model, _ = default_model
    _, clean = model.run_with_cache(tokens, names_filter=PATTERNS)
    with ablate_heads(model, [(5, 1), (5, 7)], mode="zero"):
        _, masked = model.run_with_cache(tokens, names_filter=PATTERNS)
    z, ref = masked["blocks.5.attn.hook_z"][0], clean["blocks.5.attn.hook_z"][0]
    assert z[:, [1, 7]].abs().max() == 0
    keep = [h for h in range(9) if h not in (1, 7)]
    assert torch.equal(z[:, keep], ref[:, keep])
    assert ref[:, [1, 7]].abs().max() > 0


def test_mean_mask_writes_the_reference_mean(default_model, tokens):
    model, tok = default_model
    means = head_means(model, tok, ["A short reference text.", "Another one, a bit longer."])
    assert means.shape == (30, 9, 64)
    with ablate_heads(model, [(2, 0)], mode="mean", means=means):
        _, masked = model.run_with_cache(tokens, names_filter=PATTERNS)
    z = masked["blocks.2.attn.hook_z"][0, :, 0]
    assert torch.allclose(z, means[2, 0].expand_as(z))
    with pytest.raises(ConfigError, match="needs means"):
        with ablate_heads(model, [(2, 0)], mode="mean"):
            pass


def test_hooks_are_gone_after_the_block_even_after_an_exception(default_model, tokens):
    model, _ = default_model
    before = model(tokens)
    with pytest.raises(RuntimeError, match="boom"):
        with ablate_heads(model, [(h // 9, h % 9) for h in range(0, 270, 7)], mode="zero"):
            raise RuntimeError("boom")
    assert all(len(hp._forward_hooks) == 0 for hp in model.hook_dict.values())
    assert torch.equal(model(tokens), before)


def test_heads_outside_the_model_are_refused(default_model):
    model, _ = default_model
    with pytest.raises(ConfigError, match="outside this model"):
        with ablate_heads(model, [(30, 0)]):
            pass
    with pytest.raises((ConfigError, TypeError)):  # TypeError: the test-time type checker
        with ablate_heads(model, ["L3H4"]):  # type: ignore[list-item]
            pass


def test_random_heads_respect_shape_exclusion_and_seed():
    a = random_heads(30, 9, 20, seed=1, exclude=[(0, 0), (1, 1)])
    assert a == random_heads(30, 9, 20, seed=1, exclude=[(0, 0), (1, 1)])
    assert a != random_heads(30, 9, 20, seed=2, exclude=[(0, 0), (1, 1)])
    assert len(set(a)) == 20 and all(0 <= la < 30 and 0 <= h < 9 for la, h in a)
    assert not {(0, 0), (1, 1)} & set(a)
    small = random_heads(2, 2, 3, seed=0, exclude=[(0, 0)])
    assert sorted(small) == [(0, 1), (1, 0), (1, 1)]
    with pytest.raises(ConfigError, match="cannot draw 4"):
        random_heads(2, 2, 4, seed=0, exclude=[(0, 0)])


def test_masking_the_known_head_breaks_the_toy_model(toy_model):
    """The toy model copies through L1H2 only: masking it must break retrieval, others not."""
    model, tok = toy_model
    probes = []
    for i, n in enumerate((30, 90)):
        ids, span, answer = make_toy_probe(tok, n, seed=7 + i)
        probes.append(Probe(ids, span, answer, length=len(ids), depth=float(i), needle_id="toy"))
    masks = [Mask.none(), Mask(((1, 2),), label="known"), Mask(((1, 0), (1, 1), (1, 3)),
                                                               label="other three")]
    result = niah_sweep(model, probes, masks=masks)
    assert result.score("none") == 100.0
    assert result.score("other three") == 100.0
    assert result.score("known") < 30.0


def test_top_k_masking_hurts_more_than_random_k_on_the_default_model(default_model, short_probes):
    """K = 5 of 270 heads (1.9%), the scale of the paper's K = 20 of 1024 heads.

    At K = 20 (7%) masking random heads of this 135M model breaks it too (both drop to
    ~12 on these probes), so the contrast is measured where random masks are still harmless.
    """
    model, tok = default_model
    probes = short_probes[:2]
    scores = detect_retrieval_heads(model, probes, config=DetectConfig(max_new_tokens=24))
    masks = sweep_masks(scores, ks=(5,), seeds=[0])
    assert [m.label for m in masks] == ["none", "top-5", "random-5-s0"]
    assert not set(masks[1].heads) & set(masks[2].heads)
    result = niah_sweep(model, probes, masks=masks, config=_short())
    base, top, rnd = (result.score(m.label) for m in masks)
    assert base > 60
    assert top < rnd - 30, result.table()
    for r in result.for_mask("top-5"):
        assert r["answer_class"] != "correct" or r["rouge_recall"] > 0.5


def _short():
    from rhlens.niah import NIAHConfig

    return NIAHConfig(max_new_tokens=24)


@pytest.mark.parametrize(("response", "expected"), [
    ("The password is amber falcon seventeen.", "correct"),
    ("The password is amber.", "partial"),
    ("The password is blue river nine.", "hallucination"),
    ("I don't know the password.", "refusal"),
    ("", "refusal"),
    ("------------------", "degenerate"),
    ("the the the the the the", "degenerate"),
])
def test_answer_classes(response, expected):
    assert classify_answer(response, "amber falcon seventeen") == expected
