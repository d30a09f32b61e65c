"""Retrieval scores, checked against an independent naive loop and a model with a known head."""

from __future__ import annotations

import json

import pytest
import torch

from rhlens.errors import ConfigError, ProbeError
from rhlens.probe import Probe
from rhlens.retrieval import DetectConfig, copy_scores, detect_retrieval_heads, rouge1_recall

from oracle import naive_retrieval
from toy import make_toy_probe


# ---- the score itself, on hand-made decode traces ------------------------------------------
def test_unique_and_paper_modes_differ_on_repeated_copies():
    prompt = torch.tensor([5, 6, 7, 8, 9, 10])
    span = (2, 5)  # tokens 7, 8, 9
    generated = torch.tensor([7, 7, 8, 3])
    # One layer, two heads: head 0 copies position 2 twice then position 3; head 1 attends
    # inside the span but to a token that is not the generated one.
    positions = torch.tensor([[[2, 3]], [[2, 4]], [[3, 2]], [[4, 0]]])
    unique = copy_scores(positions, generated, prompt, span, "unique")
    paper = copy_scores(positions, generated, prompt, span, "paper")
    assert unique.tolist() == [[pytest.approx(2 / 3), 0.0]]
    assert paper.tolist() == [[pytest.approx(3 / 3), 0.0]]
    with pytest.raises((ConfigError, TypeError)):  # TypeError: the test-time type checker
        copy_scores(positions, generated, prompt, span, "both")


def test_copy_outside_the_span_does_not_count():
    prompt = torch.tensor([7, 1, 7, 2])
    positions = torch.tensor([[[0]]])  # attends to a 7, but before the needle
    assert copy_scores(positions, torch.tensor([7]), prompt, (2, 3)).item() == 0.0


def test_rouge_recall_is_the_papers_metric():
    assert rouge1_recall("amber falcon seventeen", "It is amber falcon seventeen.") == 1.0
    assert rouge1_recall("amber falcon seventeen", "amber") == pytest.approx(1 / 3)


# ---- against the naive implementation --------------------------------------------------
def test_engine_agrees_exactly_with_the_naive_oracle(default_model, default_hf_eager, short_probes):
    """Same responses, same copy counts, same unique and paper scores on every probe."""
    model, tok = default_model
    hf, _ = default_hf_eager
    probes = short_probes[:2]
    uniq = detect_retrieval_heads(model, probes, config=DetectConfig(max_new_tokens=24))
    paper = detect_retrieval_heads(model, probes, config=DetectConfig(max_new_tokens=24,
                                                                       mode="paper"))
    for i, p in enumerate(probes):
        gen, copy_steps, u, pa = naive_retrieval(hf, tok, p.prompt_ids, p.needle_span, 24)
        rec = uniq.probes[i]
        assert tok.decode(gen, skip_special_tokens=True).strip() == rec["response"]
        assert torch.allclose(uniq.per_probe[i], torch.tensor(u), atol=1e-6)
        assert torch.allclose(paper.per_probe[i], torch.tensor(pa), atol=1e-6)
    # The probes were answered and somebody copied: the comparison was not vacuous.
    assert uniq.n_successful >= 1 and uniq.per_probe.max() > 0.5


# ---- a model whose retrieval head is known ---------------------------------------------
def _toy_probes(tok, n=4, fillers=(20, 60, 110, 140)):
    out = []
    for i, n_filler in enumerate(fillers[:n]):
        ids, span, answer = make_toy_probe(tok, n_filler, seed=100 + i)
        out.append(Probe(prompt_ids=ids, needle_span=span, real_needle=answer,
                         length=len(ids), depth=float(i), needle_id="toy"))
    return out


def test_known_retrieval_head_is_found(toy_model):
    model, tok = toy_model
    probes = _toy_probes(tok)
    scores = detect_retrieval_heads(model, probes, config=DetectConfig(max_new_tokens=8))
    assert scores.n_successful == len(probes)
    (layer, head, top_score), (_, _, second) = scores.top(2)
    assert (layer, head) == (1, 2)
    assert top_score > 0.9
    assert second < 0.1
    assert scores.retrieval_heads(0.1) == [(1, 2)]


# ---- resuming a killed run -------------------------------------------------------------
def test_killed_run_resumes_to_the_same_result(toy_model, tmp_path, monkeypatch):
    """A resumed run answers only the probes its log lacks, and ends where a full run does."""
    import rhlens.retrieval.detect

    model, tok = toy_model
    probes = _toy_probes(tok)
    cfg = DetectConfig(max_new_tokens=8)
    full = detect_retrieval_heads(model, probes, config=cfg, out=tmp_path / "full")
    # A run that died after two probes, in the middle of writing the third line.
    part = tmp_path / "part"
    detect_retrieval_heads(model, probes[:2], config=cfg, out=part)
    with (part / "probes.jsonl").open("a") as fh:
        fh.write('{"key": "len')

    answered: list[list[int]] = []  # the prompts the engine answers during the resume
    engine = rhlens.retrieval.detect.generate_many

    def counting(model, tokenizer, prompts, **kwargs):
        for prompt, gen in zip(prompts, engine(model, tokenizer, prompts, **kwargs)):
            answered.append(list(prompt))
            yield gen

    monkeypatch.setattr(rhlens.retrieval.detect, "generate_many", counting)
    resumed = detect_retrieval_heads(model, probes, config=cfg, out=part)
    assert sorted(answered) == sorted(list(p.prompt_ids) for p in probes[2:])
    lines = (part / "probes.jsonl").read_text().splitlines()
    assert len(lines) == 4 and len({json.loads(x)["key"] for x in lines}) == 4
    assert torch.equal(resumed.per_probe, full.per_probe)
    assert resumed.to_paper_dict() == full.to_paper_dict()
    answered.clear()
    detect_retrieval_heads(model, probes, config=cfg, out=part)  # all done: nothing answered
    assert answered == []
    with pytest.raises(ConfigError, match="other settings"):
        detect_retrieval_heads(model, probes, config=DetectConfig(max_new_tokens=9), out=part)


# ---- errors before any compute ---------------------------------------------------------
def test_bad_inputs_fail_before_compute(toy_model):
    model, tok = toy_model
    probes = _toy_probes(tok, n=1)
    with pytest.raises(ProbeError, match="no probes"):
        detect_retrieval_heads(model, [], config=DetectConfig())
    too_long = Probe(prompt_ids=[1] * 250, needle_span=(5, 8), real_needle="v1", length=250)
    with pytest.raises(ProbeError, match="maximum context of 256"):
        detect_retrieval_heads(model, [too_long], config=DetectConfig(max_new_tokens=10))
    with pytest.raises(ProbeError, match="distinct"):
        detect_retrieval_heads(model, probes * 2)
    with pytest.raises((ConfigError, TypeError), match="mode"):
        DetectConfig(mode="fast")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="success_threshold"):
        DetectConfig(success_threshold=2.0)
