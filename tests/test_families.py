"""Score families against independent naive loops on the toy model; detectors on heads with a known answer."""

from __future__ import annotations

import pytest
import torch

from rhlens.errors import ConfigError
from rhlens.families import (
    AnswerRecorder,
    FamiliesConfig,
    FamilyScores,
    detector_scores,
    forced_scores,
    needle_mass_scores,
    repeated_sequences,
    score_families,
)
from rhlens.probe import Probe
from rhlens.retrieval import DetectConfig, detect_retrieval_heads

from oracle import naive_retrieval
from toy import TOY_MODEL_DIR, make_toy_probe

BUDGET = 10


@pytest.fixture(scope="module")
def toy_eager():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(TOY_MODEL_DIR), attn_implementation="eager").eval()


def _toy_probes(tok, n: int = 4, n_filler: int = 60) -> list[Probe]:
    """``n`` toy probes of one token count (batched together) with needles in different places."""
    by_len: dict[int, list] = {}
    for seed in range(200):
        ids, span, answer = make_toy_probe(tok, n_filler, seed=seed)
        by_len.setdefault(len(ids), []).append((ids, span, answer, seed))
    group = max(by_len.values(), key=len)[:n]
    assert len(group) == n and (n == 1 or len({g[1] for g in group}) > 1)  # spans differ
    return [Probe(ids, span, answer, length=len(ids), depth=float(seed), needle_id="toy")
            for ids, span, answer, seed in group]


# ---- naive, independent computations (eager HF attention, loops over heads) -------------------
@torch.no_grad()
def _attentions(hf, tokens: list[int]) -> list[torch.Tensor]:
    """Each layer's ``[head, query, key]`` attention over ``tokens`` in one eager forward."""
    out = hf(input_ids=torch.tensor([tokens]), output_attentions=True)
    return [a[0] for a in out.attentions]


def _naive_rows_mass(hf, tokens: list[int], rows, span) -> list[list[float]]:
    """Attention on ``span`` from query rows ``[r0, r1)`` of ``tokens``, averaged over the rows."""
    att = _attentions(hf, tokens)
    out = []
    for layer in att:
        out.append([sum(sum(float(layer[h, r, j]) for j in range(*span)) for r in range(*rows))
                    / (rows[1] - rows[0]) for h in range(layer.shape[0])])
    return out


def _naive_mass(hf, prompt: list[int], answer: list[int], span) -> list[list[float]]:
    """Attention on ``span`` at each answer step (row n - 1 + s), averaged over the steps."""
    n = len(prompt)
    return _naive_rows_mass(hf, prompt + answer[:-1], (n - 1, n - 1 + len(answer)), span)


def _naive_forced_copy(hf, prompt: list[int], answer: list[int], span) -> list[list[float]]:
    att = _attentions(hf, prompt + answer[:-1])
    n, (start, end) = len(prompt), span
    out = []
    for layer in att:
        row = []
        for h in range(layer.shape[0]):
            copied = set()
            for s, tok in enumerate(answer):
                pos = int(layer[h, n - 1 + s].argmax())
                if start <= pos < end and prompt[pos] == tok:
                    copied.add(pos)
            row.append(len(copied) / (end - start))
        out.append(row)
    return out


# ---- the decode pass: copy and mass from one recorder --------------------------------------------
def test_copy_and_mass_from_one_pass_equal_each_computed_alone(toy_model, toy_eager):
    """Batched probes with different spans: copy equals the detector run alone (and the naive
    oracle), mass equals a naive eager loop, and the toy's copy head L1H2 tops both."""
    model, tok = toy_model
    probes = _toy_probes(tok)
    config = FamiliesConfig(families=("copy", "copy-paper", "mass"),
                            detect=DetectConfig(max_new_tokens=BUDGET, batch_size=4))
    fs = score_families(model, probes, config=config, tokenizer=tok)
    alone = detect_retrieval_heads(model, probes, config=DetectConfig(max_new_tokens=BUDGET, batch_size=1))
    assert torch.equal(fs["copy"].per_probe, alone.per_probe)
    assert fs["copy"].n_successful == len(probes)  # the toy answers: nothing vacuous
    for i, p in enumerate(probes):
        gen, _, unique, paper = naive_retrieval(toy_eager, tok, p.prompt_ids, p.needle_span, BUDGET)
        assert gen == fs["copy"].probes[i]["response_ids"]
        assert torch.allclose(fs["copy"].per_probe[i], torch.tensor(unique), atol=1e-6)
        assert torch.allclose(fs["copy-paper"].per_probe[i], torch.tensor(paper), atol=1e-6)
        mass = _naive_mass(toy_eager, list(p.prompt_ids), gen, p.needle_span)
        assert torch.allclose(fs["mass"].per_probe[i], torch.tensor(mass), atol=1e-5)
    assert fs["copy"].top_heads(1) == [(1, 2)] and fs["mass"].top_heads(1) == [(1, 2)]
    assert torch.allclose(needle_mass_scores(model, probes, config=DetectConfig(max_new_tokens=BUDGET),
                                             tokenizer=tok), fs["mass"].mean, atol=1e-6)


