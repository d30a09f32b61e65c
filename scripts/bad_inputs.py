"""Issue 14's table: every bad input of tests/test_cli_errors.py run through ``rhlens``, with
its exit code and the line it prints now, plus resumes of a finished run with a changed setting.

    PYTHONPATH=. python scripts/bad_inputs.py [--run runs/demo] > bad_inputs.md

``--run``: a finished detection run (``make demo`` writes ``runs/demo``); the resume cases
rerun its command with one setting changed (the haystack, the chat template, a needles file
whose needle of the same id was edited, the answer length) and must be refused before the
model loads. (A needle without an ``id`` is named by its content: edited, it is a new needle,
whose probes are computed, not taken from the old answers.)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shlex
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def run(argv: list[str]) -> tuple[int, str, bool]:
    """Exit code, the error line, and whether the weights started loading."""
    from rhlens.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    lines = [ln for ln in err.getvalue().splitlines() if not ln.startswith("rhlens: warning:")]
    return code, (lines[-1] if lines else ""), "loading" in out.getvalue()


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=None, help="a finished detection run folder (make demo's)")
    args = ap.parse_args()
    from test_cli_errors import CASES, NEEDS_OUT, _files

    print("| case | command | exit | message now | loaded weights |")
    print("|---|---|---:|---|---|")
    for param in CASES:
        argv, _ = param.values
        with tempfile.TemporaryDirectory() as tmp:
            _files(Path(tmp))
            argv = [a.replace("{tmp}", tmp) for a in argv]
            if argv and argv[0] in NEEDS_OUT and "--out" not in argv:
                argv += ["--out", f"{tmp}/out"]
            code, line, loaded = run(argv)
            shown = shlex.join(["rhlens", *argv]).replace(tmp, "TMP")
            print(f"| {param.id} | `{cell(shown)}` | {code} | {cell(line.replace(tmp, 'TMP'))} | "
                  f"{'yes' if loaded else 'no'} |")
    if args.run:
        run_dir = Path(args.run)
        header = json.loads((run_dir / "run.json").read_text())
        base = ["detect", "--lengths", "500,1000", "--depths", "0,50,100", "--n-needles", "2",
                "--max-new-tokens", "32", "--out", str(run_dir)]
        with tempfile.TemporaryDirectory() as tmp:
            from rhlens.probes import BUILTIN_NEEDLES

            edited = Path(tmp) / "needles.jsonl"
            rows = [{"id": n.id, "needle": n.needle, "question": n.question,
                     "real_needle": n.real_needle} for n in BUILTIN_NEEDLES[:2]]
            rows[1]["needle"] = rows[1]["needle"].replace(".", "!", 1)
            edited.write_text("".join(json.dumps(r) + "\n" for r in rows))
            changes = [("another haystack", ["--haystack", "synthetic"]),
                       ("no chat template", ["--no-chat-template"]),
                       ("an edited needles file", ["--needles", str(edited)]),
                       ("another answer length", ["--max-new-tokens", "24"])]
            for name, extra in changes:
                argv = list(base)
                if "--max-new-tokens" in extra:
                    argv[argv.index("--max-new-tokens") + 1] = extra[1]
                else:
                    argv += extra
                code, line, loaded = run(argv)
                shown = shlex.join(["rhlens", *argv]).replace(tmp, "TMP")
                print(f"| resume with {name} | `{cell(shown)}` | {code} | {cell(line)} | "
                      f"{'yes' if loaded else 'no'} |")
        print(f"\n(resumed run: {run_dir}, made by rhlens {header.get('rhlens_version')})")


if __name__ == "__main__":
    main()
