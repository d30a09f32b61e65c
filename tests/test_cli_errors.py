"""Every bad input of issue 14 ends with exit code 2 and one line, ``rhlens: error: ...``.

Each case runs the real command in-process; none of them gets as far as loading the
weights (the checks come first), so the table is fast. ``{tmp}`` in an argument is a
fresh temporary directory holding the files the ``setup`` of the case wrote.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from rhlens.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _paper_json(path: Path, layers: int, heads: int, value=0.5) -> None:
    path.write_text(json.dumps({f"{la}-{h}": [value] for la in range(layers) for h in range(heads)}))


def _files(tmp: Path) -> None:
    """The inputs the cases below refer to."""
    _paper_json(tmp / "gemma_grid.json", 18, 4)  # the shape of another model
    _paper_json(tmp / "model_grid.json", 30, 9)
    _paper_json(tmp / "strings.json", 30, 9, value="high")
    (tmp / "bad_utf8.jsonl").write_bytes(
        b'{"needle": "The code is 4471.", "question": "What is the code?", "real_needle": '
        b'"4471"}\n{"needle": "caf\xe9 \xff", "question": "q", "real_needle": "x"}\n')
    (tmp / "needles_dir").mkdir()
    (tmp / "a_file").write_text("not a directory\n")
    (tmp / "notes.gguf").write_text("these are my notes, not a model\n")
    run = tmp / "damaged_run"
    run.mkdir()
    (run / "run.json").write_text('{"identity": {"model": ')
    summary = tmp / "damaged_summary"
    summary.mkdir()
    (summary / "summary.json").write_text('{"probes": 2, ')
    # issue 28: hostile files
    _paper_json(tmp / "nan_grid.json", 30, 9, value=float("nan"))
    row = {"id": "x", "needle": "The code is 4471.", "question": "What is the code?", "real_needle": "4471"}
    (tmp / "dup_ids.jsonl").write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n")
    big = {**row, "needle": "The code is 4471. " + "word " * 9000}
    (tmp / "big_needle.jsonl").write_text(json.dumps(big) + "\n")
    (tmp / "notes.txt").write_text("my notes\n")
    (tmp / "locked_out").mkdir()
    (tmp / "locked_out" / ".rhlens.lock").symlink_to(tmp / "notes.txt")
    (tmp / "loop").symlink_to(tmp / "loop")
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp / "fifo.jsonl")
    det = tmp / "damaged_tensors"
    (det / "scores").mkdir(parents=True)
    (det / "scores" / "meta.json").write_text(json.dumps({"kind": "RetrievalScores",
                                                          "model_name": "m"}))
    (det / "scores" / "tensors.safetensors").write_bytes(b"\x00" * 40)


CUDA = torch.cuda.is_available()
def case(name: str, argv: list[str], message: str, marks=()):
    return pytest.param(argv, message, id=name, marks=marks)


CASES = [
    # zero, negative, empty and conflicting values (issue 14, item 8)
    case("depth-count 0", ["detect", "--depth-count", "0"], "--depth-count: must be >= 1"),
    case("n-needles 0", ["detect", "--n-needles", "0"], "--n-needles: must be >= 1"),
    case("n-needles -1", ["detect", "--n-needles", "-1"], "--n-needles: must be >= 1"),
    case("n-needles too many", ["detect", "--n-needles", "9"], "only 4 needles are available"),
    case("lengths ,", ["detect", "--lengths", ","], "--lengths: expected comma-separated integers"),
    case("lengths 500,,900", ["detect", "--lengths", "500,,900"], "--lengths: empty item"),
    case("lengths 0", ["detect", "--lengths", "0"], "--lengths: every value must be >= 1"),
    case("lengths given twice", ["detect", "--lengths", "500,500"], "lengths given twice: 500"),
    case("lengths and length-range", ["detect", "--lengths", "500", "--length-range", "500", "900", "2"],
     "--length-range: not allowed with argument --lengths"),
    case("length-range 2.7", ["detect", "--length-range", "500", "1000", "2.7"],
     "--length-range: expected a whole number, got '2.7'"),
    case("length-range min above max", ["detect", "--length-range", "900", "500", "2"],
     "MIN 900 is above MAX 500"),
    case("depths and depth-count", ["detect", "--depths", "50", "--depth-count", "3"],
     "--depth-count: not allowed with argument --depths"),
    case("depth 150", ["detect", "--depths", "0,150"], "--depths: every value must lie in [0, 100]"),
    case("max-new-tokens 0", ["detect", "--max-new-tokens", "0"], "--max-new-tokens: must be >= 1"),
    case("length too short", ["detect", "--lengths", "300"], "length 300 is too short"),
    case("length beyond the context", ["detect", "--lengths", "9000"], "maximum context of 8192"),
    case("cot n-items 0", ["cot", "--task", "arithmetic", "--n-items", "0"], "--n-items: must be >= 1"),
    case("cot k -3", ["cot", "--task", "arithmetic", "--k", "-3"], "--k: must be >= 0"),
    case("cot k without scores", ["cot", "--task", "arithmetic", "--k", "2"], "--k > 0 needs --scores"),
    case("mask-sweep seeds 0", ["mask-sweep", "--scores", "{tmp}/gemma_grid.json", "--seeds", "0"],
     "--seeds: must be >= 1"),
    case("mask top:100000", ["niah", "--scores", "{tmp}/model_grid.json", "--mask", "top:100000"],
     "K must be between 1 and the model's 270 heads"),
    case("mask heads:1", ["niah", "--mask", "heads:1"], "heads are written layer.head"),
    case("mask heads outside the grid", ["niah", "--mask", "heads:30.0"], "outside the model's 30 layers"),
    case("mask unknown kind", ["niah", "--mask", "best:3"], "a mask is none, top:K"),
    case("mask top without scores", ["niah", "--mask", "top:3"], "top-K needs retrieval scores"),
    case("mask random K too large", ["niah", "--mask", "random:271"],
         "K must be between 1 and the model's 270"),
    case("mask top:x", ["niah", "--mask", "top:x"], "expected top:K with whole numbers"),
    case("mask given twice", ["niah", "--mask", "none", "--mask", "none"], "--mask given twice: none"),
    # score files against the model's grid (item 2)
    case("niah scores of another model", ["niah", "--scores", "{tmp}/gemma_grid.json", "--mask", "top:3"],
     "covers 18 layers x 4 heads, the model 30 x 9"),
    case("cot scores of another model", ["cot", "--task", "arithmetic", "--scores", "{tmp}/gemma_grid.json"],
     "covers 18 layers x 4 heads, the model 30 x 9"),
    case("patch scores of another model", ["patch", "--scores", "{tmp}/gemma_grid.json"],
     "covers 18 layers x 4 heads"),
    case("patch layers outside the model", ["patch", "--layers", "0,30"], "the model has layers 0..29"),
    case("scores with string values", ["niah", "--scores", "{tmp}/strings.json"],
         "{tmp}/strings.json"),  # (how it says what is wrong is the scores module's business)
    case("scores missing", ["mask-sweep", "--scores", "{tmp}/nope.json"], "does not exist"),
    case("scores: damaged tensors", ["niah", "--scores", "{tmp}/damaged_tensors"],
         "{tmp}/damaged_tensors"),
    # compress: budgets, seeds, the window and the scores, all before the model loads
    case("compress budget 0", ["compress", "--scores", "{tmp}/model_grid.json", "--budgets", "0,0.5"],
         "--budgets: every budget is a share of the KV bytes in (0, 1]"),
    case("compress budget 1.5", ["compress", "--scores", "{tmp}/model_grid.json", "--budgets", "1.5"],
         "--budgets: every value must lie in [0, 1]"),
    case("compress budget x", ["compress", "--scores", "{tmp}/model_grid.json", "--budgets", "0.1,x"],
         "--budgets: expected comma-separated numbers, got 'x'"),
    case("compress budgets given twice", ["compress", "--scores", "{tmp}/model_grid.json",
                                          "--budgets", "0.3,0.3"], "--budgets: given twice: 0.3"),
    case("compress budget below the floor", ["compress", "--scores", "{tmp}/model_grid.json",
                                             "--budgets", "0.05,0.5", "--lengths", "1000",
                                             "--depths", "50", "--n-needles", "1"],
         "a budget of 0.05 of the KV bytes is below the floor"),
    case("compress seeds -1", ["compress", "--scores", "{tmp}/model_grid.json", "--seeds", "-1"],
         "--seeds: must be >= 0, got -1"),
    case("compress window 0", ["compress", "--scores", "{tmp}/model_grid.json", "--window", "0"],
         "--window: must be >= 1"),
    case("compress scores of another model", ["compress", "--scores", "{tmp}/gemma_grid.json"],
         "covers 18 layers x 4 heads, the model 30 x 9"),
    case("compress without scores", ["compress"], "the following arguments are required: --scores"),
    # devices
    case("device tpu", ["detect", "--device", "tpu"], "unknown device 'tpu'"),
    case("device cuda:99", ["detect", "--device", "cuda:99"],
     "does not exist" if CUDA else "CUDA is not available here"),
    case("device cuda", ["detect", "--device", "cuda"], "CUDA is not available here",
                 marks=pytest.mark.skipif(CUDA, reason="this machine has CUDA")),
    case("dtype float8", ["detect", "--dtype", "float8"], "--dtype: invalid choice: 'float8'"),
    # paths
    case("out is a file", ["detect", "--out", "{tmp}/a_file"], "{tmp}/a_file is a file"),
    case("out not writable", ["detect", "--out", "/sys/rhlens-cannot-write-here"],
                 "cannot write in the output directory",
                 marks=pytest.mark.skipif(not Path("/sys").is_dir(), reason="needs Linux /sys")),
    case("damaged run.json", ["detect", "--out", "{tmp}/damaged_run"], "run.json is damaged"),
    case("needles not UTF-8", ["detect", "--needles", "{tmp}/bad_utf8.jsonl"], "line 2: not UTF-8 text"),
    case("needles a directory", ["detect", "--needles", "{tmp}/needles_dir"], "is a directory"),
    case("needles missing", ["detect", "--needles", "{tmp}/nope.jsonl"], "does not exist"),
    case("haystack missing", ["detect", "--haystack", "{tmp}/no_such_dir"], "does not exist"),
    case("report out has a strange suffix", ["report", "{tmp}", "--out", "{tmp}/r.txt"],
     "give an .html file or a directory"),
    case("report nothing", ["report", "--out", "{tmp}/r.html"], "give at least one RUN_DIR"),
    case("report damaged tensors", ["report", "{tmp}/damaged_tensors", "--out", "{tmp}/r.html"], "damaged"),
    case("report damaged summary.json", ["report", "{tmp}/damaged_summary", "--out", "{tmp}/r.html"],
         "damaged"),
    case("official without --fetch", ["official"], "the following arguments are required: --fetch"),
    case("official into a file", ["official", "--fetch", "{tmp}/a_file"], "is a file"),
    # models
    case("model: a text file named .gguf", ["detect", "--model", "{tmp}/notes.gguf"],
     "is not a GGUF model file"),
    case("model: missing folder", ["detect", "--model", "./no/such/model_dir"], "does not exist"),
    case("model: unknown hub id, offline", ["detect", "--model", "no-such-org/no-such-model", "--offline"],
     "only uses models already in the local Hugging Face cache"),
    # issue 28: hostile paths, huge numbers, damaged inputs (refused before the model loads)
    case("lock is a symlink", ["detect", "--out", "{tmp}/locked_out"], "is not rhlens' lock file"),
    case("out is a symlink loop", ["detect", "--out", "{tmp}/loop"], "symbolic link that cannot be followed"),
    case("out is empty", ["detect", "--out", ""], "the output directory is empty"),
    case("needles a FIFO", ["detect", "--needles", "{tmp}/fifo.jsonl"], "is a named pipe (FIFO)",
         marks=pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")),
    case("haystack a file", ["detect", "--haystack", "{tmp}/a_file"], "is a file, not a directory"),
    case("length-range count too large", ["detect", "--length-range", "400", "8000", "100000"],
         "only 7601 whole-number lengths lie from 400 to 8000"),
    case("depth-count huge", ["detect", "--depth-count", "1000000000"], "use COUNT <= 2000"),
    case("max-new-tokens beyond the context", ["detect", "--max-new-tokens", "1000000000"],
         "does not fit the model's maximum context of 8192 tokens"),
    case("needle longer than the context", ["detect", "--needles", "{tmp}/big_needle.jsonl"],
         "needle 'x' cannot fit the model's maximum context of 8192"),
    case("needles duplicate ids", ["detect", "--needles", "{tmp}/dup_ids.jsonl"],
         "needle id 'x' is already the id of line 1"),
    case("scores of NaN", ["niah", "--scores", "{tmp}/nan_grid.json", "--mask", "top:3"],
         "hold NaN or infinity"),
    case("mask heads:3.1.2", ["niah", "--mask", "heads:3.1.2"], "heads are written layer.head"),
    case("no subcommand", [], "the following arguments are required: COMMAND"),
    case("unknown flag", ["detect", "--lenghts", "500"], "unrecognized arguments: --lenghts"),
]
NEEDS_OUT = {"detect", "niah", "mask-sweep", "cot", "patch", "compress"}


@pytest.mark.parametrize(("argv", "message"), CASES)
def test_bad_input_is_one_line_and_exit_2(argv, message, tmp_path, monkeypatch, capsys):
    _files(tmp_path)
    monkeypatch.chdir(tmp_path)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if argv and argv[0] in NEEDS_OUT and "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    lines = [ln for ln in err.splitlines() if not ln.startswith("rhlens: warning:")]
    assert len(lines) == 1 and lines[0].startswith("rhlens: error: "), err
    assert message.replace("{tmp}", str(tmp_path)) in lines[0]
    assert "Traceback" not in out + err
    assert "loading" not in out  # refused before the weights load


def test_a_second_process_on_the_same_out_is_refused(tmp_path):
    """Two processes, one folder: the second one stops at once, naming the first's pid."""
    out = tmp_path / "shared"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys
            from rhlens.io import lock_output
            lock_output({str(out)!r})
            print("locked", flush=True)
            sys.stdin.read()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "locked"
        second = subprocess.run([sys.executable, "-m", "rhlens", "detect", "--out", str(out)],
                                capture_output=True, text=True, env=env, timeout=300)
        assert second.returncode == 2
        assert f"is in use by another rhlens process (pid {holder.pid})" in second.stderr
        assert second.stderr.count("\n") == 1 and "loading" not in second.stdout
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    # Once the first process is gone, the folder is free again.
    again = subprocess.run([sys.executable, "-c", f"from rhlens.io import lock_output; "
                                                  f"lock_output({str(out)!r})"],
                           capture_output=True, text=True, env=env, timeout=120)
    assert again.returncode == 0, again.stderr


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root can write into a read-only folder")
def test_finished_run_in_a_read_only_folder(tmp_path, capsys):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        assert main(["detect", "--out", str(out)]) == 2
        assert "cannot write in the output directory" in capsys.readouterr().err
    finally:
        out.chmod(0o755)


