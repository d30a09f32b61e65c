"""The captured decode step (static buffers, device-side positions, built-in hooks as tensor
ops) answers as the lean step does, alone and batched, with and without ablate_heads masks, on
the toy model and the default model (float32, CPU: the step runs eagerly, as it does on a GPU
before it is captured); other hooks keep the lean step; long-prompt chunk attention variants."""

from __future__ import annotations

import pytest
import torch
from engine_runs import assert_same, decode_all

from rhlens.ablation import ablation_hooks, head_means
from rhlens.engine import (
    EngineHook,
    GenerationConfig,
    HeadEditSpec,
    KernelPolicy,
    TopKeySpec,
    generate,
    generate_many,
)
from rhlens.engine import captured as captured_mod
from rhlens.engine.native import _chunk_attention
from rhlens.errors import ConfigError
from rhlens.probes import ProbeConfig, build_probes
from rhlens.retrieval import TopKeyRecorder

from toy import make_toy_probe

LEAN, CAPTURED = KernelPolicy(decode="lean"), KernelPolicy(decode="captured")


@pytest.fixture(scope="module")
def toy_prompts(toy_model):
    _, tok = toy_model
    # equal lengths two by two, so that batches of 2 form
    return [make_toy_probe(tok, n, seed)[0] for n, seed in ((60, 1), (60, 2), (90, 3), (90, 4))]


def _pair(model, tok, prompts, policy_a, policy_b, hooks=(), **kw):
    base = {"max_new_tokens": 8, **kw}
    a = decode_all(model, tok, prompts, GenerationConfig(policy=policy_a, **base), hooks)
    b = decode_all(model, tok, prompts, GenerationConfig(policy=policy_b, **base), hooks)
    return a, b


def _masks(model, tokenizer, prompts):
    heads = [(0, 1), (1, 3)]
    means = head_means(model, tokenizer, prompts[:2])
    return {"none": [], "uniform": ablation_hooks(model, heads),
            "zero": ablation_hooks(model, heads, mode="zero"),
            "mean": ablation_hooks(model, heads, mode="mean", means=means)}


@pytest.mark.parametrize("batch_size", [1, 2])
@pytest.mark.parametrize("mask", ["none", "uniform", "zero", "mean"])
def test_captured_step_answers_as_the_lean_step_toy(toy_model, toy_prompts, batch_size, mask):
    model, tok = toy_model
    hooks = _masks(model, tok, toy_prompts)[mask]
    lean, cap = _pair(model, tok, toy_prompts, LEAN, CAPTURED, hooks, batch_size=batch_size)
    assert_same(cap, lean)
    assert any(len(t) > 1 for t, _ in lean)


def test_captured_step_runs_without_calling_the_hooks(toy_model, toy_prompts, monkeypatch):
    model, tok = toy_model
    calls = []
    real = TopKeyRecorder._make_hook

    def spy(self, layer):
        fn = real(self, layer)
        return lambda *a, **k: calls.append(layer) or fn(*a, **k)

    monkeypatch.setattr(TopKeyRecorder, "_make_hook", spy)
    gens = [generate(model, tok, toy_prompts[0], config=GenerationConfig(max_new_tokens=4, policy=p),
                     hooks=TopKeyRecorder(2, 4, 4).hooks()) for p in (CAPTURED, LEAN)]
    assert [g.info["decode"] for g in gens] == ["captured", "lean"]
    assert gens[0].response_ids == gens[1].response_ids
    assert len(calls) == 2 * gens[1].n_steps  # the lean run only: 2 layers a step


def test_captured_step_answers_as_the_lean_step_default(default_model):
    model, tok = default_model
    config = ProbeConfig(lengths=(500,), depths=(20.0, 80.0), answer_buffer=200)
    prompts = [p.prompt_ids for p in build_probes(tok, config=config).probes if p.needle_id == "orlen-key"]
    assert len(prompts) == 2 and len(prompts[0]) == len(prompts[1])
    masks = ablation_hooks(model, [(2, 1), (11, 4), (20, 8)])
    for hooks in ([], masks):
        for bs in (1, 2):
            lean, cap = _pair(model, tok, prompts, LEAN, CAPTURED, hooks, batch_size=bs, max_new_tokens=12)
            assert_same(cap, lean)