def test_recorder_outside_the_engine_counts_forwards(toy_model, toy_eager):
    """Under model.hooks (no engine) every forward is one step: its last row is recorded."""
    model, tok = toy_model
    p = _toy_probes(tok, n=1)[0]
    rec = AnswerRecorder(2, 4, max_steps=3)
    rec.set_span(p.needle_span)
    ids = list(p.prompt_ids)
    with model.hooks(fwd_hooks=rec.hooks()):
        for cut in (len(ids) - 2, len(ids) - 1, len(ids)):
            model(torch.tensor([ids[:cut]]), return_type=None)
    assert rec.n_steps == 3
    att = _attentions(toy_eager, ids)
    for s, cut in enumerate((len(ids) - 2, len(ids) - 1, len(ids))):
        want = [[sum(float(a[h, cut - 1, j]) for j in range(*p.needle_span)) for h in range(4)] for a in att]
        assert torch.allclose(rec.mass()[s], torch.tensor(want), atol=1e-5)
    with pytest.raises(ConfigError, match="start < end"):
        rec.set_span((5, 5))


# ---- the forced pass: question rows and teacher-forced answers -----------------------------------
def test_query_rows_match_a_naive_loop(toy_model, toy_eager):
    model, tok = toy_model
    p = _toy_probes(tok, n=1)[0]
    rows = (p.n_tokens - 3, p.n_tokens)  # the last filler words and ASK
    got = forced_scores(model, p, rows=rows, query_span=p.needle_span, tokenizer=tok)["query"]
    want = _naive_rows_mass(toy_eager, list(p.prompt_ids), rows, p.needle_span)
    assert torch.allclose(got, torch.tensor(want), atol=1e-5)
    with pytest.raises(ConfigError, match="before the query rows"):
        forced_scores(model, p, rows=(2, 4), query_span=p.needle_span, tokenizer=tok)
    with pytest.raises(ConfigError, match="meta lacks"):
        forced_scores(model, p, tokenizer=tok)  # a hand-made probe: where is its question?


def test_forced_answer_equals_the_decode_pass_and_a_naive_loop(toy_model, toy_eager):
    """The model's own answer teacher-forced gives the decode pass's copy and mass; the
    reference answer (the needle's tokens) gives what a naive eager loop gives."""
    model, tok = toy_model
    probes = _toy_probes(tok, n=2)
    config = FamiliesConfig(families=("copy", "copy-paper", "mass"),
                            detect=DetectConfig(max_new_tokens=BUDGET))
    fs = score_families(model, probes, config=config, tokenizer=tok)
    ref = score_families(model, probes, tokenizer=tok,
                         config=FamiliesConfig(families=("copy", "mass"), answers="reference",
                                               detect=DetectConfig(max_new_tokens=BUDGET)))
    assert ref["copy"].success.all() and ref["copy"].probes[0]["stop_reason"] == "reference"
    for i, p in enumerate(probes):
        rows = (p.n_tokens - 1, p.n_tokens)
        own = forced_scores(model, p, answer_ids=fs["copy"].probes[i]["response_ids"], rows=rows,
                            query_span=(0, 1), tokenizer=tok)
        for family in ("copy", "copy-paper", "mass"):
            assert torch.allclose(own[family], fs[family].per_probe[i], atol=1e-5), family
        answer = list(p.prompt_ids[p.needle_span[0]:p.needle_span[1]])
        want_copy = _naive_forced_copy(toy_eager, list(p.prompt_ids), answer, p.needle_span)
        want_mass = _naive_mass(toy_eager, list(p.prompt_ids), answer, p.needle_span)
        assert torch.allclose(ref["copy"].per_probe[i], torch.tensor(want_copy), atol=1e-6)
        assert torch.allclose(ref["mass"].per_probe[i], torch.tensor(want_mass), atol=1e-5)


