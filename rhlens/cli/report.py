"""``rhlens report``: one self-contained HTML report (and a Markdown twin) of run directories."""

from __future__ import annotations

import argparse
from pathlib import Path

from rhlens.cli.args import positive_int, say
from rhlens.errors import ConfigError, RhlensError

__all__ = ["add_parsers", "cmd_report", "report_paths"]


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "report", help="one self-contained HTML report (and a Markdown twin) of run directories",
        description="Gather detection, NIAH, mask-sweep, patching and CoT results of run "
                    "directories, plus paper-format score files, into report.html + report.md.")
    p.add_argument("runs", nargs="*", metavar="RUN_DIR", help="run directories (--out of a command)")
    p.add_argument("--official", nargs="+", action="extend", default=[], metavar="FILE",
                   help="paper-format JSON score files, or folders of them (repeatable); a run "
                        "directory written after them (--official FILE RUN_DIR) is a run "
                        "(default none)")
    p.add_argument("--out", default="report.html", metavar="FILE.html|DIR",
                   help="the HTML file, or a directory (an existing one, or a name ending in / "
                        "or without a suffix) to write DIR/report.html into; the Markdown twin "
                        "gets the same name with .md (default report.html)")
    p.add_argument("--title", default=None, help="the report's title (default: the run names)")
    p.add_argument("--top", type=positive_int, default=20, metavar="N",
                   help="rows of the top-heads tables (default 20)")
    p.set_defaults(func=cmd_report, interrupted=lambda args: "interrupted; no report written")


def report_paths(out: str) -> tuple[Path, Path]:
    """(HTML, Markdown) paths for ``--out``: a ``.html`` file, or a directory to put
    ``report.html`` in (an existing one, a name ending in a slash, or one without a suffix)."""
    path = Path(out)
    if path.is_dir() or out.endswith(("/", "\\")) or not path.suffix:
        html = path / "report.html"
    elif path.suffix.lower() in (".html", ".htm"):
        html = path
    else:
        raise ConfigError(f"--out {out}: give an .html file or a directory")
    return html, html.with_suffix(".md")


def _is_run(path: Path) -> bool:
    """Whether ``path`` is a folder an rhlens command wrote (not one of paper-format files)."""
    marks = ("run.json", "summary.json", "probes.jsonl", "result.json", "scores")
    return path.is_dir() and any((path / m).exists() for m in marks)


def cmd_report(args: argparse.Namespace) -> int:
    """Write ``--out`` (HTML) and its ``.md`` twin, then say where they are."""
    import json

    from rhlens.io import prepare_output
    from rhlens.report import build_report

    # `--official FILE RUN_DIR`: the list after --official swallows the run directory; a
    # folder holding an rhlens run is a run, not a folder of paper-format files.
    runs = [p for p in args.official if _is_run(Path(p))]
    args.official = [p for p in args.official if p not in runs]
    args.runs = [*args.runs, *runs]
    if not args.runs and not args.official:
        raise ConfigError("give at least one RUN_DIR or --official FILE")
    html_path, md_path = report_paths(args.out)
    prepare_output(html_path.parent)
    names = ", ".join(Path(p).name or str(p) for p in args.runs) or "official scores"
    try:
        report = build_report(args.runs, official=args.official, top=args.top,
                              title=args.title or f"rhlens report: {names}")
    except (RhlensError, FileNotFoundError):
        raise
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise ConfigError(f"a file in {', '.join(args.runs + args.official)} is damaged "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                          "rerun the command that wrote it") from None
    except Exception as exc:
        if type(exc).__name__ == "SafetensorError":
            raise ConfigError(f"a tensor file in {', '.join(args.runs)} is damaged ({exc}); "
                              "rerun the command that wrote it") from None
        raise
    report.to_html(html_path)
    report.to_markdown(md_path)
    n_sections = sum(1 for _ in report.walk())
    say(f"wrote {html_path} ({n_sections} sections, {len(report.images())} figures) "
        f"and {md_path} (figures in {md_path.parent / (md_path.stem + '_files')})")
    return 0
