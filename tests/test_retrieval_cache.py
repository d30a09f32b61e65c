"""Retrieval scores from a user's own forward pass equal the engine's, exactly (fp32)."""

from __future__ import annotations

import pytest
import torch

from rhlens.engine import StepState, generate
from rhlens.errors import ConfigError
from rhlens.io import read_jsonl
from rhlens.probe import Probe
from rhlens.retrieval import (
    DetectConfig,
    TopKeyRecorder,
    cache_answer_patterns,
    detect_retrieval_heads,
    probe_retrieval_scores,
    retrieval_scores_from_cache,
    top_keys_from_cache,
)

from toy import make_toy_probe


def _patterns_only(name: str) -> bool:
    return name.endswith("hook_pattern")


def _engine_positions(model, tok, probe: Probe):
    """The recorder's [step, layer, head] top keys while the engine answers, and the answer."""
    state = StepState()
    rec = TopKeyRecorder(int(model.cfg.n_layers), int(model.cfg.n_heads), 50, state)
    gen = generate(model, tok, probe.prompt_ids, hooks=rec.hooks(), state=state)
    return rec.positions[:gen.n_steps].clone(), gen.response_ids


def _check_against_engine(model, tok, probes: list[Probe], out, *,
                          eager: bool = True) -> tuple[int, int]:
    """Every path from a cache agrees with the engine: top keys bit for bit, and each
    probe's scores with ``detect_retrieval_heads``' (its per-probe records round scores to 6
    decimals, so the copy counts, score x needle length, are compared as integers; the
    paper-mode counts with the records' ``copy_steps``). Returns (probes, head-scores) compared."""
    scores = detect_retrieval_heads(model, probes, config=DetectConfig(batch_size=1),
                                    tokenizer=tok, out=out)
    records = {r["key"]: r for r in read_jsonl(out / "probes.jsonl") if "key" in r}
    compared = 0
    for i, probe in enumerate(probes):
        positions, answer = _engine_positions(model, tok, probe)
        assert answer == scores.probes[i]["response_ids"]
        tokens = list(probe.prompt_ids) + answer
        n = probe.n_tokens
        _, full = model.run_with_cache(torch.tensor([tokens]), names_filter=_patterns_only)
        rows = cache_answer_patterns(model, tokens, answer_start=n)
        caches = [full, rows]
        if eager:  # the whole-sequence forward keeping the answer rows
            caches.append(cache_answer_patterns(model, tokens, answer_start=n, prefill_prompt=False))
        for cache in caches:
            assert torch.equal(top_keys_from_cache(cache, len(tokens), answer_start=n)[0], positions)
        engine = scores.per_probe[i]
        for got in (retrieval_scores_from_cache(full, tokens, needle_span=probe.needle_span,
                                                answer_start=n),
                    retrieval_scores_from_cache(rows, tokens, needle_span=probe.needle_span,
                                                answer_start=n),
                    probe_retrieval_scores(model, probe, answer)):
            assert got.dtype == torch.float32 and got.shape == engine.shape
            k = probe.needle_len
            assert torch.equal((got * k).round(), (engine * k).round())
            assert (got - engine).abs().max() < 1e-6
        paper = retrieval_scores_from_cache(rows, tokens, needle_span=probe.needle_span,
                                            answer_start=n, mode="paper")
        steps = torch.tensor(records[probe.key]["copy_steps"])
        assert torch.equal((paper * probe.needle_len).round().long(), steps)
        compared += engine.numel()
    assert scores.per_probe.max() > 0  # some head copied: the comparison is not all zeros
    return len(probes), compared


def _toy_probes(tok) -> list[Probe]:
    out = []
    for n_filler, seed in ((20, 0), (60, 1), (120, 2), (40, 3)):
        ids, span, answer = make_toy_probe(tok, n_filler, seed)
        out.append(Probe(ids, span, answer, length=len(ids), needle_id=f"toy{seed}"))
    return out


