"""rhlens: retrieval heads, found, knocked out and patched, on any TransformerLens-bridged model."""

from rhlens.errors import ConfigError, ModelLoadError, ProbeError, RhlensError
from rhlens.models import load_model
from rhlens.scores import RetrievalScores

__all__ = [
    "ConfigError",
    "ModelLoadError",
    "ProbeError",
    "RetrievalScores",
    "RhlensError",
    "load_model",
]
__version__ = "0.1.0"
