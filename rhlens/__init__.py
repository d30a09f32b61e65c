"""rhlens: retrieval heads, found, knocked out and patched, on any TransformerLens-bridged model.

The top-level names are imported lazily (PEP 562), so that ``import rhlens`` and
``rhlens --help`` do not pay for torch and transformers until something needs them.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from rhlens.errors import ConfigError as ConfigError
from rhlens.errors import ModelLoadError as ModelLoadError
from rhlens.errors import ProbeError as ProbeError
from rhlens.errors import RhlensError as RhlensError

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
    "RetrievalScores": ("rhlens.scores", "RetrievalScores"),
    # knocking heads out
    "ablate_heads": ("rhlens.ablation", "ablate_heads"),
    "Mask": ("rhlens.ablation", "Mask"),
    "top_k_mask": ("rhlens.ablation", "top_k_mask"),
    "random_k_mask": ("rhlens.ablation", "random_k_mask"),
    "parse_mask": ("rhlens.ablation", "parse_mask"),
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
    "cot_ablation": ("rhlens.cot.experiment", "cot_ablation"),
    "CoTConfig": ("rhlens.cot.experiment", "CoTConfig"),
    "CoTResult": ("rhlens.cot.experiment", "CoTResult"),
    "compress_sweep": ("rhlens.compress.sweep", "compress_sweep"),
    "CompressSweepResult": ("rhlens.compress.sweep", "CompressSweepResult"),
    "score_families": ("rhlens.families", "score_families"),
    # looking at heads
    "trace_heads": ("rhlens.trace", "trace_heads"),
    "HeadTrace": ("rhlens.trace", "HeadTrace"),
    "head_view": ("rhlens.views", "head_view"),
    "FamilyScores": ("rhlens.families", "FamilyScores"),
    # results
    "load_result": ("rhlens.results", "load_result"),
}

__all__ = sorted(["ConfigError", "ModelLoadError", "ProbeError", "RhlensError", *_LAZY])
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attribute = _LAZY[name]
        value = getattr(import_module(module), attribute)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'rhlens' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
