"""The engine's fast paths on the default model (SmolLM2-135M: grouped-query attention, 9
query heads on 3 KV heads) with short NIAH probes: batched decode with prefix reuse, the
lean decode step, and chunked prefill answer exactly as the plain paths do."""

from __future__ import annotations

import pytest
import torch

from rhlens.engine import GenerationConfig, KernelPolicy, StepState, generate_many
from rhlens.probes import ProbeConfig, build_probes
from rhlens.retrieval import DetectConfig, TopKeyRecorder, detect_retrieval_heads

N_NEW = 14


@pytest.fixture(scope="module")
def depth_probes(default_model):
    """One needle at three depths of one ~300-token haystack: equal lengths, shared prefixes."""
    _, tok = default_model
    config = ProbeConfig(lengths=(500,), depths=(10.0, 50.0, 90.0), answer_buffer=200)
    probes = [p for p in build_probes(tok, config=config).probes
              if p.needle_id == "orlen-key"]
    assert len(probes) == 3 and len({p.n_tokens for p in probes}) == 1
    return probes


def _decode_all(model, tok, prompts, config):
    state = StepState()
    rec = TopKeyRecorder(model.cfg.n_layers, model.cfg.n_heads, config.max_new_tokens, state,
                         max_batch=config.batch_size)
    out = []
    for gen in generate_many(model, tok, prompts, config=config, hooks=rec.hooks(), state=state,
                             on_start=lambda i: rec.reset()):
        out.append((gen.response_ids, rec.row(gen.info["batch_row"])[:gen.n_steps].clone()))
    return out


def test_batched_reusing_detection_equals_one_at_a_time(default_model, depth_probes):
    model, _ = default_model
    alone = detect_retrieval_heads(model, depth_probes, config=DetectConfig(
        max_new_tokens=N_NEW, batch_size=1, reuse_prefix=False))
    fast = detect_retrieval_heads(model, depth_probes, config=DetectConfig(
        max_new_tokens=N_NEW, batch_size=3, reuse_prefix=True))
    assert [p["response"] for p in fast.probes] == [p["response"] for p in alone.probes]
    assert torch.equal(fast.per_probe, alone.per_probe)
    assert fast.per_probe.max() > 0  # some head copied: the comparison is not vacuous


def test_lean_and_chunked_paths_equal_the_plain_bridge_path(default_model, depth_probes):
    model, tok = default_model
    prompts = [depth_probes[1].prompt_ids]
    plain = _decode_all(model, tok, prompts, GenerationConfig(
        max_new_tokens=N_NEW, lean_decode=False, reuse_prefix=False))
    # Lean decode (grouped-query scores without copying K/V per head) and chunked prefill.
    fast = _decode_all(model, tok, prompts, GenerationConfig(
        max_new_tokens=N_NEW, prefill_chunk=64, reuse_prefix=False))
    for (ta, pa), (tb, pb) in zip(plain, fast):
        assert ta == tb
        assert torch.equal(pa, pb)


def test_keys_first_scores_answer_as_the_bridge(default_model, depth_probes, monkeypatch):
    """The GPU's shape for grouped scores ([keys, d] @ [d, group]) computes the same dot
    products: forced on the CPU, greedy answers and recorded top keys match the bridge's."""
    model, tok = default_model
    prompts = [depth_probes[1].prompt_ids]
    plain = _decode_all(model, tok, prompts, GenerationConfig(
        max_new_tokens=N_NEW, lean_decode=False, reuse_prefix=False))
    calls = []
    real = torch.matmul
    monkeypatch.setattr(torch, "matmul",
                        lambda a, b: calls.append(a.shape[-2] > b.shape[-1]) or real(a, b))
    fast = _decode_all(model, tok, prompts, GenerationConfig(
        max_new_tokens=N_NEW, reuse_prefix=False, policy=KernelPolicy(keys_first=True)))
    monkeypatch.undo()
    assert any(calls)  # a keys-first product ran
    for (ta, pa), (tb, pb) in zip(plain, fast):
        assert ta == tb
        assert torch.equal(pa, pb)
