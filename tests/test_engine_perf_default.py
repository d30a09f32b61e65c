"""The engine's fast paths on the default model (SmolLM2-135M: grouped-query attention, 9
query heads on 3 KV heads) with short NIAH probes: batched decode with prefix reuse, the
lean decode step, and chunked prefill answer exactly as the plain paths do."""

from __future__ import annotations

import pytest
import torch
from engine_runs import assert_same, decode_all

from rhlens.engine import GenerationConfig, KernelPolicy
from rhlens.probes import ProbeConfig, build_probes
from rhlens.retrieval import DetectConfig, detect_retrieval_heads

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


def test_batched_reusing_detection_equals_one_at_a_time(default_model, depth_probes):
    model, _ = default_model
    alone = detect_retrieval_heads(model, depth_probes, config=DetectConfig(
        max_new_tokens=N_NEW, batch_size=1, reuse_prefix=False))
    fast = detect_retrieval_heads(model, depth_probes, config=DetectConfig(
        max_new_tokens=N_NEW, batch_size=3, reuse_prefix=True))
    assert [p["response"] for p in fast.probes] == [p["response"] for p in alone.probes]
    assert torch.equal(fast.per_probe, alone.per_probe)
    assert fast.per_probe.max() > 0  # some head copied: the comparison is not vacuous


@pytest.fixture(scope="module")
def bridge_answer(default_model, depth_probes):
    """The middle probe answered through the bridge's own decode step."""
    model, tok = default_model
    return decode_all(model, tok, [depth_probes[1].prompt_ids], GenerationConfig(
        max_new_tokens=N_NEW, lean_decode=False, reuse_prefix=False))


def test_lean_and_chunked_paths_equal_the_plain_bridge_path(default_model, depth_probes, bridge_answer):
    model, tok = default_model
    # Lean decode (grouped-query scores without copying K/V per head) and chunked prefill.
    fast = decode_all(model, tok, [depth_probes[1].prompt_ids], GenerationConfig(
        max_new_tokens=N_NEW, prefill_chunk=64, reuse_prefix=False))
    assert_same(fast, bridge_answer)


@pytest.mark.parametrize("policy", [KernelPolicy(keys_first=True), KernelPolicy(expand_kv=True)],
                         ids=["keys_first", "expand_kv"])
def test_gpu_and_exact_kernel_choices_answer_as_the_bridge(default_model, depth_probes, bridge_answer,
                                                           monkeypatch, policy):
    """Kernel choices compute the same dot products: grouped scores as [keys, d] @ [d, group]
    (the GPU's default) and K/V copied per query head (the bridge's own way), forced on the
    CPU: greedy answers and recorded top keys match the bridge's."""
    import transformers.models.llama.modeling_llama as llama

    model, tok = default_model
    keys_first, copies = [], []
    matmul, repeat_kv = torch.matmul, llama.repeat_kv
    monkeypatch.setattr(torch, "matmul",
                        lambda a, b: keys_first.append(a.shape[-2] > b.shape[-1]) or matmul(a, b))
    monkeypatch.setattr(llama, "repeat_kv", lambda x, n: copies.append(n) or repeat_kv(x, n))
    fast = decode_all(model, tok, [depth_probes[1].prompt_ids], GenerationConfig(
        max_new_tokens=N_NEW, reuse_prefix=False, policy=policy))
    monkeypatch.undo()
    assert any(keys_first) == bool(policy.keys_first)  # the chosen kernels ran, and only them
    assert bool(copies) == policy.expand_kv
    assert_same(fast, bridge_answer)
