"""Probe building: exact needle spans, the grid, haystacks, and errors before any compute."""

from __future__ import annotations

import json

import pytest

from rhlens.errors import ConfigError, ProbeError
from rhlens.probe import Probe
from rhlens.probes import (
    BUILTIN_NEEDLES,
    Needle,
    ProbeConfig,
    StdlibHaystack,
    SyntheticHaystack,
    build_probe,
    build_probes,
    load_needles,
)


@pytest.fixture(scope="module")
def tok(default_model):
    return default_model[1]


def test_needle_span_holds_exactly_the_answer(tok):
    ps = build_probes(tok, config=ProbeConfig(lengths=(400, 700), depths=(0, 33, 100)))
    assert len(ps) == 2 * 3 * len(BUILTIN_NEEDLES)
    for p in ps:
        s, e = p.needle_span
        assert tok.decode(list(p.prompt_ids[s:e])).strip() == p.real_needle
        assert p.n_tokens <= p.length - ps.config.answer_buffer


def test_needle_sits_at_a_sentence_boundary_and_depth_orders_it(tok):
    ps = build_probes(tok, config=ProbeConfig(lengths=(800,), depths=(0, 50, 100)),
                      needles=[BUILTIN_NEEDLES[0]])
    starts = [p.meta["insert_token"] for p in ps]
    assert starts[0] < starts[1] < starts[2]
    mid = ps[1]
    before = tok.decode([mid.prompt_ids[mid.meta["insert_token"] - 1]])
    assert before.rstrip().endswith((".", "!", "?"))


def test_chat_template_on_and_off(tok):
    on = build_probes(tok, config=ProbeConfig(lengths=(400,), depths=(50,)))[0]
    off = build_probes(tok, config=ProbeConfig(lengths=(400,), depths=(50,), chat_template=False))[0]
    assert "<|im_start|>" in tok.decode(list(on.prompt_ids))
    assert "<|im_start|>" not in tok.decode(list(off.prompt_ids))
    assert tok.decode(list(off.prompt_ids)).rstrip().endswith("Answer:")


def test_deterministic_for_source_and_seed(tok):
    cfg = ProbeConfig(lengths=(400,), depths=(25,), haystack_seed=3)
    a = build_probes(tok, config=cfg, haystack="synthetic")[0]
    b = build_probes(tok, config=cfg, haystack="synthetic")[0]
    c = build_probes(tok, config=ProbeConfig(lengths=(400,), depths=(25,), haystack_seed=4),
                     haystack="synthetic")[0]
    assert a.prompt_ids == b.prompt_ids != c.prompt_ids
    assert StdlibHaystack().text(1000) == StdlibHaystack().text(1000)
    assert SyntheticHaystack(1).text(500) != SyntheticHaystack(2).text(500)


def test_directory_haystack(tok, tmp_path):
    (tmp_path / "b.txt").write_text("Second file. It has words. " * 50)
    (tmp_path / "a.txt").write_text("First file here. Plain sentences only. " * 5)
    p = build_probes(tok, config=ProbeConfig(lengths=(400,), depths=(0,)), haystack=tmp_path)[0]
    text = tok.decode(list(p.prompt_ids))
    assert text.index("First file") < text.index("Second file")


def test_empty_haystack_directory(tok, tmp_path):
    with pytest.raises(ConfigError, match=r"no \.txt files"):
        build_probes(tok, config=ProbeConfig(lengths=(400,), depths=(0,)), haystack=tmp_path)
    (tmp_path / "a.txt").write_text("   ")
    with pytest.raises(ConfigError, match="empty"):
        build_probes(tok, config=ProbeConfig(lengths=(400,), depths=(0,)), haystack=tmp_path)


def test_length_too_short_for_needle_and_question(tok):
    with pytest.raises(ProbeError, match="too short"):
        build_probes(tok, config=ProbeConfig(lengths=(250,), depths=(0,)))


def test_length_beyond_model_context(tok):
    with pytest.raises(ProbeError, match="maximum context of 1024"):
        build_probes(tok, config=ProbeConfig(lengths=(2000,), depths=(0,)), max_length=1024)


def test_needle_whose_answer_is_not_in_it():
    with pytest.raises(ProbeError, match="does not occur in the needle"):
        Needle("The cat is black.", "What colour is the cat?", "white", id="x")


def test_needles_file_roundtrip_and_malformed_lines(tmp_path):
    good = tmp_path / "n.jsonl"
    rows = [{"needle": "The vault code is 4471.", "question": "What is the vault code?",
             "real_needle": "4471"}]
    good.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (needle,) = load_needles(good)
    assert needle.real_needle == "4471" and needle.id == "n-1"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n{not json\n")
    with pytest.raises(ConfigError, match="line 2: not valid JSON"):
        load_needles(bad)
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({"needle": "x", "question": "y"}) + "\n")
    with pytest.raises(ConfigError, match=r"line 1: missing field.*real_needle"):
        load_needles(missing)
    with pytest.raises(ConfigError, match="does not exist"):
        load_needles(tmp_path / "nope.jsonl")


def test_grid_config_validation():
    with pytest.raises(ConfigError, match="depths are percentages"):
        ProbeConfig(depths=(150,))
    with pytest.raises(ConfigError, match="lengths must be positive"):
        ProbeConfig(lengths=(0,))
    assert ProbeConfig.linspace(1000, 2000, 3) == (1000, 1500, 2000)
    assert ProbeConfig.linspace(0, 100, 5, integer=False) == (0.0, 25.0, 50.0, 75.0, 100.0)


def test_probe_refuses_a_span_outside_the_prompt():
    with pytest.raises(ProbeError, match="could not be located"):
        Probe(prompt_ids=(1, 2, 3), needle_span=(2, 5), real_needle="x")


def test_answer_span_with_a_merging_tokenizer_uses_offsets(tok):
    # "42nd" could merge with what follows; the span must still cover exactly the answer.
    n = Needle("The meeting room is 42nd-floor-West, behind the plants.",
               "Which meeting room?", "42nd-floor-West", id="merge")
    p = build_probe(tok, tok("Some words. " * 100, add_special_tokens=False)["input_ids"], n,
                    length=400, depth=50)
    s, e = p.needle_span
    assert "42nd-floor-West" in tok.decode(list(p.prompt_ids[s:e]))
