"""The engine's fast paths give exactly what the plain paths give (toy model, MHA).

Fast paths: batched decode of equal-length probes, prefix KV reuse, chunked prefill with a
lower-right causal bias instead of a dense mask, preallocated KV buffers, and the lean decode
step (HF modules + the bridge's attention hooks, without the bridge's wrappers).
"""

from __future__ import annotations

import random

import pytest
import torch
from engine_runs import assert_same, decode_all

from rhlens import engine
from rhlens.ablation import ablation_hooks
from rhlens.engine import GenerationConfig, KernelPolicy, StepState, current_phase
from rhlens.engine.attention import DirectHooks
from rhlens.probe import Probe
from rhlens.retrieval import DetectConfig, TopKeyRecorder, detect_retrieval_heads

from toy import ASK, BOS, END, FILLER_WORDS, KEY, VALUE_WORDS


def shared_haystack_probes(tok, n_filler: int, depths, seed: int) -> list[Probe]:
    """Probes of one haystack with the needle moved, like a NIAH grid: equal lengths, and
    each shares the filler before its needle with the deeper ones."""
    rng = random.Random(seed)
    filler = [rng.choice(FILLER_WORDS) for _ in range(n_filler)]
    values = rng.sample(VALUE_WORDS, 5)
    out = []
    for d in depths:
        at = round(n_filler * d / 100)
        words = [BOS, *filler[:at], KEY, *values, END, *filler[at:], ASK]
        ids = [int(i) for i in tok.convert_tokens_to_ids(words)]
        out.append(Probe(prompt_ids=ids, needle_span=(at + 2, at + 7), real_needle=" ".join(values),
                         length=len(ids), depth=float(d), needle_id=f"toy{seed}"))
    return out


@pytest.fixture(scope="module")
def grid(toy_model):
    _, tok = toy_model
    return (shared_haystack_probes(tok, 90, (0, 20, 40, 60, 80, 100), seed=1)
            + shared_haystack_probes(tok, 130, (10, 50, 90), seed=2))


@pytest.fixture
def batch_sizes(monkeypatch):
    """Records the size of every batch the engine decodes."""
    seen: list[int] = []
    run = engine._Runner.run

    def spy(self, items, on_start):
        seen.append(len(items))
        return run(self, items, on_start)

    monkeypatch.setattr(engine._Runner, "run", spy)
    return seen


def _records(path):
    import json

    return {r["key"]: r for r in map(json.loads, (path / "probes.jsonl").read_text().splitlines())}


def test_batched_prefix_reusing_detection_equals_one_probe_at_a_time(toy_model, grid, tmp_path,
                                                                   batch_sizes):
    model, tok = toy_model
    # 16-token prefill chunks: the ~100-token toy prompts then reuse whole chunks of haystack.
    alone = detect_retrieval_heads(model, grid, config=DetectConfig(
        max_new_tokens=8, batch_size=1, reuse_prefix=False, prefill_chunk=16),
        out=tmp_path / "alone")
    assert set(batch_sizes) == {1}
    batch_sizes.clear()
    fast = detect_retrieval_heads(model, grid, config=DetectConfig(
        max_new_tokens=8, batch_size=4, reuse_prefix=True, prefill_chunk=16),
        out=tmp_path / "fast")
    assert sorted(batch_sizes) == [2, 3, 4]  # 6 probes of one length (4 + 2), 3 of another
    assert torch.equal(fast.per_probe, alone.per_probe)
    assert [p["response"] for p in fast.probes] == [p["response"] for p in alone.probes]
    a, f = _records(tmp_path / "alone"), _records(tmp_path / "fast")
    for key in a:
        assert f[key]["response_ids"] == a[key]["response_ids"]
        assert f[key]["copy_steps"] == a[key]["copy_steps"]
        assert a[key]["reused_prefix"] == 0
    reused = [r["reused_prefix"] for r in f.values()]
    assert sum(x > 0 for x in reused) >= 5 and all(x % 16 == 0 for x in reused)
    # Not vacuous: every probe was answered, and the known head (L1H2) copied.
    assert fast.n_successful == len(grid)
    assert fast.top(1)[0][:2] == (1, 2)


