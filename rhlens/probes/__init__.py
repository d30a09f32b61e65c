"""Probes: the :class:`Probe` (:mod:`.probe`), haystacks (:mod:`.haystacks`), needles and
building the grid (:mod:`.build`)."""

from rhlens.probes import build, haystacks
from rhlens.probes.build import (
    BUILTIN_NEEDLES,
    Needle,
    PlacementWarning,
    ProbeConfig,
    ProbeSet,
    build_probe,
    build_probes,
    check_placements,
    load_needles,
    needle_tokens,
)
from rhlens.probes.haystacks import (
    DirectoryHaystack,
    Haystack,
    StdlibHaystack,
    SyntheticHaystack,
    make_haystack,
    sha256_text,
)
from rhlens.probes.probe import Probe
from rhlens.store.identity import probes_grid, probes_identity

__all__ = [
    "BUILTIN_NEEDLES",
    "DirectoryHaystack",
    "Haystack",
    "Needle",
    "PlacementWarning",
    "Probe",
    "ProbeConfig",
    "ProbeSet",
    "StdlibHaystack",
    "SyntheticHaystack",
    "build_probe",
    "build_probes",
    "check_placements",
    "load_needles",
    "make_haystack",
    "needle_tokens",
    "probes_grid",
    "probes_identity",
    "sha256_text",
]


def __getattr__(attr: str):
    """Every other name of the module ``rhlens.probes`` was before it became a package (its
    submodules' names, private ones included), so that older code keeps working."""
    for module in (build, haystacks,):
        if hasattr(module, attr):
            return getattr(module, attr)
    raise AttributeError(f"module 'rhlens.probes' has no attribute {attr!r}")
