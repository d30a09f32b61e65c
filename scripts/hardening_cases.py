"""Issue 28's remaining cases run through ``rhlens`` as a user would: a table of exit codes and lines.

    PYTHONPATH=TREE python scripts/hardening_cases.py --runs RUNS [--tree TREE] [--only PREFIX] > table.md

Each case runs ``python -m rhlens ...`` in a fresh process with ``PYTHONPATH=TREE`` (default:
this checkout), so the same script measures main and a branch. ``RUNS`` holds the finished
tiny runs that the resume cases copy and damage (``--setup`` makes them with this tree's
rhlens, loading the default model: about a minute on 2 CPU cores). A case that runs longer
than ``--timeout`` seconds is stopped and shown as such (a hang, or compute that started).

Columns: the case, the command, the exit code, the last ``rhlens: error:`` line (or the last
line of stderr), whether the weights started loading, and the seconds it took.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--lengths", "400", "--depths", "50", "--n-needles", "1"]
SETUPS = {  # name: the command that made RUNS/<name> (rerun as the resume case)
    "cot": ["cot", "--task", "arithmetic", "--k", "0", "--n-items", "2", "--max-new-tokens-cot", "8",
            "--max-new-tokens-direct", "4", "--quiet"],
    "compress": ["compress", "--scores", "{runs}/scores.json", *TINY, "--budgets", "0.8", "--seeds", "0",
                 "--no-streaming", "--max-new-tokens", "8", "--quiet"],
    "compress_mass": ["compress", "--scores", "{runs}/scores.json", *TINY, "--budgets", "0.8", "--seeds",
                      "0", "--no-streaming", "--needle-mass", "--max-new-tokens", "32", "--quiet"],
    "scores": ["scores", "--family", "copy,mass", *TINY, "--max-new-tokens", "8", "--quiet"],
    "patch": ["patch", *TINY, "--layers", "0", "--quiet"],
}


def _edit_line(path: Path, line: int, edit) -> None:
    lines = path.read_text().splitlines()
    rec = json.loads(lines[line - 1])
    edit(rec)
    lines[line - 1] = json.dumps(rec)
    path.write_text("\n".join(lines) + "\n")


def _nan_mass(path: Path) -> None:
    from safetensors.torch import load_file, save_file

    mass = load_file(path)["mass"]
    mass[3, 4] = float("nan")
    save_file({"mass": mass}, path)


# name: (the run copied, the damage done to it)
DAMAGED = {
    "cot: a record without 'correct'": ("cot", lambda d: _edit_line(
        d / "cot_arithmetic.jsonl", 2, lambda r: r.pop("correct"))),
    "compress: a record whose score is null": ("compress", lambda d: _edit_line(
        d / "compress.jsonl", 1, lambda r: r.update(score=None))),
    "compress --needle-mass: a NaN in the kept ranking": ("compress_mass", lambda d: _nan_mass(
        d / "needle_mass.safetensors")),
    "scores: a 'copy' row of 8 heads": ("scores", lambda d: _edit_line(
        d / "families.jsonl", 1, lambda r: r["copy"].__setitem__(0, r["copy"][0][:8]))),
    "patch: a patched value that is a string": ("patch", lambda d: _edit_line(
        d / "patching.jsonl", 1, lambda r: r["patched"][0].__setitem__(0, "0.5"))),
}

S = "{runs}/scores.json"
CASES = {  # name: argv (an --out in a fresh folder is added)
    # counts that expand work
    "mask-sweep --seeds 10^9": ["mask-sweep", "--scores", S, "--ks", "0,2", "--seeds", "1000000000", *TINY],
    "cot --seeds 10^9": ["cot", "--task", "arithmetic", "--scores", S, "--k", "2", "--seeds", "1000000000"],
    "cot --n-items 10^12": ["cot", "--task", "arithmetic", "--k", "0", "--n-items", "1000000000000"],
    "compress --seeds 10^9": ["compress", "--scores", S, *TINY, "--budgets", "0.8", "--seeds", "1000000000"],
    "scores --judge --seeds 10^9": ["scores", "--family", "copy", "--judge", "--seeds", "1000000000", *TINY],
    "patch --batch-size 10^12": ["patch", *TINY, "--batch-size", "1000000000000"],
    "scores --sequences 10^9": ["scores", "--family", "induction", "--sequences", "1000000000"],
    "scores --batch-size 10^12": ["scores", "--family", "copy", "--batch-size", "1000000000000", *TINY],
    "detect --batch-size 10^12": ["detect", "--batch-size", "1000000000000", *TINY],
    "mask-sweep --ks 10^9": ["mask-sweep", "--scores", S, "--ks", "0,1000000000", "--seeds", "1", *TINY],
    "niah --mask random:2:10^30": ["niah", "--scores", S, "--mask", "random:2:" + "9" * 30, *TINY],
    "compress --window 10^12": ["compress", "--scores", S, *TINY, "--budgets", "0.8", "--window",
                                "1000000000000"],
    "detect --n-needles 10^9": ["detect", "--n-needles", "1000000000", "--lengths", "400", "--depths", "50"],
    "detect --answer-buffer 10^12": ["detect", "--answer-buffer", "1000000000000", "--lengths", "400"],
    # the refusal names the flag
    "detect --max-new-tokens 10^9": ["detect", "--max-new-tokens", "1000000000", *TINY],
    "niah --max-new-tokens 10^9": ["niah", "--max-new-tokens", "1000000000", *TINY],
    "scores --max-new-tokens 10^9": ["scores", "--family", "copy", "--max-new-tokens", "1000000000", *TINY],
    "compress --max-new-tokens 10^9": ["compress", "--scores", S, *TINY, "--budgets", "0.8",
                                       "--max-new-tokens", "1000000000"],
    "cot --max-new-tokens-cot 10^9": ["cot", "--task", "arithmetic", "--k", "0",
                                      "--max-new-tokens-cot", "1000000000"],
}


def _limit_memory() -> None:
    """At most 8 GiB of address space: a huge allocation fails in the case, not the machine."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))


