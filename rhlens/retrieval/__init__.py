"""Retrieval heads: the scores, the copy rule, detection and the paper's released files.

* :mod:`.scores`: :class:`RetrievalScores` (per-probe scores of every head) and the paper's
  ``{"L-H": [...]}`` JSON;
* :mod:`.config`: :class:`DetectConfig`, the settings of a detection run;
* :mod:`.detect`: the copy rule, from the engine's decode steps (:class:`TopKeyRecorder`,
  :func:`detect_retrieval_heads`) or from a user's cache (:func:`retrieval_scores_from_cache`,
  :func:`cache_answer_patterns`, :func:`probe_retrieval_scores`);
* :mod:`.official`: the per-head scores Wu et al. (2024) released.
"""

from rhlens.deprecation import package_names
from rhlens.retrieval import config, detect, official, scores
from rhlens.retrieval.config import DetectConfig
from rhlens.retrieval.detect import (
    TopKeyRecorder,
    bridge_shape,
    cache_answer_patterns,
    check_probes,
    copy_mask,
    copy_scores,
    detect_retrieval_heads,
    pattern_layers,
    probe_retrieval_scores,
    retrieval_scores_from_cache,
    rouge1_recall,
    scores_from_records,
    top_keys_from_cache,
)
from rhlens.retrieval.official import fetch_official_scores, load_official
from rhlens.retrieval.scores import Head, RetrievalScores

__all__ = [
    "DetectConfig",
    "Head",
    "RetrievalScores",
    "TopKeyRecorder",
    "bridge_shape",
    "cache_answer_patterns",
    "check_probes",
    "copy_mask",
    "copy_scores",
    "detect_retrieval_heads",
    "fetch_official_scores",
    "load_official",
    "pattern_layers",
    "probe_retrieval_scores",
    "retrieval_scores_from_cache",
    "rouge1_recall",
    "scores_from_records",
    "top_keys_from_cache",
]


# every other name the module rhlens.retrieval had before it became a package
__getattr__ = package_names("rhlens.retrieval", (detect, scores, config, official))
