"""Head ablation changes exactly the targeted heads, and knocks out retrieval."""

from __future__ import annotations

import contextlib

import pytest
import torch

from rhlens.ablation import Mask, ablate_heads, ablation_hooks, head_means, random_heads
from rhlens.engine import GenerationConfig, generate, hf_model
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


# ---------------------------------------------------------------------------------------
# Masks outside the engine, against an independent implementation: the weights edited
# ---------------------------------------------------------------------------------------
def _projection(model, layer: int, name: str) -> torch.nn.Linear:
    for path, module in hf_model(model).named_modules():
        if (isinstance(module, torch.nn.Linear)
                and path.replace("._original_component", "") == f"model.layers.{layer}.self_attn.{name}"):
            return module
    raise AssertionError(f"no {name} in layer {layer}")


@contextlib.contextmanager
def _weights_edited(model, heads, mode: str):
    """The heads knocked out in the weights: their query rows of q_proj zeroed ("uniform": a zero
    query scores every key 0, so the head attends uniformly), or their columns of o_proj
    ("zero": the head's output contributes nothing). Restored on exit."""
    d = model.cfg.d_head
    saved = []
    try:
        with torch.no_grad():
            for layer, head in heads:
                lin = _projection(model, layer, "q_proj" if mode == "uniform" else "o_proj")
                cut = (slice(head * d, (head + 1) * d), slice(None))
                if mode == "zero":
                    cut = cut[::-1]
                saved.append((lin.weight, cut, lin.weight[cut].clone()))
                lin.weight[cut] = 0
                if mode == "uniform" and lin.bias is not None:
                    saved.append((lin.bias, cut[:1], lin.bias[cut[:1]].clone()))
                    lin.bias[cut[:1]] = 0
        yield
    finally:
        with torch.no_grad():
            for tensor, cut, old in reversed(saved):
                tensor[cut] = old


def _model_and_ids(request, which):
    model, tok = request.getfixturevalue(f"{which}_model")
    if which == "toy":
        ids, _, _ = make_toy_probe(tok, 40, seed=5)
        return model, tok, ids, [(1, 2), (0, 1)]  # the copy head, and another
    ids = tok("The cat sat on the mat. The dog sat on the rug.", add_special_tokens=False)["input_ids"]
    return model, tok, ids, [(3, 4), (5, 1), (5, 7), (12, 0)]


@pytest.mark.parametrize("which", ["toy", "default"])
@pytest.mark.parametrize("mode", ["uniform", "zero"])
def test_masks_under_run_with_hooks_equal_edited_weights(request, which, mode):
    """phase="decode" masks act on every forward outside the engine (run_with_hooks, model.hooks)."""
    model, _, ids, heads = _model_and_ids(request, which)
    x = torch.tensor([ids])
    with torch.no_grad():
        clean = model(x)
        with _weights_edited(model, heads, mode):
            edited = model(x)
        hooked = model.run_with_hooks(x, fwd_hooks=ablation_hooks(model, heads, mode=mode))
        with ablate_heads(model, heads, mode=mode):
            under = model(x)
    assert torch.equal(hooked, edited)  # exact: the knocked-out terms are zeros either way
    assert torch.equal(under, hooked)
    assert (hooked - clean).abs().max() > 1e-2  # the mask did something


@pytest.mark.parametrize("which", ["toy", "default"])
def test_mean_mask_under_run_with_hooks_equals_a_naive_hook(request, which):
    model, tok, ids, heads = _model_and_ids(request, which)
    x = torch.tensor([ids])
    means = torch.randn(model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_head,
                        generator=torch.Generator().manual_seed(0))

    def naive(layer):
        def hook(z, hook=None):
            z = z.clone()
            for la, h in heads:
                if la == layer:
                    z[:, :, h, :] = means[la, h]
            return z

        return hook

    with torch.no_grad():
        ref = model.run_with_hooks(x, fwd_hooks=[(f"blocks.{la}.attn.hook_z", naive(la))
                                                 for la in sorted({la for la, _ in heads})])
        hooked = model.run_with_hooks(x, fwd_hooks=ablation_hooks(model, heads, mode="mean", means=means))
    assert torch.equal(hooked, ref)


@pytest.mark.parametrize("mode", ["uniform", "zero"])
def test_masks_in_generation_loops_equal_edited_weights(toy_model, mode):
    """The bridge's own generate under ablate_heads, and the engine with phase="all" masks (its
    flat edits), answer what the weight-edited model answers."""
    model, tok = toy_model
    ids, _, _ = make_toy_probe(tok, 50, seed=6)
    heads = [(1, 2), (0, 1)]
    x = torch.tensor([ids])
    config = GenerationConfig(max_new_tokens=6, stop_at_newline=False, stop_at_eos=False)

    def bridge_generate():
        return model.generate(x, max_new_tokens=6, do_sample=False, stop_at_eos=False,
                              return_type="tokens", verbose=False)[0, len(ids):].tolist()

    with _weights_edited(model, heads, mode):
        ref_bridge = bridge_generate()
        ref_engine = generate(model, tok, ids, config=config).response_ids
    with ablate_heads(model, heads, mode=mode):
        assert bridge_generate() == ref_bridge
    masked = generate(model, tok, ids, config=config,
                      hooks=ablation_hooks(model, heads, mode=mode, phase="all"))
    assert masked.response_ids == ref_engine == ref_bridge
    assert generate(model, tok, ids, config=config).response_ids != ref_engine  # the mask mattered


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
