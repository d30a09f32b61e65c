"""Causal head patching: which heads carry the needle to the answer, and through which path.

Reading order:

* :mod:`~rhlens.patching.pairs`: clean/corrupted prompt pairs from needle probes
  (:func:`make_pairs`, :func:`make_pair`, :class:`PatchPair`);
* :mod:`~rhlens.patching.config`: :class:`PatchConfig` (what is patched, where, which way,
  the metric), the activations a patch can write, and the checks made before any compute;
* :mod:`~rhlens.patching.runner`: the fast runner of one pair's ``z`` patches (exact,
  batched per layer, and attribution patching);
* :mod:`~rhlens.patching.activations`: any per-head activation (``q``, ``k``, ``v``, ``z``,
  ``pattern``, ``result``, the ``ov`` path) from a user's ``ActivationCache``, as
  TransformerLens' ``patching`` module does (:func:`patch_activation`);
* :mod:`~rhlens.patching.heads`: :func:`patch_heads` over pairs (resumable with ``out=``)
  and :func:`patch_head_set`;
* :mod:`~rhlens.patching.results`: :class:`HeadPatchingResult` (converts to TransformerLens'
  ``PatchingResult``), :func:`compare_patching`, :func:`patching_vs_retrieval`.

``direction="denoise"`` patches clean into corrupted and asks how much of the clean behaviour
comes back; ``"noise"`` patches corrupted into clean and asks how much is lost. Both give
effects where 1 means "this head alone carries all of it" and 0 "nothing".
"""

from rhlens.patching.activations import patch_activation
from rhlens.patching.config import ACTIVATIONS, PatchConfig
from rhlens.patching.heads import patch_head_set, patch_heads
from rhlens.patching.pairs import ALTERNATIVE_ANSWERS, PatchPair, make_pair, make_pairs
from rhlens.patching.results import (
    HeadPatchingResult,
    PatchingVsRetrieval,
    compare_patching,
    patching_vs_retrieval,
)

__all__ = [
    "ACTIVATIONS",
    "ALTERNATIVE_ANSWERS",
    "HeadPatchingResult",
    "PatchConfig",
    "PatchPair",
    "PatchingVsRetrieval",
    "compare_patching",
    "make_pair",
    "make_pairs",
    "patch_activation",
    "patch_head_set",
    "patch_heads",
    "patching_vs_retrieval",
]
