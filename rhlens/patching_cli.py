"""Moved to :mod:`rhlens.cli.patch`; these names stay for code that imported them here."""

from rhlens.cli.patch import add_patch_parser, cmd_patch

__all__ = ["add_patch_parser", "cmd_patch"]