@pytest.mark.parametrize(("command", "note"), [
    (["detect"], "every finished probe is saved in {out}: rerun the same command to resume"),
    (["niah"], "every finished answer is saved in {out}: rerun the same command to resume"),
    (["patch"], "every finished pair is saved in {out}: rerun the same command to resume"),
    (["compress", "--scores", "{tmp}/model_grid.json", "--budgets", "1"],
     "every finished answer is saved in {out}: rerun the same command to resume"),
])
def test_ctrl_c_says_what_happens_next(command, note, tmp_path, monkeypatch, capsys):
    import rhlens.cli.prepare

    def interrupt(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(rhlens.cli.prepare, "load", interrupt)
    _files(tmp_path)
    command = [a.replace("{tmp}", str(tmp_path)) for a in command]
    out = tmp_path / "o"
    assert main([*command, "--lengths", "450", "--depths", "50", "--n-needles", "1",
                 "--out", str(out)]) == 130
    assert note.replace("{out}", str(out)) in capsys.readouterr().out


def test_coinciding_depths_are_a_one_line_warning(tmp_path, monkeypatch, capsys):
    """The paper's placement puts depths 0 and 25 of a 400-token probe at one position: the
    command says so (once, one line) before the model loads, and goes on."""
    import rhlens.cli.prepare

    def stop(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(rhlens.cli.prepare, "load", stop)
    assert main(["detect", "--lengths", "400", "--depths", "0,25,100", "--n-needles", "1",
                 "--out", str(tmp_path / "o")]) == 130
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("rhlens: warning:")]
    assert len(warnings) == 1
    assert "at length 400, depths 0 and 25 all land at depth 0%" in warnings[0]
    assert "--placement token" in warnings[0]