def run(argv: list[str], tree: Path, cwd: Path, timeout: float) -> tuple[str, str, bool, float]:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    t = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-m", "rhlens", *argv], cwd=cwd, env=env,
                              preexec_fn=_limit_memory, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return f"killed at {timeout:.0f} s", "", "loading" in out, time.perf_counter() - t
    lines = [ln for ln in done.stderr.splitlines() if ln.strip() and not ln.startswith("rhlens: warning:")]
    errors = [ln for ln in lines if ln.startswith("rhlens: error:")]
    line = errors[-1] if errors else (lines[-1] if lines else "")
    return str(done.returncode), line, "loading" in done.stdout, time.perf_counter() - t


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", required=True, type=Path, help="the tiny finished runs (see --setup)")
    ap.add_argument("--tree", type=Path, default=ROOT, help="the rhlens checkout to run (default: this)")
    ap.add_argument("--setup", action="store_true", help="make RUNS first (loads the model)")
    ap.add_argument("--only", default="", help="only the cases whose name starts with one of these "
                                               "(comma-separated)")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds before a case is stopped")
    args = ap.parse_args()
    runs = args.runs.resolve()
    if args.setup:
        runs.mkdir(parents=True, exist_ok=True)
        import random

        rng = random.Random(0)
        (runs / "scores.json").write_text(json.dumps({f"{la}-{h}": [rng.random()]
                                                      for la in range(30) for h in range(9)}))
        for name, argv in SETUPS.items():
            argv = [a.replace("{runs}", str(runs)) for a in argv] + ["--out", str(runs / name)]
            code, line, _, _ = run(argv, args.tree, runs, 600)
            print(f"setup {name}: exit {code} {line}", file=sys.stderr)
    print(f"tree: {args.tree.resolve()}\n")
    print("| case | command | exit | line | weights loaded | s |")
    print("|---|---|---:|---|---|---:|")
    todo = [(n, None, d) for n, d in DAMAGED.items()] + [(n, a, None) for n, a in CASES.items()]
    for name, argv, damaged in todo:
        if not name.startswith(tuple(args.only.split(","))):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            if damaged is not None:
                source, damage = damaged
                shutil.copytree(runs / source, tmp / "out")
                damage(tmp / "out")
                argv = SETUPS[source]
            argv = [a.replace("{runs}", str(runs)) for a in argv] + ["--out", str(tmp / "out")]
            code, line, loaded, seconds = run(argv, args.tree, tmp, args.timeout)
            shown = shlex.join(["rhlens", *argv]).replace(str(tmp), "TMP").replace(str(runs), "RUNS")
            print(f"| {cell(name)} | `{cell(shown)}` | {code} | "
                  f"{cell(line.replace(str(tmp), 'TMP').replace(str(runs), 'RUNS'))} | "
                  f"{'yes' if loaded else 'no'} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
