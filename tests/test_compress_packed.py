"""The packed cache: streaming heads really hold sink + window keys, and answer as the mask policy
does, on the lean step and on the captured step (run eagerly on the CPU, as on a GPU before it is
captured)."""

from __future__ import annotations

import pytest
import torch

from rhlens.compress import CacheLayout, HeadPolicy, policy_hooks
from rhlens.compress import packed as packed_mod
from rhlens.compress.packed import PackedAttention, PackedDecoder, cache_bytes, packed_cache, packed_generate
from rhlens.engine import GenerationConfig, KernelPolicy, StepState, generate, phase, prefill
from rhlens.engine.lean import LeanDecoder
from rhlens.errors import ConfigError
from rhlens.retrieval import TopKeyRecorder

from toy import make_toy_probe


def _policy(layout: CacheLayout, sink: int, window: int) -> HeadPolicy:
    # a third of the KV heads kept whole, spread over layers and over KV head indices
    heads = [h for i, h in enumerate(layout.selectable) if i % 3 == 0]
    return HeadPolicy(tuple(heads), sink, window)


LEAN, CAPTURED = KernelPolicy(decode="lean"), KernelPolicy(decode="captured")


def _packed(model, tok, prompt, policy, decode: KernelPolicy, **kw):
    config = GenerationConfig(policy=decode, **kw)
    (gen,) = packed_generate(model, tok, [prompt], policy, config=config)
    assert gen.info["decode"] == decode.decode  # the step asked for ran
    return gen


def test_packed_cache_answers_as_the_mask_policy_in_float32(default_model, short_probes):
    """On both packed steps (grouped-query attention: 9 query heads on 3 KV heads a layer).

    One ring on one probe, where the policy changes the answer (so the comparison is not
    vacuous): the suite's slowest test ran 2 rings x 2 probes (16 answers) for the same check;
    rings that wrap, and sink + window longer than the prompt, are the toy model's tests below."""
    model, tok = default_model
    layout = CacheLayout.of(model)
    assert layout.itemsize == 4  # float32
    assert layout.n_heads > layout.n_kv
    cfg = GenerationConfig(max_new_tokens=12)
    policy = _policy(layout, 4, 28)
    probe = short_probes[0]
    masked = generate(model, tok, probe.prompt_ids, config=cfg, hooks=policy_hooks(model, policy))
    for step in (LEAN, CAPTURED):
        packed = _packed(model, tok, probe.prompt_ids, policy, step, max_new_tokens=12)
        assert packed.response_ids == masked.response_ids, step.decode
    # not vacuous: sink 4 + window 28 on a ~300-token prompt changes this answer
    assert generate(model, tok, probe.prompt_ids, config=cfg).response_ids != masked.response_ids


def test_packed_cache_keeping_every_head_answers_as_the_engine(default_model, short_probes):
    model, tok = default_model
    layout = CacheLayout.of(model)
    probe = short_probes[0]
    cfg = GenerationConfig(max_new_tokens=10)
    every = HeadPolicy(tuple(layout.selectable), 4, 8)
    (packed,) = packed_generate(model, tok, [probe.prompt_ids], every, config=cfg)
    assert packed.info["decode"] == "lean"  # a CPU's default
    assert packed.response_ids == generate(model, tok, probe.prompt_ids, config=cfg).response_ids
    # the captured packed step against the engine's captured step
    cap = _packed(model, tok, probe.prompt_ids, every, CAPTURED, max_new_tokens=10)
    engine = generate(model, tok, probe.prompt_ids,
                      config=GenerationConfig(max_new_tokens=10, policy=CAPTURED))
    assert engine.info["decode"] == "captured"
    assert cap.response_ids == engine.response_ids == packed.response_ids


# Toy prompts of ~10 to ~130 tokens; sink 2 + window 3 wraps the ring 8 times in 24 steps, and
# sink 4 + window 8 is longer than the shortest prompt (ring slots still unwritten at first).
_TOY_PROMPTS = ((0, 5), (20, 3), (60, 1), (120, 4))
_TOY_RINGS = ((2, 3), (4, 8))


def _toy_policies(sink: int, window: int) -> dict[str, HeadPolicy]:
    return {"some": HeadPolicy(((0, 1), (1, 2), (1, 3)), sink, window),  # the copy head (1, 2) whole
            "others": HeadPolicy(((0, 0), (0, 2), (1, 0)), sink, window),  # the copy head streaming
            "every": HeadPolicy(tuple((la, h) for la in range(2) for h in range(4)), sink, window),
            "none": HeadPolicy((), sink, window)}


def test_captured_packed_step_equals_the_lean_one_as_the_ring_wraps(toy_model):
    model, tok = toy_model
    answers = {}
    for n_filler, seed in _TOY_PROMPTS:
        ids, _, _ = make_toy_probe(tok, n_filler, seed)
        for sink, window in _TOY_RINGS:
            for name, policy in _toy_policies(sink, window).items():
                kw = {"max_new_tokens": 24, "stop_at_eos": False}  # every step runs: the ring wraps
                lean = _packed(model, tok, ids, policy, LEAN, **kw)
                cap = _packed(model, tok, ids, policy, CAPTURED, **kw)
                assert cap.response_ids == lean.response_ids, (n_filler, sink, window, name)
                assert len(cap.response_ids) == 24
                answers[n_filler, sink, window, name] = lean.response_ids
                if name == "every":  # every head whole: the engine's own answer
                    plain = generate(model, tok, ids, config=GenerationConfig(policy=CAPTURED, **kw))
                    assert cap.response_ids == plain.response_ids
    # not vacuous: which heads stream changes the answers
    for n_filler, _ in _TOY_PROMPTS[1:]:
        for sink, window in _TOY_RINGS:
            got = {tuple(answers[n_filler, sink, window, name])
                   for name in ("some", "others", "every", "none")}
            assert len(got) >= 2, (n_filler, sink, window)