@pytest.mark.parametrize("slab", [2, 8])
def test_captured_batched_rows_equal_prompts_alone_on_slabs(toy_model, toy_prompts, slab):
    """The GPU's row policy forced on the CPU: each row of a batch bit-identical to alone."""
    model, tok = toy_model
    policy = KernelPolicy(decode="captured", rows="slab", slab=slab)
    alone = decode_all(model, tok, toy_prompts, GenerationConfig(max_new_tokens=8, policy=policy))
    for bs in (2, 3):
        got = decode_all(model, tok, toy_prompts, GenerationConfig(max_new_tokens=8, policy=policy,
                                                                   batch_size=bs))
        assert_same(got, alone)
    lean = decode_all(model, tok, toy_prompts, GenerationConfig(max_new_tokens=8, policy=LEAN))
    assert [t for t, _ in alone] == [t for t, _ in lean]


def test_blocked_values_product_shared_by_a_slabs_rows(default_model):
    """pattern @ V in blocks of keys for a slab's rows at once (the GPU's default under GQA):
    each row as alone, and as the lean step computes it (float32)."""
    model, tok = default_model
    config = ProbeConfig(lengths=(400,), depths=(10.0, 50.0, 90.0), answer_buffer=200)
    prompts = [p.prompt_ids for p in build_probes(tok, config=config).probes if p.needle_id == "orlen-key"]
    policy = dict(rows="slab", slab=4, av="split", av_block=64, keys_first=True)
    cap = KernelPolicy(decode="captured", **policy)
    alone = decode_all(model, tok, prompts, GenerationConfig(max_new_tokens=6, policy=cap))
    batched = decode_all(model, tok, prompts, GenerationConfig(max_new_tokens=6, policy=cap, batch_size=3))
    lean = decode_all(model, tok, prompts, GenerationConfig(max_new_tokens=6,
                                                            policy=KernelPolicy(decode="lean", **policy)))
    assert_same(batched, alone)
    assert_same(alone, lean)


def test_steps_past_a_stop_are_cropped(toy_model, toy_prompts, monkeypatch):
    """Stops are read every few steps; what those extra steps recorded is discarded."""
    model, tok = toy_model
    monkeypatch.setattr(captured_mod, "SYNC_EVERY", 4)
    monkeypatch.setattr("rhlens.engine.runner.SYNC_EVERY", 5)
    bufs = {}
    for name, policy in (("lean", LEAN), ("captured", CAPTURED)):
        rec = TopKeyRecorder(2, 4, 16)
        gen = generate(model, tok, toy_prompts[2], config=GenerationConfig(max_new_tokens=16, policy=policy),
                       hooks=rec.hooks())
        assert gen.stop_reason == "eos" and gen.n_steps % 4 != 0  # a stop inside a read-back window
        bufs[name] = (gen.response_ids, rec.positions.clone())
    assert bufs["captured"][0] == bufs["lean"][0]
    assert torch.equal(bufs["captured"][1], bufs["lean"][1])  # -1 past the stop in both


def test_another_masked_set_reuses_the_step(toy_model, toy_prompts):
    """Per-prompt masks in one run: the masks' values change, the captured step stays."""
    model, tok = toy_model
    decoder = captured_mod.captured_decoder(model, CAPTURED.resolve("cpu", model))
    sets = [[(0, 1)], [(1, 2), (1, 3)], [(0, 0)]]
    made = []
    real = decoder._static

    def spy(*args):
        st = real(*args)
        made.append(st)
        return st

    decoder._static = spy
    try:
        prompts = [toy_prompts[0]] * 3
        config = GenerationConfig(max_new_tokens=4, policy=CAPTURED)
        gens = list(generate_many(model, tok, prompts, config=config,
                                  item_hooks=lambda i: ablation_hooks(model, sets[i])))
    finally:
        del decoder._static
    assert len(made) == 3 and made[0] is made[1] is made[2]
    assert all(g.info["decode"] == "captured" for g in gens)
    for heads, gen in zip(sets, gens):  # and each prompt got its own mask
        ref = decode_all(model, tok, prompts[:1], GenerationConfig(max_new_tokens=4, policy=LEAN),
                         ablation_hooks(model, heads))
        assert gen.response_ids == ref[0][0]


