"""Score families: which heads retrieve, by the paper's copy score and others, judged by masking them.

The paper's score counts a head only when its top-1 attention lands on the very needle token
being written. Other scores rank heads differently; this package computes them side by side
on the same probes and asks the causal question (whose top-K heads, masked, break retrieval
with the fewest heads?):

* ``copy`` / ``copy-paper``: the paper's retrieval score (unique / the authors' count);
* ``mass``: attention weight on the needle at the answer's decode steps (HeadKV's
  retrieval-reasoning flavour), from the same decode pass as ``copy``
  (:class:`AnswerRecorder`); :func:`needle_mass_scores` is its one public home as a grid;
* ``query``: attention from the question's tokens to the needle sentence (QRHead-style),
  question rows only (:func:`probe_query_scores`);
* ``induction``, ``previous-token``, ``duplicate-token``: TransformerLens' own head
  detectors (``transformer_lens.head_detector``, which runs on a bridge) on repeated random words.

:func:`score_families` gives a :class:`FamilySet` (each family a :class:`FamilyScores`, a
``RetrievalScores`` with a name); :func:`damage_sweep` gives a :class:`DamageResult` (NIAH
against K per family and for random heads; K to halve NIAH and the AUC with bootstrap
intervals). :data:`NONLITERAL_NEEDLES` asks the built-in needles' questions in other words.

Modules: ``result`` (the results), ``recorder`` (the decode pass's recorder), ``forced``
(question rows and teacher-forced answers), ``detectors``, ``compute`` (:func:`score_families`),
``judge`` (the causal judgement), ``needles``.
"""

from rhlens.families.compute import FAMILIES_LOG, layer_types, needle_mass_scores, score_families
from rhlens.families.detectors import DETECTORS, detector_scores, repeated_sequences
from rhlens.families.forced import forced_scores, needle_sentence_span, probe_query_scores, question_span
from rhlens.families.judge import DEFAULT_KS, DamageResult, curve_auc, damage_masks, damage_sweep, k_to_halve
from rhlens.families.needles import (
    NEEDLE_SETS,
    NONLITERAL_NEEDLES,
    content_words,
    needle_set,
    shared_content_words,
    write_needles,
)
from rhlens.families.recorder import AnswerRecorder, span_mass
from rhlens.families.result import (
    DETECTOR_FAMILIES,
    FAMILIES,
    PROBE_FAMILIES,
    FamiliesConfig,
    FamilyScores,
    FamilySet,
    check_families,
)

__all__ = [
    "DEFAULT_KS",
    "DETECTORS",
    "DETECTOR_FAMILIES",
    "FAMILIES",
    "FAMILIES_LOG",
    "NEEDLE_SETS",
    "NONLITERAL_NEEDLES",
    "PROBE_FAMILIES",
    "AnswerRecorder",
    "DamageResult",
    "FamiliesConfig",
    "FamilyScores",
    "FamilySet",
    "check_families",
    "content_words",
    "curve_auc",
    "damage_masks",
    "damage_sweep",
    "detector_scores",
    "forced_scores",
    "k_to_halve",
    "layer_types",
    "needle_mass_scores",
    "needle_sentence_span",
    "needle_set",
    "probe_query_scores",
    "question_span",
    "repeated_sequences",
    "score_families",
    "shared_content_words",
    "span_mass",
    "write_needles",
]
