"""``rhlens official --fetch DIR``: download the paper's released retrieval-score files."""

from __future__ import annotations

import argparse

from rhlens.cli.args import say
from rhlens.errors import ConfigError

__all__ = ["add_parsers", "cmd_official"]


def add_parsers(sub) -> None:
    p = sub.add_parser("official", help="fetch the retrieval-score files Wu et al. released",
                       description="Download the paper's official per-head score files (needs "
                                   "a network) into a directory, for `rhlens report --official` "
                                   "and the properties analyses.")
    p.add_argument("--fetch", required=True, metavar="DIR",
                   help="directory to download the files into (created if needed)")
    p.add_argument("--model", dest="models", action="append", default=None, metavar="NAME",
                   help="fetch only this model's file (repeatable; default: all of them)")
    p.set_defaults(func=cmd_official,
                   interrupted=lambda args: f"interrupted; files fetched so far are in {args.fetch}")


def cmd_official(args: argparse.Namespace) -> int:
    from rhlens.store.logs import prepare_output

    directory = prepare_output(args.fetch)
    try:
        from rhlens.retrieval.official import fetch_official_scores
    except ImportError:
        raise ConfigError("this rhlens cannot fetch the official scores (rhlens.official is "
                          "missing); download them by hand from the paper's repository") from None
    written = fetch_official_scores(directory, models=args.models)
    items = written.items() if isinstance(written, dict) else enumerate(written or [])
    for name, path in items:
        say(f"  {name}: {path}" if isinstance(name, str) else f"  {path}")
    say(f"wrote the official score files into {directory}")
    return 0
