"""Non-literal needles: questions that share no content word with the needle they ask about.

The paper's needles ask ``"What is the secret ingredient in Marta's lighthouse soup?"`` of a
needle that says ``"The secret ingredient in Marta's lighthouse soup is ..."``: a head can find
the answer by matching the question's words in the context. :data:`NONLITERAL_NEEDLES` keeps
the four built-in needle sentences and answers (:data:`rhlens.probes.BUILTIN_NEEDLES`) and
only rewords the questions so that no content word (after ROUGE's stemming, stop words left
out) is shared with the needle sentence: ``"Which spice flavours the broth served at the
coastal beacon?"``. The two sets make paired probes (same haystack, needle, answer span and
depth); only the question's literalness differs. Pass them as ``build_probes(tok,
needles=NONLITERAL_NEEDLES)``; :func:`content_words` and :func:`shared_content_words` are the
check (tests assert it), :func:`write_needles` writes a set as the JSONL ``--needles`` reads.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import cache
from pathlib import Path

from rhlens.errors import ConfigError
from rhlens.probes import BUILTIN_NEEDLES, Needle
from rhlens.stats import rouge_tokens

__all__ = [
    "NEEDLE_SETS",
    "NONLITERAL_NEEDLES",
    "STOP_WORDS",
    "content_words",
    "needle_set",
    "shared_content_words",
    "write_needles",
]

# English function words (and ROUGE-stemmed forms of a few): what a "content word" is not.
STOP_WORDS: frozenset[str] = frozenset((
    "a", "about", "above", "after", "again", "against", "all", "am", "an", "and", "any", "are",
    "as", "at", "be", "been", "before", "being", "below", "between", "both", "but", "by", "can",
    "could", "did", "do", "does", "doing", "down", "during", "each", "few", "for", "from",
    "further", "had", "has", "have", "having", "he", "her", "here", "hers", "herself", "him",
    "himself", "his", "how", "i", "if", "in", "into", "is", "it", "its", "itself", "just", "me",
    "more", "most", "my", "myself", "no", "nor", "not", "now", "of", "off", "on", "once", "one",
    "only", "or", "other", "our", "ours", "out", "over", "own", "same", "she", "should", "so",
    "some", "someone", "something", "such", "than", "that", "the", "their", "theirs", "them",
    "themselves", "then", "there", "these", "they", "this", "those", "through", "to", "too",
    "under", "until", "up", "very", "was", "we", "were", "what", "when", "where", "which", "while",
    "who", "whom", "why", "will", "with", "would", "you", "your", "yours", "yourself", "s", "t",
))  # fmt: skip

_BY_ID = {n.id: n for n in BUILTIN_NEEDLES}

def _asked_otherwise(needle_id: str, question: str) -> Needle:
    """The built-in needle ``needle_id`` (same sentence, same answer) with another question."""
    n = _BY_ID[needle_id]
    return Needle(needle=n.needle, question=question, real_needle=n.real_needle, id=f"{needle_id}-nl")


# Written for rhlens: the built-in needles, asked about in other words.
NONLITERAL_NEEDLES: tuple[Needle, ...] = (
    _asked_otherwise("lighthouse-soup", "Which spice flavours the broth served at the coastal beacon?"),
    _asked_otherwise("observatory-password", "What secret phrase grants entry to the astronomy building?"),
    _asked_otherwise("pellmoor-dragon", "How can someone soothe the fire-breathing beast?"),
    _asked_otherwise("orlen-key", "Where was the item that opens the crystal gallery stashed?"),
)

NEEDLE_SETS: dict[str, tuple[Needle, ...]] = {"literal": BUILTIN_NEEDLES,
                                              "nonliteral": NONLITERAL_NEEDLES}


def needle_set(name: str) -> tuple[Needle, ...]:
    """The needles of a named set: ``"literal"`` (the built-in ones) or ``"nonliteral"``."""
    if name not in NEEDLE_SETS:
        raise ConfigError(f"unknown needle set {name!r}; known: {', '.join(NEEDLE_SETS)}")
    return NEEDLE_SETS[name]


@cache
def _stop_tokens() -> frozenset[str]:
    """The stop words as ROUGE tokens (stemmed: "someone" is "someon")."""
    return frozenset(t for w in STOP_WORDS for t in [w, *rouge_tokens(w)])


def content_words(text: str) -> set[str]:
    """The words of ``text`` that carry content: ROUGE tokens (lower-cased, Porter-stemmed,
    :func:`rhlens.stats.rouge_tokens`) that are not stop words or numbers written in digits."""
    return {t for t in rouge_tokens(text) if t not in _stop_tokens() and not t.isdigit()}


def shared_content_words(needle: Needle) -> set[str]:
    """Content words the question shares with the needle sentence (empty: non-literal)."""
    return content_words(needle.question) & content_words(needle.needle)


def write_needles(path: str | Path, needles: Sequence[Needle]) -> Path:
    """``needles`` as the JSONL file ``--needles`` and :func:`rhlens.probes.load_needles` read."""
    from rhlens.results import atomic_write_text

    return atomic_write_text(path, "".join(json.dumps({"id": n.id, "needle": n.needle,
                                                      "question": n.question,
                                                      "real_needle": n.real_needle}) + "\n"
                                          for n in needles))  # never through a planted link
