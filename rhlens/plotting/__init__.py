"""Figures from rhlens results: every function returns a matplotlib ``Figure``, never shows it.

Other submodules (NIAH, ablation, patching, ...) will be added here by others; the lead
merges their imports into this file.
"""

from rhlens.plotting.properties import *  # noqa: F403
from rhlens.plotting.properties import __all__ as _properties_all

__all__ = [*_properties_all]
