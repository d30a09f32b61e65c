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


# ---- where the needle really is --------------------------------------------------------------
def _ends_sentence(tok, token_id) -> bool:
    return tok.decode([token_id]).rstrip().endswith((".", "!", "?"))


def test_each_probe_records_where_its_needle_went(tok):
    needle = BUILTIN_NEEDLES[0]
    needle_ids = tok(" " + needle.needle, add_special_tokens=False)["input_ids"]
    for placement in ("sentence", "token"):
        ps = build_probes(tok, config=ProbeConfig(lengths=(900,), depths=(10, 40, 70),
                                                  placement=placement), needles=[needle])
        for p in ps:
            at, pos, budget = p.meta["insert_token"], p.meta["haystack_position"], p.meta["haystack_tokens"]
            assert list(p.prompt_ids[at:at + len(needle_ids)]) == needle_ids  # the needle is there
            assert p.placed_depth == pytest.approx(100 * pos / budget, abs=0.01)
            assert p.placement == {"placed_depth": p.placed_depth, "insert_token": at}
            wanted = int(budget * p.depth / 100)
            if placement == "token":
                assert pos == wanted
            else:  # the last sentence end at or before the requested token, found by scanning
                hay = list(p.prompt_ids[at - pos:at]) + list(p.prompt_ids[at + len(needle_ids):])
                ends = [i for i in range(1, wanted + 1) if _ends_sentence(tok, hay[i - 1])]
                assert pos == (ends[-1] if ends else 0)
                assert p.placed_depth <= p.depth


def test_depths_landing_on_one_position_are_reported(tok):
    from rhlens.probes import PlacementWarning, check_placements

    # At 400 tokens of the standard-library haystack, depths 0 and 25 share a sentence end.
    with pytest.warns(PlacementWarning, match=r"at length 400, depths 0 and 25 all land at depth 0%"):
        ps = build_probes(tok, config=ProbeConfig(lengths=(400,), depths=(0, 25, 100)),
                          needles=[BUILTIN_NEEDLES[0]])
    assert [p.placed_depth for p in ps] == [0.0, 0.0, 100.0]
    with pytest.raises(ProbeError, match="needle positions coincide"):
        check_placements(ps.probes, strict=True)
    # Exact token placement puts them apart.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", PlacementWarning)
        ps = build_probes(tok, config=ProbeConfig(lengths=(400,), depths=(0, 25, 100),
                                                  placement="token"), needles=[BUILTIN_NEEDLES[0]])
    assert len({p.meta["insert_token"] for p in ps}) == 3


def test_text_without_sentence_ends_puts_every_depth_at_the_start(tok, tmp_path):
    from rhlens.probes import PlacementWarning

    (tmp_path / "a.txt").write_text("words without any full stop " * 300)
    with pytest.warns(PlacementWarning, match="depths 0 and 25 and 50 and 75 all land at depth 0%"):
        ps = build_probes(tok, config=ProbeConfig(lengths=(600,)), needles=[BUILTIN_NEEDLES[1]],
                          haystack=tmp_path)
    assert [p.placed_depth for p in ps] == [0.0, 0.0, 0.0, 0.0, 100.0]


def test_the_answer_is_found_on_token_boundaries_not_inside_a_word(tok):
    n = Needle("Tonight the spare key is on the top shelf.", "Where is the spare key tonight?",
               "on", id="tonight")
    p = build_probe(tok, tok("Plain words. " * 100, add_special_tokens=False)["input_ids"], n,
                    length=400, depth=50)
    s, e = p.needle_span
    assert tok.decode(list(p.prompt_ids[s:e])).strip() == "on"
    # and not the "on" of "Tonight", which starts the needle
    assert s > p.meta["insert_token"] + 1


def test_answers_in_other_scripts_are_located(tok):
    n = Needle("Das Passwort lautet 北京烤鸭 und nichts anderes.", "Wie lautet das Passwort?",
               "北京烤鸭", id="cjk")
    p = build_probe(tok, tok("Plain words. " * 100, add_special_tokens=False)["input_ids"], n,
                    length=400, depth=50)
    s, e = p.needle_span
    assert tok.decode(list(p.prompt_ids[s:e])).strip() == "北京烤鸭"


def test_needles_file_that_is_not_utf8_or_is_a_folder(tmp_path):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(json.dumps({"needle": "x", "question": "y", "real_needle": "x"}).encode()
                    + b"\n" + '{"needle": "café"}'.encode("latin-1") + b"\n")
    with pytest.raises(ConfigError, match=r"line 2: not UTF-8 text"):
        load_needles(bad)
    with pytest.raises(ConfigError, match="is a directory"):
        load_needles(tmp_path)


def test_grid_values_given_twice_or_a_fractional_count():
    with pytest.raises(ConfigError, match="lengths given twice: 500"):
        ProbeConfig(lengths=(500, 900, 500))
    with pytest.raises(ConfigError, match="depths given twice: 50"):
        ProbeConfig(depths=(50, 50.0))
    with pytest.raises(ConfigError, match="whole number"):
        ProbeConfig.linspace(500, 1000, 2.7)
    # (under the test suite's runtime type checks the Literal annotation refuses it first)
    with pytest.raises(Exception, match="placement"):
        ProbeConfig(placement="middle")


# ---- identity --------------------------------------------------------------------------------
def test_probes_identity_changes_with_everything_that_shapes_the_prompts(tok, tmp_path):
    from rhlens.probes import probes_identity

    def ident(**kw):
        cfg = kw.pop("config", ProbeConfig(lengths=(450,), depths=(50,)))
        return probes_identity(build_probes(tok, config=cfg, **kw).probes)

    base = ident(needles=list(BUILTIN_NEEDLES[:2]))
    assert ident(needles=list(BUILTIN_NEEDLES[:2])) == base
    edited = Needle(BUILTIN_NEEDLES[0].needle.replace("Vell", "Vella"), BUILTIN_NEEDLES[0].question,
                    BUILTIN_NEEDLES[0].real_needle, id=BUILTIN_NEEDLES[0].id)
    changes = {
        "needles": ident(needles=[edited, BUILTIN_NEEDLES[1]]),
        "haystack": ident(needles=list(BUILTIN_NEEDLES[:2]), haystack="synthetic"),
        "chat_template": ident(needles=list(BUILTIN_NEEDLES[:2]),
                               config=ProbeConfig(lengths=(450,), depths=(50,), chat_template=False)),
        "template_sha256": ident(needles=list(BUILTIN_NEEDLES[:2]), config=ProbeConfig(
            lengths=(450,), depths=(50,), template="Doc: {context}\nQ: {question}")),
    }
    for key, other in changes.items():
        assert other[key] != base[key], key
        assert other["prompts"].keys() == base["prompts"].keys()
        changed = {k for k in base["prompts"] if other["prompts"][k] != base["prompts"][k]}
        mine = {k for k in base["prompts"] if k.endswith(BUILTIN_NEEDLES[0].id)}
        assert changed == (mine if key == "needles" else set(base["prompts"])), key
    assert changes["needles"]["needles"][BUILTIN_NEEDLES[1].id] == base["needles"][BUILTIN_NEEDLES[1].id]
    (tmp_path / "a.txt").write_text("One sentence here. Another one there. " * 200)
    a = ident(needles=[BUILTIN_NEEDLES[0]], haystack=tmp_path)
    (tmp_path / "a.txt").write_text("One sentence here. Another one where. " * 200)
    b = ident(needles=[BUILTIN_NEEDLES[0]], haystack=tmp_path)
    assert a["haystack"] == b["haystack"] == "dir" and a["haystack_sha256"] != b["haystack_sha256"]
