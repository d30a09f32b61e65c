"""Probes: the :class:`Probe` (:mod:`.probe`), haystacks (:mod:`.haystacks`), needles and
building the grid (:mod:`.build`)."""

from rhlens.deprecation import package_names
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


# every other name the module rhlens.probes had before it became a package
__getattr__ = package_names("rhlens.probes", (build, haystacks))