def test_batched_decode_rows_equal_prompts_alone(toy_model, grid):
    model, tok = toy_model
    prompts = [p.prompt_ids for p in grid]
    base = GenerationConfig(max_new_tokens=8, stop_at_newline=False, reuse_prefix=False)
    alone = decode_all(model, tok, prompts, base)
    for bs in (2, 5):
        cfg = GenerationConfig(max_new_tokens=8, stop_at_newline=False, batch_size=bs,
                               prefill_chunk=16)
        assert_same(decode_all(model, tok, prompts, cfg), alone)
    cfg = GenerationConfig(max_new_tokens=8, stop_at_newline=False, batch_size=5,
                           policy=KernelPolicy(rows="batch"))  # one product for the whole batch
    assert_same(decode_all(model, tok, prompts, cfg), alone)


@pytest.mark.parametrize("slab", [2, 8])
def test_slab_products_make_batched_rows_equal_prompts_alone(toy_model, grid, monkeypatch, slab):
    """The GPU default: products on fixed blocks of rows, lone prompts padded too."""
    model, tok = toy_model
    prompts = [p.prompt_ids for p in grid]
    rows_alone = decode_all(model, tok, prompts, GenerationConfig(
        max_new_tokens=8, stop_at_newline=False, reuse_prefix=False))
    policy = KernelPolicy(rows="slab", slab=slab)
    rows = []  # the rows of every weight product of a decode step
    real = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda x, *a: (
        rows.append(x.shape[0]) if current_phase() == "decode" else None) or real(x, *a))
    alone = decode_all(model, tok, prompts, GenerationConfig(
        max_new_tokens=8, stop_at_newline=False, reuse_prefix=False, policy=policy))
    assert rows and all(n == slab for n in rows)  # the lone prompt ran padded to a slab
    for bs in (3, 5):  # batches of 3 (less than a slab, or more) and 5 (over two slabs)
        cfg = GenerationConfig(max_new_tokens=8, stop_at_newline=False, batch_size=bs,
                               prefill_chunk=16, policy=policy)
        assert_same(decode_all(model, tok, prompts, cfg), alone)
    assert all(n == slab for n in rows)  # batched steps too: whole slabs only
    # and the padded products answer what the plain ones answer
    assert [t for t, _ in alone] == [t for t, _ in rows_alone]


def test_chunked_prefill_gives_the_same_tokens_and_builds_no_dense_mask(toy_model, grid,
                                                                       monkeypatch):
    import transformers.masking_utils as mu

    model, tok = toy_model
    prompts = [p.prompt_ids for p in grid[:4]]
    plain = decode_all(model, tok, prompts, GenerationConfig(max_new_tokens=8,
                                                              reuse_prefix=False))
    # From here on no [query, key] mask may be built, and attention never receives one.
    def no_dense_mask(*a, **k):
        raise AssertionError("a dense causal mask was built")

    monkeypatch.setattr(mu, "sdpa_mask", no_dense_mask)
    seen = []
    from transformers import AttentionInterface

    impl = engine._register_impl()

    def spy(module, q, k, v, mask, **kw):
        seen.append((q.shape[2], k.shape[2], mask is None))
        return engine._rhlens_sdpa(module, q, k, v, mask, **kw)

    AttentionInterface.register(impl, spy)
    try:
        for chunk in (7, 32):
            for reuse in (False, True):
                cfg = GenerationConfig(max_new_tokens=8, prefill_chunk=chunk, reuse_prefix=reuse)
                assert_same(decode_all(model, tok, prompts, cfg), plain)
    finally:
        AttentionInterface.register(impl, engine._rhlens_sdpa)
    assert seen and all(no_mask for _, _, no_mask in seen)
    assert any(1 < q < kv for q, kv, _ in seen)  # chunks after cached keys were exercised


