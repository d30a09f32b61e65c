"""Figures from rhlens results: every function returns a matplotlib ``Figure``, never shows it."""

from rhlens.plotting.ablation import *  # noqa: F403
from rhlens.plotting.ablation import __all__ as _ablation_all
from rhlens.plotting.compress import *  # noqa: F403
from rhlens.plotting.compress import __all__ as _compress_all
from rhlens.plotting.cot import *  # noqa: F403
from rhlens.plotting.cot import __all__ as _cot_all
from rhlens.plotting.detection import *  # noqa: F403
from rhlens.plotting.detection import __all__ as _detection_all
from rhlens.plotting.families import *  # noqa: F403
from rhlens.plotting.families import __all__ as _families_all
from rhlens.plotting.patching import *  # noqa: F403
from rhlens.plotting.patching import __all__ as _patching_all
from rhlens.plotting.properties import *  # noqa: F403
from rhlens.plotting.properties import __all__ as _properties_all

__all__ = [*_ablation_all, *_compress_all, *_cot_all, *_detection_all, *_families_all, *_patching_all,
           *_properties_all]
