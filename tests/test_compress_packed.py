"""The packed cache: streaming heads really hold sink + window keys, and answer as the mask policy does."""

from __future__ import annotations

import pytest
import torch

from rhlens.compress import CacheLayout, HeadPolicy, policy_hooks
from rhlens.compress.packed import cache_bytes, packed_cache, packed_generate
from rhlens.engine import GenerationConfig, generate, prefill
from rhlens.errors import ConfigError

from toy import make_toy_probe


def _policy(layout: CacheLayout, sink: int, window: int) -> HeadPolicy:
    # a third of the KV heads kept whole, spread over layers and over KV head indices
    heads = [h for i, h in enumerate(layout.selectable) if i % 3 == 0]
    return HeadPolicy(tuple(heads), sink, window)


def test_packed_cache_answers_as_the_mask_policy_in_float32(default_model, short_probes):
    model, tok = default_model
    layout = CacheLayout.of(model)
    assert layout.itemsize == 4  # float32
    cfg = GenerationConfig(max_new_tokens=12)
    changed = 0
    for sink, window in ((4, 28), (2, 60)):
        policy = _policy(layout, sink, window)
        for probe in short_probes[:2]:
            masked = generate(model, tok, probe.prompt_ids, config=cfg, hooks=policy_hooks(model, policy))
            (packed,) = packed_generate(model, tok, [probe.prompt_ids], policy, config=cfg)
            assert packed.response_ids == masked.response_ids, (sink, window, probe.key)
            plain = generate(model, tok, probe.prompt_ids, config=cfg)
            changed += plain.response_ids != masked.response_ids
    # not vacuous: the policies change some answers (~300-token prompts, 32-64-token windows)
    assert changed >= 1


def test_packed_cache_keeping_every_head_answers_as_the_engine(default_model, short_probes):
    model, tok = default_model
    layout = CacheLayout.of(model)
    probe = short_probes[0]
    cfg = GenerationConfig(max_new_tokens=10)
    every = HeadPolicy(tuple(layout.selectable), 4, 8)
    (packed,) = packed_generate(model, tok, [probe.prompt_ids], every, config=cfg)
    assert packed.response_ids == generate(model, tok, probe.prompt_ids, config=cfg).response_ids


def test_packed_layers_hold_only_what_the_policy_keeps(toy_model):
    model, tok = toy_model
    ids, _, _ = make_toy_probe(tok, 60, seed=2)
    sink, window, reserve = 3, 5, 4
    policy = HeadPolicy(((0, 1), (1, 2), (1, 3)), sink, window)
    cache = packed_cache(model, policy, reserve=reserve)
    prefill(model, ids, cache)
    n = len(ids)
    # keys of the plain cache, for comparison
    from rhlens.engine.bridge import new_cache

    plain = new_cache(model.original_model)
    prefill(model, ids, plain)
    for la, layer in enumerate(cache.layers):
        full = [h for h in range(4) if (la, h) in policy.full]
        stream = [h for h in range(4) if (la, h) not in policy.full]
        assert layer.full == full and layer.stream == stream
        assert layer.kf.shape == (1, len(full), n + reserve, 16)
        assert layer.ks.shape == (1, len(stream), sink + window, 16)
        keys = plain.layers[la].keys[0]  # [kv, n, d]
        assert torch.equal(layer.kf[0, :, :n], keys[full])
        # ring: position p >= sink lives in slot sink + (p - sink) % window
        for p in [*range(sink), *range(n - window, n)]:
            slot = p if p < sink else sink + (p - sink) % window
            assert torch.equal(layer.ks[0, :, slot], keys[stream, p])
    assert cache_bytes(cache) == 2 * 4 * 16 * (3 * (n + reserve) + 5 * (sink + window))
    with pytest.raises(ConfigError, match="one prefill pass"):
        prefill(model, ids[:4], cache)


def test_packed_cache_refuses_hooks(toy_model):
    model, tok = toy_model
    ids, _, _ = make_toy_probe(tok, 20, seed=1)
    policy = HeadPolicy(((1, 2),), 2, 4)
    with model.hooks(fwd_hooks=[("blocks.0.attn.hook_pattern", lambda p, hook=None: None)]):
        with pytest.raises(ConfigError, match="fires no TransformerLens hooks"):
            next(packed_generate(model, tok, [ids], policy))
