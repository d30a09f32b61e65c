"""rhlens' exceptions: each says what went wrong and what to do, before any compute starts."""

from __future__ import annotations

__all__ = ["ConfigError", "ModelLoadError", "ProbeError", "ResultError", "RhlensError"]


class RhlensError(ValueError):
    """Base class of every error rhlens raises on purpose."""


class ModelLoadError(RhlensError):
    """A model could not be found, installed, read or bridged."""


class ProbeError(RhlensError):
    """A probe cannot be built or scored (needle not found, context too long, ...)."""


class ConfigError(RhlensError):
    """A configuration value is out of range or inconsistent."""


class ResultError(RhlensError):
    """A saved result is missing, damaged, of another kind, or from a newer rhlens."""
