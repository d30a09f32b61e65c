"""rhlens: retrieval heads, found, knocked out and patched, on any TransformerLens-bridged model.

The top-level names are imported lazily (PEP 562), so that ``import rhlens`` and
``rhlens --help`` do not pay for torch and transformers until something needs them.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from rhlens.errors import ConfigError, ModelLoadError, ProbeError, RhlensError

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from rhlens.engine import EngineHook, GenerationConfig, KernelPolicy
    from rhlens.models import load_model
    from rhlens.results import load_result
    from rhlens.scores import RetrievalScores

__all__ = [
    "ConfigError",
    "EngineHook",
    "GenerationConfig",
    "KernelPolicy",
    "ModelLoadError",
    "ProbeError",
    "RetrievalScores",
    "RhlensError",
    "load_model",
    "load_result",
]
__version__ = "0.1.0"

_LAZY = {"load_model": "rhlens.models", "RetrievalScores": "rhlens.scores",
         "load_result": "rhlens.results", "EngineHook": "rhlens.engine",
         "GenerationConfig": "rhlens.engine", "KernelPolicy": "rhlens.engine"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'rhlens' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