def test_lean_decode_equals_bridge_decode_with_hooks(toy_model, grid, monkeypatch):
    model, tok = toy_model
    prompts = [p.prompt_ids for p in grid[:3]]
    mask = ablation_hooks(model, [(0, 1), (1, 3)], mode="uniform")  # hook_q, decode only
    zero = ablation_hooks(model, [(1, 0)], mode="zero")  # hook_z
    d_head = model.cfg.d_model // model.cfg.n_heads
    means = torch.randn(model.cfg.n_layers, model.cfg.n_heads, d_head)
    mean = ablation_hooks(model, [(0, 2)], mode="mean", means=means)
    flat_calls = []
    real = DirectHooks.__call__
    monkeypatch.setattr(DirectHooks, "__call__", lambda self, x: flat_calls.append(
        sum(h.flat is not None for h in self.hooks)) or real(self, x))
    for hooks in ((), mask, mask + zero, mean + zero):
        flat_calls.clear()
        runs = [decode_all(model, tok, prompts, GenerationConfig(
            max_new_tokens=8, lean_decode=lean, batch_size=2), hooks) for lean in (True, False)]
        assert_same(*runs)
        # the lean step called the recorder straight (read-only), and applied the masks
        # straight to the flat tensors
        assert flat_calls and any(flat_calls) == bool(hooks)


def test_lean_decode_fires_a_foreign_hook_next_to_a_mask(toy_model, grid):
    """A user's own hook on the same point keeps the hook point's full call path."""
    model, tok = toy_model
    prompts = [p.prompt_ids for p in grid[:2]]
    seen = []
    spy = ("blocks.0.attn.hook_q", lambda x, hook=None: seen.append(tuple(x.shape)))
    hooks = [*ablation_hooks(model, [(0, 1)], mode="uniform"), spy]
    runs = [decode_all(model, tok, prompts, GenerationConfig(
        max_new_tokens=4, lean_decode=lean, stop_at_newline=False), hooks) for lean in (True, False)]
    assert_same(*runs)
    assert seen and all(len(s) == 4 for s in seen)  # [batch, pos, head, d_head], as TL gives it


def test_sdpa_attention_output_and_pattern_edits(toy_model, grid, monkeypatch):
    """On GPUs the lean step sums pattern @ V over blocks of keys (or takes it from SDPA
    while no hook edits the scores or the pattern); forced here on the CPU: same answers and
    recorded positions. A hook that edits the pattern (in place or by returning a tensor)
    changes the output exactly as it does through the bridge."""
    model, tok = toy_model
    prompts = [p.prompt_ids for p in grid[:3]]
    bridge = decode_all(model, tok, prompts, GenerationConfig(max_new_tokens=8, lean_decode=False))
    sdpa_calls = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", lambda *a, **k: (
        sdpa_calls.append(current_phase()) or real(*a, **k)))
    for av in ("split", "sdpa"):  # the GPU defaults, forced on the CPU
        # toy prompts: ~100 keys, summed in blocks of 16
        policy = KernelPolicy(av=av, av_block=16, split_from=0)
        for bs in (1, 3):
            cfg = GenerationConfig(max_new_tokens=8, batch_size=bs, policy=policy)
            assert_same(decode_all(model, tok, prompts, cfg), bridge)
    assert "decode" in sdpa_calls  # SDPA gave the output, no fallback

    def in_place(p, hook):
        p[:, 2] = 1.0 / p.shape[-1]  # flatten the copy head (L1H2)

    def returned(p, hook):
        p = p.clone()
        p[:, 2] = 1.0 / p.shape[-1]
        return p

    for edit in (in_place, returned):
        hooks = [("blocks.1.attn.hook_pattern", edit)]
        runs = [decode_all(model, tok, prompts, GenerationConfig(
            max_new_tokens=8, lean_decode=lean), hooks) for lean in (True, False)]
        assert_same(*runs)
        assert runs[0][0][0] != bridge[0][0]  # the edit changed the answer


