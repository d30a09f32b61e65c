"""Test helpers shared by the engine's tests: decode prompts with the recorder on, compare runs."""

from __future__ import annotations

import torch

from rhlens.engine import StepState, generate_many
from rhlens.retrieval import TopKeyRecorder


def decode_all(model, tok, prompts, config, extra_hooks=()):
    """``[(response ids, recorded top-key positions [step, layer, head])]`` for every prompt."""
    state = StepState()
    rec = TopKeyRecorder(model.cfg.n_layers, model.cfg.n_heads, config.max_new_tokens, state,
                         max_batch=config.batch_size)
    out = []
    for gen in generate_many(model, tok, prompts, config=config,
                             hooks=[*rec.hooks(), *extra_hooks], state=state,
                             on_start=lambda i: rec.reset()):
        out.append((gen.response_ids, rec.row(gen.info["batch_row"])[:gen.n_steps].clone()))
    return out


def assert_same(a, b):
    """Two :func:`decode_all` results: the same tokens and the same positions, to the bit."""
    assert len(a) == len(b)
    for (ta, pa), (tb, pb) in zip(a, b):
        assert ta == tb
        assert torch.equal(pa, pb)