# ---- TransformerLens' detectors ---------------------------------------------------------------
def _known_targets(tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Exact previous-token and induction patterns for ``tokens``, and how many rows have an
    induction target (an earlier copy of their token whose successor they can attend to)."""
    n = len(tokens)
    prev, ind = torch.zeros(n, n), torch.zeros(n, n)
    prev[0, 0] = 1.0
    for i in range(1, n):
        prev[i, i - 1] = 1.0
    with_target = 0
    for i in range(n):
        earlier = [j for j in range(i) if tokens[j] == tokens[i]]
        if earlier:
            ind[i, earlier[0] + 1] = 1.0
            with_target += 1
        else:
            ind[i, 0] = 1.0
    return prev, ind, with_target


def test_detectors_find_heads_made_to_be_what_they_detect(toy_model):
    """Force L0H1 to attend to the previous token and L1H3 to the induction target: TL's
    detectors through the bridge give each exactly the share known by construction."""
    model, tok = toy_model
    text = repeated_sequences(tok, n=1, length=12, seed=3)[0]
    tokens = model.to_tokens(text)[0].tolist()
    prev, ind, with_target = _known_targets(tokens)
    assert with_target >= 12  # the repeat: every word of the second half has a target

    def force(head: int, target: torch.Tensor):
        def hook(pattern, hook=None):
            pattern = pattern.clone()
            pattern[:, head] = target
            return pattern
        return hook

    with model.hooks(fwd_hooks=[("blocks.0.attn.hook_pattern", force(1, prev)),
                                ("blocks.1.attn.hook_pattern", force(3, ind))]):
        got = detector_scores(model, [text])
    n = len(tokens)
    assert got["previous-token"][0, 0, 1].item() == pytest.approx((n - 1) / n, abs=1e-6)
    assert got["induction"][0, 1, 3].item() == pytest.approx(with_target / n, abs=1e-6)
    assert got["previous-token"][0].argmax().item() == 1  # L0H1 tops its grid


def test_detectors_match_a_naive_loop_on_the_toy(toy_model, toy_eager):
    model, tok = toy_model
    texts = repeated_sequences(tok, n=2, length=10, seed=0)
    got = detector_scores(model, texts)
    for t, text in enumerate(texts):
        tokens = model.to_tokens(text)[0].tolist()
        n = len(tokens)
        att = _attentions(toy_eager, tokens)
        dup = {(i, j) for i in range(n) for j in range(i) if tokens[i] == tokens[j]}
        ind = {(i, j + 1) for i, j in dup}
        for la, layer in enumerate(att):
            for h in range(layer.shape[0]):
                a = layer[h]
                want = {"previous-token": sum(float(a[i, i - 1]) for i in range(1, n)) / n,
                        "duplicate-token": sum(float(a[i, j]) for i, j in dup) / n,
                        "induction": sum(float(a[i, j]) for i, j in ind) / n}
                for family, value in want.items():
                    assert got[family][t, la, h].item() == pytest.approx(value, abs=1e-4), (family, la, h)


def test_repeated_sequences_repeat_whole_words(default_model):
    model, tok = default_model
    texts = repeated_sequences(tok, n=2, length=15, seed=1)
    assert texts == repeated_sequences(tok, n=2, length=15, seed=1) and texts[0] != texts[1]
    ids = model.to_tokens(texts[0])[0].tolist()[1:]  # without BOS
    assert len(ids) == 30 and ids[:15] == ids[15:]  # the words tokenize back to themselves
    with pytest.raises(ConfigError):
        repeated_sequences(tok, n=0)


# ---- config and result -------------------------------------------------------------------------
def test_config_refuses_bad_settings():
    with pytest.raises(ConfigError, match="unknown score family 'bogus'"):
        FamiliesConfig(families=("copy", "bogus"))
    with pytest.raises(ConfigError, match="twice"):
        FamiliesConfig(families=("copy", "copy"))
    with pytest.raises((ConfigError, TypeError)):  # TypeError: the tests' runtime type checker
        FamiliesConfig(answers="mine")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="n_sequences"):
        FamiliesConfig(n_sequences=0)
    from rhlens.families import check_families

    assert check_families("mass, copy") == ("mass", "copy")


def test_family_scores_refuse_an_unknown_family():
    with pytest.raises(ConfigError, match="unknown score family"):
        FamilyScores(per_probe=torch.zeros(1, 2, 2), success=torch.ones(1, dtype=torch.bool),
                     model_name="m", family="nope")


def test_detector_only_families_need_no_probes(toy_model):
    model, tok = toy_model
    fs = score_families(model, [], tokenizer=tok,
                        config=FamiliesConfig(families=("induction",), n_sequences=2, sequence_length=8))
    assert fs.names == ["induction"] and fs["induction"].n_probes == 2 and fs.layer_types is None
    with pytest.raises(ConfigError, match="no family"):
        fs["copy"]