def test_toy_model_scores_from_cache_equal_the_engines(toy_model, tmp_path):
    model, tok = toy_model
    n_probes, n_scores = _check_against_engine(model, tok, _toy_probes(tok), tmp_path)
    assert (n_probes, n_scores) == (4, 4 * 2 * 4)


def test_default_model_scores_from_cache_equal_the_engines(default_model, short_probes, tmp_path):
    model, tok = default_model
    n_probes, n_scores = _check_against_engine(model, tok, list(short_probes), tmp_path, eager=False)
    assert (n_probes, n_scores) == (3, 3 * 30 * 9)


def test_answer_rows_never_form_the_prompt_pattern(toy_model):
    """The prefilled path's only attention patterns are [batch, head, answer, key]; the plain
    forward forms the whole [seq, seq] pattern (what prefill_prompt avoids)."""
    model, tok = toy_model
    ids, _, _ = make_toy_probe(tok, 100, 5)
    tokens = [*ids, 40, 41, 42, 2]
    seen: list[tuple[int, ...]] = []

    def watch(pattern, hook):
        seen.append(tuple(pattern.shape))

    watchers = [(f"blocks.{layer}.attn.hook_pattern", watch) for layer in range(2)]
    with model.hooks(fwd_hooks=watchers):
        cache = cache_answer_patterns(model, tokens, answer_start=len(ids))
    assert seen and {s[2] for s in seen} == {4}
    assert cache["blocks.1.attn.hook_pattern"].shape == (1, 4, 4, len(tokens) - 1)
    seen.clear()
    with model.hooks(fwd_hooks=watchers):
        eager = cache_answer_patterns(model, tokens, answer_start=len(ids), prefill_prompt=False)
    assert {s[2] for s in seen} == {len(tokens) - 1}
    assert torch.equal(eager["blocks.1.attn.hook_pattern"].argmax(-1),
                       cache["blocks.1.attn.hook_pattern"].argmax(-1))


def test_batched_tokens_score_each_row(toy_model):
    model, tok = toy_model
    by_length: dict[int, list] = {}
    for seed in range(20):  # two needles giving prompts of one length
        ids, span, _ = make_toy_probe(tok, 30, seed)
        by_length.setdefault(len(ids), []).append((ids, span))
    probes = next(v for v in by_length.values() if len(v) >= 2)[:2]
    answers = [generate(model, tok, ids).response_ids for ids, _ in probes]
    n = min(len(a) for a in answers)
    tokens = torch.tensor([ids + a[:n] for (ids, _), a in zip(probes, answers)])
    start = len(probes[0][0])
    cache = cache_answer_patterns(model, tokens, answer_start=start)
    both = retrieval_scores_from_cache(cache, tokens, needle_span=[s for _, s in probes],
                                       answer_start=start)
    assert both.shape == (2, 2, 4)
    for b, (_, span) in enumerate(probes):
        one = cache_answer_patterns(model, tokens[b], answer_start=start)
        assert torch.equal(both[b], retrieval_scores_from_cache(one, tokens[b], needle_span=span,
                                                                answer_start=start))


def _one_hot_cache(tops: list[list[list[int]]], n_key: int, n_layers: int = 2) -> dict:
    """A cache whose pattern rows put all attention on given key indices: tops[layer][head][row]."""
    cache = {}
    for layer in range(n_layers):
        heads = torch.tensor(tops[layer])  # [head, row]
        pattern = torch.zeros(1, heads.shape[0], heads.shape[1], n_key)
        pattern.scatter_(-1, heads[None, :, :, None], 1.0)
        cache[f"blocks.{layer}.attn.hook_pattern"] = pattern
    return cache