def test_a_new_kv_layout_drops_the_old_steps_and_their_memory_pool(toy_model):
    """Graphs of another run's KV buffers are dropped; once none is left, the next capture gets a
    new memory pool (CUDA's allocator refuses to share a pool no graph holds any more)."""
    model, _ = toy_model
    decoder = captured_mod.CapturedDecoder(model, CAPTURED.resolve("cpu", model))
    n_layers, none = len(decoder.layers), [[] for _ in decoder.layers]

    def buffers():
        return [torch.zeros(1, decoder.n_kv, 128, decoder.head_dim) for _ in range(2 * n_layers)]

    first, second = buffers(), buffers()  # both alive: distinct addresses
    a = decoder._static(1, 128, 4, first[:n_layers], first[n_layers:], none, none, none)
    assert decoder._static(1, 128, 4, first[:n_layers], first[n_layers:], none, none, none) is a
    decoder._pool = pool = object()  # as if a graph had been captured into a pool
    decoder._static(2, 128, 4, first[:n_layers], first[n_layers:], none, none, none)
    assert len(decoder._graphs) == 2 and decoder._pool is pool  # same buffers: kept, pool shared
    decoder._static(1, 128, 4, second[:n_layers], second[n_layers:], none, none, none)
    assert len(decoder._graphs) == 1 and decoder._pool is None


def test_other_hooks_keep_the_lean_step(toy_model, toy_prompts):
    model, tok = toy_model
    seen = []
    spy = EngineHook(lambda p, hook=None: seen.append(1), phase="decode", reads_only=True)
    config = GenerationConfig(max_new_tokens=4, policy=CAPTURED)
    gen = generate(model, tok, toy_prompts[0], config=config, hooks=[("blocks.1.attn.hook_pattern", spy)])
    assert gen.info["decode"] == "lean" and seen
    with model.hooks(fwd_hooks=[("blocks.0.attn.hook_pattern", spy)]):
        assert CAPTURED.resolve("cpu", model).decode == "lean"  # and the run's header says so
    assert CAPTURED.resolve("cpu", model).decode == "captured"
    gen = generate(model, tok, toy_prompts[0], config=GenerationConfig(max_new_tokens=4, lean_decode=False))
    assert gen.info["decode"] == "bridge"
    # a recorder too small for the run: the lean step, where the recorder refuses clearly
    rec = TopKeyRecorder(2, 4, 2)
    with pytest.raises(ConfigError, match="max_batch"):
        decode_all(model, tok, toy_prompts[:2], GenerationConfig(max_new_tokens=2, batch_size=2,
                                                                  policy=CAPTURED), rec.hooks())


def test_specs_are_checked():
    with pytest.raises(ConfigError, match="reads_only"):
        EngineHook(lambda x, hook=None: None, spec=TopKeySpec(torch.zeros(1, 1, 1, 1, dtype=torch.long), 0))
    with pytest.raises(ConfigError, match="flat"):
        EngineHook(lambda x, hook=None: x, spec=HeadEditSpec(torch.zeros(4, dtype=torch.bool)))


@pytest.mark.parametrize("mode", ["lower_right", "flash_gqa", "split"])
def test_chunk_attention_after_cached_keys_matches_a_dense_reference(mode):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, n, 16, generator=g) for h, n in ((8, 50), (2, 170), (2, 170)))
    mask = torch.ones(50, 170, dtype=torch.bool).tril(120)  # query i sees keys <= 120 + i
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.repeat_interleave(4, 1).double(), v.repeat_interleave(4, 1).double(),
        attn_mask=mask, scale=0.25)
    out = _chunk_attention(q, k, v, 0.25, mode)
    assert float((out.double() - ref).norm() / ref.norm()) < 1e-5


@pytest.mark.parametrize("mode", ["flash_gqa", "split"])
def test_chunked_prefill_variants_answer_as_one_pass(default_model, mode):
    model, tok = default_model
    config = ProbeConfig(lengths=(500,), depths=(50.0,), answer_buffer=200)
    prompt = [p.prompt_ids for p in build_probes(tok, config=config).probes if p.needle_id == "orlen-key"]
    one = decode_all(model, tok, prompt, GenerationConfig(max_new_tokens=10, policy=LEAN))
    chunked = decode_all(model, tok, prompt, GenerationConfig(
        max_new_tokens=10, prefill_chunk=96, policy=KernelPolicy(decode="lean", prefill_attn=mode)))
    assert [t for t, _ in chunked] == [t for t, _ in one]


