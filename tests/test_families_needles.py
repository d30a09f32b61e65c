"""Non-literal needles: no content word shared with the needle, answers verbatim, loadable as any needles."""

from __future__ import annotations

import pytest

from rhlens.errors import ConfigError
from rhlens.families import NONLITERAL_NEEDLES, content_words, needle_set, shared_content_words, write_needles
from rhlens.families.needles import STOP_WORDS
from rhlens.probes import BUILTIN_NEEDLES, load_needles


def test_nonliteral_questions_share_no_content_word_with_their_needle():
    for n in NONLITERAL_NEEDLES:
        assert shared_content_words(n) == set(), n.id
        assert len(content_words(n.question)) >= 3, n.id  # a real question, not stop words


def test_the_check_has_teeth_on_the_literal_needles():
    """Every built-in question repeats words of its needle: the check finds them."""
    for n in BUILTIN_NEEDLES:
        assert len(shared_content_words(n)) >= 3, n.id
    assert "lighthous" in shared_content_words(BUILTIN_NEEDLES[0])  # stemmed, as ROUGE does


def test_content_words_leave_out_stop_words_stemmed_or_not():
    assert content_words("Where is the key hidden, and how can someone find it?") == {"key", "hidden", "find"}
    assert content_words("The 17 keys") == {"key"}  # numbers in digits are not words of content
    assert {"the", "under", "someone"} <= STOP_WORDS


def test_nonliteral_needles_pair_with_the_literal_ones():
    """Same needle sentence and answer (a short verbatim span): only the question differs."""
    assert len(NONLITERAL_NEEDLES) == len(BUILTIN_NEEDLES)
    for lit, nl in zip(BUILTIN_NEEDLES, NONLITERAL_NEEDLES):
        assert (nl.needle, nl.real_needle) == (lit.needle, lit.real_needle)
        assert nl.question != lit.question and nl.id == lit.id + "-nl"
        assert nl.real_needle in nl.needle and len(nl.real_needle.split()) <= 8


def test_needle_sets_load_through_the_ordinary_needles_file(tmp_path):
    path = write_needles(tmp_path / "nl.jsonl", NONLITERAL_NEEDLES)
    assert load_needles(path) == list(NONLITERAL_NEEDLES)
    assert needle_set("literal") == BUILTIN_NEEDLES and needle_set("nonliteral") == NONLITERAL_NEEDLES
    with pytest.raises(ConfigError, match="unknown needle set"):
        needle_set("poetic")


def test_nonliteral_probes_build_and_locate_their_question(default_model):
    from rhlens.families import needle_sentence_span, question_span
    from rhlens.probes import ProbeConfig, build_probes

    _, tok = default_model
    probes = build_probes(tok, config=ProbeConfig(lengths=(500,), depths=(50,)), needles=NONLITERAL_NEEDLES)
    for p in probes:
        q0, q1 = question_span(p, tok)
        assert tok.decode(p.prompt_ids[q0:q1]).strip() == p.question
        s0, s1 = needle_sentence_span(p)
        assert s0 <= p.needle_span[0] < p.needle_span[1] <= s1 < q0
        assert p.needle_id.endswith("-nl")
