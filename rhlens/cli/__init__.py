"""The ``rhlens`` command: parse flags into configs, check them, call the library, save, say where.

Every subcommand is a thin composition of functions a notebook can call directly:
``detect``/``ask`` (:mod:`.detect`), ``niah``/``mask-sweep`` (:mod:`.niah`), ``scores``
(score families, :mod:`.scores`), ``compress`` (head-selective KV caches against the KV
budget, :mod:`.compress`), ``cot``, ``patch``, ``report``, ``show`` (heads at work on one
probe, :mod:`.show`) and ``official``. Flags become configs in :mod:`.args` only; what
must be checked before the model loads is checked in :mod:`.prepare`. A bad input ends with
one line, ``rhlens: error: ...``, and exit code 2.
Importing this package does not import torch, so ``rhlens --help`` is fast.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from rhlens.cli.args import Parser, error_line, one_line, say, state_defaults
from rhlens.errors import RhlensError

__all__ = ["build_parser", "main"]


def _version() -> str:
    from rhlens import __version__

    return f"rhlens {__version__}"


def build_parser() -> argparse.ArgumentParser:
    from rhlens.cli import compress, cot, detect, niah, official, patch, report, scores, show

    parser = Parser(prog="rhlens",
                    description="Find, knock out and patch retrieval heads (Wu et al., 2024).")
    parser.add_argument("--version", action="version", version=_version(),
                        help="print rhlens' version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=Parser)
    for module in (detect, niah, scores, compress, cot, patch, report, show, official):
        module.add_parsers(sub)
    state_defaults(parser)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """rhlens' own warnings as one line each; anyone else's as Python prints them."""
    if category.__module__.startswith("rhlens") or \
            Path(filename).resolve().is_relative_to(Path(__file__).resolve().parents[1]):
        print(f"rhlens: warning: {one_line(str(message))}", file=sys.stderr, flush=True)  # noqa: T201
    else:
        _ORIGINAL_SHOWWARNING(message, category, filename, lineno, file, line)


_ORIGINAL_SHOWWARNING = warnings.showwarning


def main(argv: list[str] | None = None) -> int:
    """Run ``rhlens`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a bad flag (already reported)
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            return int(args.func(args) or 0)
        except RhlensError as exc:
            error_line(str(exc))
            return 2
        except OSError as exc:  # a path that is missing, a directory, not writable, a full disk
            import errno

            fix = {errno.ENOSPC: "; free some space or choose another --out",
                   errno.EDQUOT: "; free some space or choose another --out"}.get(exc.errno, "")
            error_line((f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc)) + fix)
            return 2
        except KeyboardInterrupt:
            note = getattr(args, "interrupted", None)
            say("\n" + (note(args) if note else "interrupted"))
            return 130
        finally:
            if "rhlens.distributed" in sys.modules:  # a torchrun launch: leave its group cleanly
                sys.modules["rhlens.distributed"].shutdown()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
