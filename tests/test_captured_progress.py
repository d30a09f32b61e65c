"""The captured decode step calls ``StepState.on_step`` (the progress bar) between its steps, as
the lean step does after each of its own: on the CPU the captured step runs eagerly, step by
step, through the same loop a GPU replays its graph in."""

from __future__ import annotations

import pytest

from rhlens.engine import GenerationConfig, KernelPolicy, StepState, generate_many
from rhlens.engine import captured as captured_mod
from rhlens.engine.captured import SYNC_EVERY
from rhlens.retrieval import TopKeyRecorder

from toy import make_toy_probe


@pytest.fixture(scope="module")
def prompts(toy_model):
    _, tok = toy_model
    return [make_toy_probe(tok, n, seed)[0] for n, seed in ((60, 1), (60, 2), (90, 3))]


def _run(model, tok, prompts, decode, monkeypatch, **config):
    """(each generation, the advance count seen at every on_step call, per generate batch)."""
    advanced = []
    real = captured_mod.CapturedDecoder._advance

    def counting(self, *a, **k):
        advanced.append(1)
        return real(self, *a, **k)

    monkeypatch.setattr(captured_mod.CapturedDecoder, "_advance", counting)
    state = StepState()
    seen: list[int] = []
    state.on_step = lambda: seen.append(len(advanced))
    rec = TopKeyRecorder(model.cfg.n_layers, model.cfg.n_heads, 8, state, max_batch=2)
    gens = list(generate_many(model, tok, prompts, state=state, hooks=rec.hooks(),
                              on_start=lambda i: rec.reset(),
                              config=GenerationConfig(max_new_tokens=8, batch_size=2,
                                                      policy=KernelPolicy(decode=decode), **config)))
    monkeypatch.undo()
    return gens, seen, len(advanced)


@pytest.mark.parametrize("stop_at_newline", [True, False])
def test_the_captured_step_ticks_between_its_steps(toy_model, prompts, monkeypatch, stop_at_newline):
    model, tok = toy_model
    lean, lean_seen, lean_advanced = _run(model, tok, prompts, "lean", monkeypatch,
                                          stop_at_newline=stop_at_newline)
    cap, seen, advanced = _run(model, tok, prompts, "captured", monkeypatch,
                               stop_at_newline=stop_at_newline)
    assert {g.info["decode"] for g in cap} == {"captured"} and lean_advanced == 0
    assert [g.response_ids for g in cap] == [g.response_ids for g in lean]
    # one tick per captured step, each after its step and before the next
    assert seen == list(range(1, advanced + 1))
    # the lean step ticks once per step it runs; the captured one runs on to the next read-back
    batches = [lean[:2], lean[2:]]
    lean_steps = [max(g.n_steps for g in b) for b in batches]
    assert len(lean_seen) == sum(lean_steps)
    check = SYNC_EVERY if stop_at_newline or tok.eos_token_id is not None else 8
    assert advanced == sum(min(8, -(-s // check) * check) for s in lean_steps)