def test_lean_decode_is_used_only_when_exact(toy_model):
    model, _ = toy_model
    rec = TopKeyRecorder(model.cfg.n_layers, model.cfg.n_heads, 4, StepState())
    with model.hooks(fwd_hooks=rec.hooks() + ablation_hooks(model, [(0, 0)])):
        assert isinstance(engine._decode_step(model, True), engine._LeanDecoder)
    resid = [("blocks.0.hook_resid_pre", lambda x, hook: None)]
    with model.hooks(fwd_hooks=rec.hooks() + resid):
        # A residual hook needs the bridge's own forward.
        assert not isinstance(engine._decode_step(model, True), engine._LeanDecoder)


def test_lean_decode_step_is_bit_identical_to_the_bridge(toy_model, grid):
    """One decode step: same logits and same pattern, to the bit (MHA: identical ops)."""
    model, _ = toy_model
    hf = engine.hf_model(model)
    ids = grid[0].prompt_ids
    results = []
    for lean in (True, False):
        cache = engine._new_cache(hf)
        engine.prefill(model, ids[:-1], cache)
        patterns = []
        hook = ("blocks.1.attn.hook_pattern",
                lambda p, hook, patterns=patterns: patterns.append(p.clone()))
        with model.hooks(fwd_hooks=[hook]), engine.phase("decode"), torch.no_grad():
            step = engine._decode_step(model, lean)
            assert isinstance(step, engine._LeanDecoder) == lean
            logits = step(torch.tensor([[ids[-1]]]), cache, len(ids) - 1)
        results.append((logits, patterns[0]))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


def test_buffer_cache_holds_what_a_dynamic_cache_holds(toy_model, grid):
    model, _ = toy_model
    hf = engine.hf_model(model)
    ids = grid[1].prompt_ids
    plain = engine._new_cache(hf)
    engine.prefill(model, ids, plain)
    layers = engine._plain_cache_layers(hf)
    pool = engine._KVPool(hf, layers)
    pool.ensure(2, len(ids) + 4, tuple(ids), None, True, 4096)
    pool.fill(model, 1, tuple(ids), None, True, chunk=4096)
    buf = pool.decode_cache(2, len(ids))
    for a, b in zip(plain.layers, buf.layers):
        assert torch.allclose(a.keys[0], b.keys[1], atol=1e-6)
        assert torch.allclose(a.values[0], b.values[1], atol=1e-6)
    buf.crop(-3)
    assert buf.get_seq_length() == len(ids) - 3


def test_prefill_runs_plain_hf_modules_only_when_no_hook_would_act(toy_model, grid, monkeypatch):
    model, _ = toy_model
    hf = engine.hf_model(model)
    ids = grid[1].prompt_ids
    state = StepState()
    recorder = TopKeyRecorder(model.cfg.n_layers, model.cfg.n_heads, 4, state)
    decode_mask = ablation_hooks(model, [(0, 1)], mode="uniform", phase="decode")
    all_mask = ablation_hooks(model, [(0, 1)], mode="uniform", phase="all")
    seen = []
    user = ("blocks.0.hook_resid_pre", lambda x, hook=None: seen.append(x.shape))

    def silent(hooks) -> bool:
        with model.hooks(fwd_hooks=list(hooks)):
            return engine._prefill_is_silent(model)

    assert silent([])
    assert silent([*recorder.hooks(), *decode_mask])
    assert not silent(all_mask)  # the mask acts in the prefill: the bridge path keeps it
    assert not silent([user])  # a user's hook sees the prompt
    paths = []
    real = engine.native.native_modules
    monkeypatch.setattr(engine.native, "native_modules",
                        lambda *a, **k: paths.append("plain") or real(*a, **k))
    quiet = engine._new_cache(hf)
    engine.prefill(model, ids, quiet)
    assert paths == ["plain"]
    bridged = engine._new_cache(hf)
    with model.hooks(fwd_hooks=[user]):
        engine.prefill(model, ids, bridged)
    assert paths == ["plain"] and seen  # the bridge path ran, and the user's hook fired
    for a, b in zip(quiet.layers, bridged.layers):  # the same operations on the same weights
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
