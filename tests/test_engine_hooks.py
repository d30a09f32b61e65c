"""EngineHook and the retrieval recorder: the engine's fast paths for declared hooks, and the
recorder under TransformerLens' own ways of running a model (run_with_hooks, model.hooks, the
bridge's generate, hand-written loops), recording what the engine records."""

from __future__ import annotations

import contextlib

import pytest
import torch

from rhlens import engine
from rhlens.engine import EngineHook, GenerationConfig, StepState, generate, phase
from rhlens.engine.attention import DirectHooks
from rhlens.engine.lean import LeanDecoder
from rhlens.errors import ConfigError
from rhlens.retrieval import TopKeyRecorder

from toy import make_toy_probe


def test_engine_hook_declarations_are_checked():
    with pytest.raises(ConfigError, match="flat"):
        EngineHook(lambda x, hook=None: x, flat=lambda x, n, d: x, reads_only=True)
    with pytest.raises((ConfigError, TypeError)):  # TypeError: the test-time type checker
        EngineHook(lambda x, hook=None: x, phase="answer")  # type: ignore[arg-type]
    with pytest.raises((ConfigError, TypeError)):
        EngineHook("not a function")  # type: ignore[arg-type]


def test_engine_hook_acts_in_its_phase_and_everywhere_outside_the_engine():
    hooks = {p: EngineHook(lambda x, hook=None: None, phase=p) for p in ("decode", "prefill", "all")}
    expected = {None: {"decode", "prefill", "all"}, "prefill": {"prefill", "all"},
                "decode": {"decode", "all"}}
    for now, acting in expected.items():
        with phase(now) if now else contextlib.nullcontext():
            assert {p for p, h in hooks.items() if h.active()} == acting


def test_a_users_read_only_hook_takes_the_recorders_fast_paths(toy_model, monkeypatch):
    """Wrapped as EngineHook(fn, phase="decode", reads_only=True), a user's hook gets the plain-HF
    prefill and is called straight by the lean step; unwrapped, the same function does not."""
    model, tok = toy_model
    ids, _, _ = make_toy_probe(tok, 40, seed=1)
    seen: list[int] = []

    def top_key(pattern, hook=None):  # the copy head's top key at every step
        seen.append(int(pattern[0, 2, -1].argmax()))

    wrapped = ("blocks.1.attn.hook_pattern", EngineHook(top_key, phase="decode", reads_only=True))
    plain = ("blocks.1.attn.hook_pattern", top_key)
    with model.hooks(fwd_hooks=[wrapped]):
        assert engine._prefill_is_silent(model)
        step = engine._decode_step(model, True)
        assert isinstance(step, LeanDecoder) and isinstance(step.layers[1][1].pattern, DirectHooks)
    with model.hooks(fwd_hooks=[plain]):
        assert not engine._prefill_is_silent(model)  # it might read the prompt
        step = engine._decode_step(model, True)
        assert isinstance(step, LeanDecoder)  # still the lean step, through the hook point
        assert step.layers[1][1].pattern is model.blocks[1].attn.hook_pattern
    paths = []
    real = engine.native.native_modules
    monkeypatch.setattr(engine.native, "native_modules",
                        lambda *a, **k: paths.append("plain") or real(*a, **k))
    state = StepState()
    rec = TopKeyRecorder(model.cfg.n_layers, model.cfg.n_heads, 6, state)
    gen = generate(model, tok, ids, config=GenerationConfig(max_new_tokens=6, stop_at_newline=False),
                   hooks=[*rec.hooks(), wrapped], state=state)
    assert paths == ["plain"]
    assert seen == rec.positions[:gen.n_steps, 1, 2].tolist()  # the hook saw every decode step


def test_a_read_only_hook_that_returns_a_tensor_is_refused(toy_model):
    model, tok = toy_model
    ids, _, _ = make_toy_probe(tok, 20, seed=2)
    liar = EngineHook(lambda p, hook=None: p * 0, reads_only=True)
    with pytest.raises(ConfigError, match="reads_only"):
        model.run_with_hooks(torch.tensor([ids]), fwd_hooks=[("blocks.0.attn.hook_pattern", liar)])
    with pytest.raises(ConfigError, match="reads_only"):
        generate(model, tok, ids, config=GenerationConfig(max_new_tokens=2),
                 hooks=[("blocks.0.attn.hook_pattern", liar)])


