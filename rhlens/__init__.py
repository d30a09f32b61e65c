"""rhlens: retrieval heads, found, knocked out and patched, on any TransformerLens-bridged model.

The top-level names are imported lazily (PEP 562), so that ``import rhlens`` and
``rhlens --help`` do not pay for torch and transformers until something needs them.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from rhlens import deprecation
from rhlens.errors import ConfigError as ConfigError
from rhlens.errors import ModelLoadError as ModelLoadError
from rhlens.errors import ProbeError as ProbeError
from rhlens.errors import ResultError as ResultError
from rhlens.errors import RhlensError as RhlensError
from rhlens.store.registry import register_homes, register_view
from rhlens.version import __version__ as __version__

# The face a notebook needs, ``import rhlens as rh``: name -> (module, attribute there).
# Nothing is imported until a name is first used. A verb never takes a subpackage's name
# (``rhlens.niah`` and ``rhlens.compress`` are modules: the NIAH verb is ``niah_sweep``, the
# compression one ``compress_sweep``), or importing the module would replace the verb.
_LAZY: dict[str, tuple[str, str]] = {
    # models and probes
    "load_model": ("rhlens.models", "load_model"),
    "build_probes": ("rhlens.probes", "build_probes"),
    "ProbeConfig": ("rhlens.probes", "ProbeConfig"),
    "Needle": ("rhlens.probes", "Needle"),
    "BUILTIN_NEEDLES": ("rhlens.probes", "BUILTIN_NEEDLES"),
    "load_needles": ("rhlens.probes", "load_needles"),
    # the engine
    "generate": ("rhlens.engine", "generate"),
    "generate_many": ("rhlens.engine", "generate_many"),
    "EngineHook": ("rhlens.engine", "EngineHook"),
    "GenerationConfig": ("rhlens.engine", "GenerationConfig"),
    "KernelPolicy": ("rhlens.engine", "KernelPolicy"),
    # retrieval scores
    "detect": ("rhlens.retrieval", "detect_retrieval_heads"),
    "DetectConfig": ("rhlens.retrieval", "DetectConfig"),
    "retrieval_scores_from_cache": ("rhlens.retrieval", "retrieval_scores_from_cache"),
    "probe_retrieval_scores": ("rhlens.retrieval", "probe_retrieval_scores"),
    "RetrievalScores": ("rhlens.retrieval", "RetrievalScores"),
    # knocking heads out
    "ablate_heads": ("rhlens.ablation", "ablate_heads"),
    "Mask": ("rhlens.masks", "Mask"),
    "top_k_mask": ("rhlens.masks", "top_k_mask"),
    "random_k_mask": ("rhlens.masks", "random_k_mask"),
    "parse_mask": ("rhlens.masks", "parse_mask"),
    # analyses
    "niah_sweep": ("rhlens.niah", "niah_sweep"),
    "NIAHConfig": ("rhlens.niah", "NIAHConfig"),
    "NIAHResult": ("rhlens.niah", "NIAHResult"),
    "mask_sweep": ("rhlens.niah", "mask_sweep"),
    "MaskSweepResult": ("rhlens.niah", "MaskSweepResult"),
    "patch_activation": ("rhlens.patching", "patch_activation"),
    "patch_heads": ("rhlens.patching", "patch_heads"),
    "make_pairs": ("rhlens.patching", "make_pairs"),
    "PatchConfig": ("rhlens.patching", "PatchConfig"),
    "HeadPatchingResult": ("rhlens.patching", "HeadPatchingResult"),
    "cot_ablation": ("rhlens.cot", "cot_ablation"),
    "CoTConfig": ("rhlens.cot", "CoTConfig"),
    "CoTResult": ("rhlens.cot", "CoTResult"),
    "compress_sweep": ("rhlens.compress", "compress_sweep"),
    "CompressSweepResult": ("rhlens.compress", "CompressSweepResult"),
    "CacheLayout": ("rhlens.compress", "CacheLayout"),
    "CompressConfig": ("rhlens.compress", "CompressConfig"),
    "budget_policy": ("rhlens.compress", "budget_policy"),
    "policy_hooks": ("rhlens.compress", "policy_hooks"),
    "score_families": ("rhlens.families", "score_families"),
    # looking at heads
    "trace_heads": ("rhlens.trace", "trace_heads"),
    "HeadTrace": ("rhlens.trace", "HeadTrace"),
    "head_view": ("rhlens.views", "head_view"),
    "FamilyScores": ("rhlens.families", "FamilyScores"),
    # results
    "load_result": ("rhlens.store.results", "load_result"),
}

__all__ = sorted(["ConfigError", "ModelLoadError", "ProbeError", "ResultError", "RhlensError", *_LAZY])

# Where each kind of saved result is defined: the store imports no analysis, so this layer,
# which knows them all, tells it which module to import for a kind it has not seen yet
# (``load_result`` in a fresh interpreter). A class registers itself once its module runs.
register_homes({
    "RetrievalScores": "rhlens.retrieval",
    "SparsityResult": "rhlens.properties", "DynamicResult": "rhlens.properties",
    "StabilityResult": "rhlens.properties", "IntrinsicResult": "rhlens.properties",
    "UniversalTable": "rhlens.properties",
    "NIAHResult": "rhlens.niah", "MaskSweepResult": "rhlens.niah",
    "HeadPatchingResult": "rhlens.patching", "PatchingVsRetrieval": "rhlens.patching",
    "CoTResult": "rhlens.cot",
    "FamilyScores": "rhlens.families", "FamilySet": "rhlens.families",
    "DamageResult": "rhlens.families",
    "CompressSweepResult": "rhlens.compress",
})
register_view("rhlens.views.results")  # results display themselves through the views
deprecation.install()  # old module paths (rhlens.results, rhlens.scores, ...) keep working


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attribute = _LAZY[name]
        value = getattr(import_module(module), attribute)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'rhlens' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