def test_copy_rule_on_a_hand_made_cache():
    """Prompt of 8 tokens, needle at [2, 5) = tokens 12, 13, 14; the answer copies 12 then 14."""
    prompt = [1, 10, 12, 13, 14, 11, 10, 9]
    tokens = [*prompt, 12, 14, 2]
    # Answer rows (query positions 7, 8, 9), keys 0..9. Head 0 copies position 2 then 4 (2
    # of 3 needle tokens); head 1 looks at 3 at step 0 (token 13, not the generated 12:
    # no copy), then at 4; layer 1 head 0 copies position 2 three times.
    tops = [[[2, 4, 0], [3, 4, 1]], [[2, 2, 2], [9, 9, 9]]]
    cache = _one_hot_cache(tops, n_key=10)
    got = retrieval_scores_from_cache(cache, tokens, needle_span=(2, 5), answer_start=8)
    assert torch.equal(got, torch.tensor([[2 / 3, 1 / 3], [1 / 3, 0.0]]))
    paper = retrieval_scores_from_cache(cache, tokens, needle_span=(2, 5), answer_start=8,
                                        mode="paper")
    assert torch.equal(paper, torch.tensor([[2 / 3, 1 / 3], [1 / 3, 0.0]]))  # 12 is copied once
    # The same as a whole-sequence cache: rows 7..9 of an 11 x 11 pattern, and unbatched.
    full = {}
    for name, rows in cache.items():
        pattern = torch.zeros(rows.shape[1], 11, 11)
        pattern[:, 7:10, :10] = rows[0]
        full[name] = pattern
    assert torch.equal(retrieval_scores_from_cache(full, tokens, needle_span=(2, 5),
                                                   answer_start=8), got)
    # A sliding-window layer keeps only the last 6 keys (positions 4..9): key index i is
    # position 4 + i, since the keys end at the last answer row (position 9).
    tops = [[[4, 9, 6], [5, 5, 5]], [[8, 7, 6], [9, 4, 9]]]
    shifted = {name: p[..., 4:] for name, p in _one_hot_cache(tops, n_key=10).items()}
    positions = top_keys_from_cache(shifted, len(tokens), answer_start=8)
    assert positions.shape == (1, 3, 2, 2)
    assert torch.equal(positions[0].permute(1, 2, 0), torch.tensor(tops))


def test_bad_input_is_refused_before_compute():
    cache = _one_hot_cache([[[2, 4, 0]], [[2, 2, 2]]], n_key=10)
    tokens = [1, 10, 12, 13, 14, 11, 10, 9, 12, 14, 2]
    ok = {"needle_span": (2, 5), "answer_start": 8}
    with pytest.raises(ConfigError, match="answer_start"):
        retrieval_scores_from_cache(cache, tokens, needle_span=(2, 5), answer_start=11)
    with pytest.raises(ConfigError, match="needle span"):
        retrieval_scores_from_cache(cache, tokens, needle_span=(6, 9), answer_start=8)
    with pytest.raises(ConfigError, match="layers \\[0\\]"):
        retrieval_scores_from_cache({"blocks.1.attn.hook_pattern": cache["blocks.1.attn.hook_pattern"]},
                                    tokens, **ok)
    with pytest.raises(ConfigError, match="no blocks"):
        retrieval_scores_from_cache({"blocks.0.hook_resid_pre": torch.zeros(1, 3, 4)}, tokens, **ok)
    with pytest.raises(ConfigError, match="query rows"):
        retrieval_scores_from_cache(cache, [*tokens, 5, 6], needle_span=(2, 5), answer_start=8)
    with pytest.raises(ConfigError, match="integer token ids"):
        retrieval_scores_from_cache(cache, torch.tensor(tokens, dtype=torch.float32), **ok)
    with pytest.raises((ConfigError, TypeError), match="mode"):  # beartype in the tests
        retrieval_scores_from_cache(cache, tokens, mode="any", **ok)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="one per row of the 1 token rows"):
        retrieval_scores_from_cache(cache, tokens, needle_span=[(2, 5), (2, 5)], answer_start=8)
    with pytest.raises(ConfigError, match="needle_span must be"):
        retrieval_scores_from_cache(cache, tokens, needle_span=[(2, 5), (2,)], answer_start=8)
    assert torch.equal(retrieval_scores_from_cache(cache, tokens, needle_span=torch.tensor([2, 5]),
                                                   answer_start=8),
                       retrieval_scores_from_cache(cache, tokens, **ok))