# ---------------------------------------------------------------------------------------
# The recorder outside the engine
# ---------------------------------------------------------------------------------------
def _engine_record(model, tok, ids, n):
    state = StepState()
    rec = TopKeyRecorder(model.cfg.n_layers, model.cfg.n_heads, n, state)
    config = GenerationConfig(max_new_tokens=n, stop_at_newline=False, stop_at_eos=False)
    gen = generate(model, tok, ids, config=config, hooks=rec.hooks(), state=state)
    assert gen.n_steps == n
    return gen.response_ids, rec.positions[:n].clone()


@torch.no_grad()
def _full_forward_loop(model, ids, n, rec):
    """Greedy, re-reading the whole sequence at every step, under run_with_hooks."""
    tokens, out = list(ids), []
    for _ in range(n):
        logits = model.run_with_hooks(torch.tensor([tokens]), fwd_hooks=rec.hooks())
        out.append(int(logits[0, -1].argmax()))
        tokens.append(out[-1])
    return out


@torch.no_grad()
def _cached_loop(model, ids, n, rec):
    """Greedy with the bridge's own KV cache, hooks attached with model.hooks."""
    out = []
    with model.hooks(fwd_hooks=rec.hooks()):
        logits, past = model(torch.tensor([ids]), return_type="logits_and_cache")
        for s in range(n):
            out.append(int(logits[0, -1].argmax()))
            if s < n - 1:
                logits, past = model(torch.tensor([[out[-1]]]), past_key_values=past,
                                     return_type="logits_and_cache")
    return out


@torch.no_grad()
def _bridge_generate(model, ids, n, rec):
    with model.hooks(fwd_hooks=rec.hooks()):
        res = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, stop_at_eos=False,
                             return_type="tokens", verbose=False)
    return res[0, len(ids):].tolist()


def _recorder_agrees_outside_the_engine(model, tok, ids, n):
    tokens, positions = _engine_record(model, tok, ids, n)
    agree = {}
    for name, loop in (("run_with_hooks, full re-forward", _full_forward_loop),
                       ("model.hooks, bridge KV cache", _cached_loop), ("bridge generate", _bridge_generate)):
        rec = TopKeyRecorder(model.cfg.n_layers, model.cfg.n_heads, n + 4)
        assert loop(model, ids, n, rec) == tokens, name  # the same greedy answer
        assert rec.n_steps == n  # one step per forward
        agree[name] = int((rec.positions[:n] == positions).sum())
    assert agree == dict.fromkeys(agree, positions.numel()), agree  # every (step, layer, head)
    assert (positions >= 0).all() and (positions < len(ids) + n).all()  # every slot written


def test_recorder_outside_the_engine_records_what_the_engine_records_toy(toy_model):
    model, tok = toy_model
    ids, _, _ = make_toy_probe(tok, 60, seed=3)
    _recorder_agrees_outside_the_engine(model, tok, ids, 8)


def test_recorder_outside_the_engine_records_what_the_engine_records_default(default_model, short_probes):
    model, tok = default_model
    _recorder_agrees_outside_the_engine(model, tok, list(short_probes[0].prompt_ids), 8)


def test_recorder_refuses_to_overflow_outside_the_engine(toy_model):
    model, tok = toy_model
    ids, _, _ = make_toy_probe(tok, 20, seed=4)
    rec = TopKeyRecorder(model.cfg.n_layers, model.cfg.n_heads, 1)
    x = torch.tensor([ids])
    model.run_with_hooks(x, fwd_hooks=rec.hooks())
    with pytest.raises(ConfigError, match="holds 1 steps"):
        model.run_with_hooks(x, fwd_hooks=rec.hooks())
    rec.reset()
    model.run_with_hooks(x, fwd_hooks=rec.hooks())  # a reset recorder starts again
    assert rec.n_steps == 1
    with pytest.raises(ConfigError, match="max_batch=2"):
        model.run_with_hooks(torch.tensor([ids, ids]), fwd_hooks=TopKeyRecorder(
            model.cfg.n_layers, model.cfg.n_heads, 1).hooks())