def _lean_decode(model, cache, last: int, steps: int, n_prompt: int) -> list[int]:
    step = LeanDecoder(model, LEAN.resolve("cpu", model), attention=PackedAttention)
    x, out = torch.tensor([[last]]), []
    with phase("decode", StepState()):
        for i in range(steps):
            x = step(x, cache, n_prompt - 1 + i)[:, -1].argmax(-1).view(1, 1)
            out.append(int(x))
    return out


@pytest.mark.parametrize(("n_filler", "sink", "window"), [(40, 2, 3), (0, 4, 8)])
def test_captured_packed_step_writes_each_position_where_the_lean_step_does(toy_model, n_filler, sink,
                                                                            window):
    """After 19 steps: the same keys in the same ring slots, the full group's keys at their
    positions, and the cache's length advanced. The ring wraps (3 slots), or is longer than
    the prompt (~9 tokens; its slots not written yet are masked)."""
    model, tok = toy_model
    ids, _, _ = make_toy_probe(tok, n_filler, seed=7)
    policy = HeadPolicy(((0, 1), (1, 2), (1, 3)), sink, window)
    body, steps, bucket = ids[:-1], 19, 64
    keys = -(-(len(body) + steps) // bucket) * bucket
    caches = []
    for _ in range(2):
        cache = packed_cache(model, policy, reserve=keys - len(body))
        prefill(model, body, cache)
        caches.append(cache)
    decoder = PackedDecoder(model, CAPTURED.resolve("cpu", model), policy)
    got = []
    ran = decoder.decode_cache(caches[0], ids[-1], steps, lambda new: got.extend(t for (t,) in new) and False,
                               check_every=None)
    assert ran == steps
    assert got == _lean_decode(model, caches[1], ids[-1], steps, len(ids))
    n = len(body) + steps
    for cap, lean in zip(caches[0].layers, caches[1].layers):
        assert cap.n == lean.n == n
        torch.testing.assert_close(cap.kf[:, :, :n], lean.kf[:, :, :n], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(cap.vf[:, :, :n], lean.vf[:, :, :n], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(cap.ks, lean.ks, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(cap.vs, lean.vs, rtol=1e-5, atol=1e-6)
    # the steps moved the ring on; the sink slots (filled by the prompt) stay
    prefilled = packed_cache(model, policy, reserve=keys - len(body))
    prefill(model, body, prefilled)
    assert not torch.equal(caches[0].layers[1].ks, prefilled.layers[1].ks)
    assert torch.equal(caches[0].layers[1].ks[:, :, :sink], prefilled.layers[1].ks[:, :, :sink])
    # a cache of another head policy is refused
    other = packed_cache(model, HeadPolicy(((0, 0),), sink, window), reserve=keys - len(body))
    prefill(model, body, other)
    with pytest.raises(ConfigError, match="another head policy"):
        decoder.decode_cache(other, ids[-1], steps, lambda new: False)
    # one whose full groups are too short for the captured step's keys too
    short = packed_cache(model, policy, reserve=steps)
    prefill(model, body, short)
    with pytest.raises(ConfigError, match="larger reserve"):
        decoder.decode_cache(short, ids[-1], steps, lambda new: False)


def test_captured_packed_step_under_the_gpu_kernel_choices(toy_model, monkeypatch):
    """keys_first score products and pattern @ V in blocks of keys (a GPU's defaults, forced on
    the CPU) on both packed steps: the same tokens."""
    model, tok = toy_model
    ids, _, _ = make_toy_probe(tok, 100, seed=9)
    gpu = {"keys_first": True, "av": "split", "split_from": 32, "av_block": 16}
    policy = HeadPolicy(((0, 1), (1, 2), (1, 3)), 2, 3)
    kw = {"max_new_tokens": 16, "stop_at_eos": False}
    blocked = []  # split_av's key counts: the full groups' (~100 keys), never the 5-slot rings'
    real = packed_mod.split_av

    def spy(w, v, block):
        blocked.append(v.shape[-2])
        return real(w, v, block)

    monkeypatch.setattr(packed_mod, "split_av", spy)
    lean = _packed(model, tok, ids, policy, KernelPolicy(decode="lean", **gpu), **kw)
    assert len(blocked) == 16 * 2 and min(blocked) >= 32  # each step, each layer's full group
    cap = _packed(model, tok, ids, policy, KernelPolicy(decode="captured", **gpu), **kw)
    assert len(blocked) == 2 * 16 * 2 and blocked[-1] == 128  # over the bucket of keys (64 on a CPU)
    assert cap.response_ids == lean.response_ids == _packed(model, tok, ids, policy, LEAN, **kw).response_ids


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
    # hooks the engine's captured step would serve: the captured packed step refuses them too
    config = GenerationConfig(max_new_tokens=4, policy=CAPTURED)
    with model.hooks(fwd_hooks=TopKeyRecorder(2, 4, 4).hooks()):
        with pytest.raises(ConfigError, match="fires no TransformerLens hooks"):
            next(packed_generate(model, tok, [ids], policy, config=config))