def test_the_kept_decoder_does_not_keep_the_model_alive():
    """The captured step is cached with the model (weakly): dropping the model frees both."""
    import gc
    import weakref

    from rhlens.engine import hf_model
    from rhlens.models import load_model

    from toy import TOY_MODEL_DIR

    model, tok = load_model(str(TOY_MODEL_DIR), device="cpu")
    gen = generate(model, tok, make_toy_probe(tok, 30, 0)[0], config=GenerationConfig(max_new_tokens=2,
                                                                                      policy=CAPTURED))
    assert gen.info["decode"] == "captured"
    ref = weakref.ref(hf_model(model))
    del model, tok, gen
    gc.collect()
    assert ref() is None


def test_a_failed_compile_runs_the_step_uncompiled_and_says_so(toy_model, toy_prompts, monkeypatch):
    model, tok = toy_model

    def broken(fn):
        def fail(*a, **k):
            raise RuntimeError("no C compiler here (planted)")
        return fail

    monkeypatch.setattr(captured_mod, "_compiled", broken)
    monkeypatch.setattr(captured_mod, "_DECODERS", type(captured_mod._DECODERS)())  # a fresh decoder
    compiled = KernelPolicy(decode="captured", compile=True)
    with pytest.warns(UserWarning, match="torch.compile failed"):
        gen = generate(model, tok, toy_prompts[0], config=GenerationConfig(max_new_tokens=6, policy=compiled))
    lean = generate(model, tok, toy_prompts[0], config=GenerationConfig(max_new_tokens=6, policy=LEAN))
    assert gen.response_ids == lean.response_ids
    assert gen.info["decode"] == "captured (uncompiled: compile failed)"


def test_a_gpu_models_kv_pool_is_kept_between_runs_and_its_contents_forgotten(toy_model, toy_prompts,
                                                                              monkeypatch):
    """The buffers the captured step's graphs point at stay put across runs (on a GPU; forced
    here), what they hold is never reused by another run, and a live run's pool is not shared."""
    import gc

    from rhlens.engine import StepState, _Runner, release_buffers
    from rhlens.engine import kv as kv_mod

    model, tok = toy_model
    config = GenerationConfig(max_new_tokens=6, policy=CAPTURED)
    masks = ablation_hooks(model, [(0, 1), (1, 3)], phase="all")  # acts on the prefill too
    reference = generate(model, tok, toy_prompts[0], config=config, hooks=masks)  # a pool of its own
    monkeypatch.setattr(kv_mod, "_keep_between_runs", lambda device: True)
    monkeypatch.setattr(kv_mod, "_keep_cap", lambda device: 1 << 40)
    first = generate(model, tok, toy_prompts[0], config=config)
    pool = kv_mod._KEPT[model.original_model][0]
    # the same prompt under the mask: nothing the first run prefilled is reused
    masked = generate(model, tok, toy_prompts[0], config=config, hooks=masks)
    assert kv_mod._KEPT[model.original_model][0] is pool and masked.reused_prefix == 0
    assert masked.response_ids == reference.response_ids != first.response_ids
    a = _Runner(model, tok, config, StepState())  # a live run holds the pool: the next gets its own
    b = _Runner(model, tok, config, StepState())
    assert a.pool is pool and b.pool is not pool
    del a, b
    gc.collect()
    release_buffers(model)
    assert model.original_model not in kv_mod._KEPT


def test_a_large_kv_pool_is_not_held_after_its_run(toy_model, toy_prompts, monkeypatch):
    from rhlens.engine import kv as kv_mod

    model, tok = toy_model
    monkeypatch.setattr(kv_mod, "_keep_between_runs", lambda device: True)
    config = GenerationConfig(max_new_tokens=4, policy=CAPTURED)
    monkeypatch.setattr(kv_mod, "_keep_cap", lambda device: 1 << 40)
    list(generate_many(model, tok, toy_prompts[:2], config=config))
    assert model.original_model in kv_mod._KEPT  # small: kept for the next run
    monkeypatch.setattr(kv_mod, "_keep_cap", lambda device: 1000)  # bytes: the toy pool is larger
    list(generate_many(model, tok, toy_prompts[:2], config=config))
    assert model.original_model not in kv_mod._KEPT
