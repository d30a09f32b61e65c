"""The rhlens command: every subcommand runs end to end on tiny grids, writes its files,
resumes, and refuses to resume a different run, naming the difference."""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from rhlens.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
GRID = ["--lengths", "450", "--depths", "50", "--max-new-tokens", "24", "--quiet"]


@pytest.fixture(scope="module")
def reuse_model(default_model):
    """The CLI loads the default model through rhlens.models.load_model; hand it the one the
    session already loaded (same weights, same identity) instead of loading it again."""
    import rhlens.models

    real = rhlens.models.load_model

    def load(name=None, *, device=None, dtype=None, offline=None, **more):  # more: device maps
        if name is None and dtype is None and str(device) == "cpu":
            return default_model
        return real(name, device=device, dtype=dtype, offline=offline, **more)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rhlens.models, "load_model", load)
        yield


@pytest.fixture(scope="module")
def detect_run(tmp_path_factory, reuse_model):
    out = tmp_path_factory.mktemp("cli") / "detect"
    assert main(["detect", *GRID, "--n-needles", "2", "--device", "cpu", "--out", str(out)]) == 0
    return out


def test_detect_writes_every_file(detect_run):
    for name in ("probes.jsonl", "run.json", "summary.json", "scores", "niah.png", "head_scores.json",
                 "heatmap.png"):
        assert (detect_run / name).exists(), name
    lines = (detect_run / "probes.jsonl").read_text().splitlines()
    assert len(lines) == 2
    rec = json.loads(lines[0])
    for field in ("length", "depth", "placed_depth", "insert_token", "needle_id", "prompt_ids",
                  "needle_span", "response_ids", "response", "rouge_recall", "success", "scores"):
        assert field in rec
    assert len(rec["scores"]) == 30 and len(rec["scores"][0]) == 9
    summary = json.loads((detect_run / "summary.json").read_text())
    assert summary["probes"] == 2 and summary["layers"] == 30
    # Both probes are answered (greedy decoding on the CPU: deterministic), so the paper's
    # file is always there to check.
    assert summary["successful_probes"] == 2
    paper = json.loads((detect_run / "head_scores.json").read_text())
    assert len(paper) == 270 and all(len(v) == 2 for v in paper.values())
    top = max(paper, key=lambda k: sum(paper[k]))
    assert sum(paper[top]) / 2 == pytest.approx(summary["top_heads"][0]["score"], abs=1e-4)


def test_run_json_holds_what_shapes_the_results(detect_run):
    from rhlens.models.load import PACKAGED_MODELS, _packaged_gguf

    run = json.loads((detect_run / "run.json").read_text())
    ident = run["identity"]
    gguf = _packaged_gguf(PACKAGED_MODELS["smollm2-135m"])
    assert ident["model"]["weights_sha256"] == hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert ident["model"]["dtype"] == "float32"
    probes = ident["probes"]
    assert probes["haystack"] == "stdlib-docs" and len(probes["haystack_sha256"]) == 64
    assert probes["chat_template"] is True and probes["placement"] == "sentence"
    assert sorted(probes["needles"]) == ["lighthouse-soup", "observatory-password"]
    assert sorted(probes["prompts"]) == ["len450-depth50-lighthouse-soup",
                                         "len450-depth50-observatory-password"]
    assert ident["config"]["max_new_tokens"] == 24 and "batch_size" not in ident["config"]
    assert run["recorded"]["grid"] == {"lengths": [450], "depths": [50.0], "n_probes": 2,
                                       "needles": ["lighthouse-soup", "observatory-password"]}


def test_rerun_resumes_without_recomputing(detect_run, capsys):
    before = (detect_run / "probes.jsonl").read_text()
    argv = ["detect", *GRID, "--n-needles", "2", "--device", "cpu", "--out", str(detect_run)]
    assert main(argv) == 0
    assert (detect_run / "probes.jsonl").read_text() == before
    # The batch size changes the cost, not the results: recorded, not refused.
    assert main([*argv, "--batch-size", "1"]) == 0
    assert (detect_run / "probes.jsonl").read_text() == before
    run = json.loads((detect_run / "run.json").read_text())
    assert run["recorded"]["config"]["batch_size"] == 8
    assert run["resumes"][-1]["config"]["batch_size"] == 1


@pytest.mark.parametrize(("change", "named"), [
    (["--haystack", "synthetic"], "probes.haystack: 'stdlib-docs' -> 'synthetic'"),
    (["--no-chat-template"], "probes.chat_template: True -> False"),
    (["--max-new-tokens", "30"], "config.max_new_tokens: 24 -> 30"),
    (["--placement", "token"], "probes.placement: 'sentence' -> 'token'"),
])
def test_resume_with_another_setting_is_refused(detect_run, change, named, capsys):
    before = (detect_run / "probes.jsonl").read_text()
    argv = ["detect", *GRID, "--n-needles", "2", "--out", str(detect_run), *change]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert f"{detect_run} holds a run with other settings ({named}" in err
    assert "loading" not in out  # refused before the weights load
    assert (detect_run / "probes.jsonl").read_text() == before


def test_resume_with_an_edited_needles_file_is_refused(tmp_path, reuse_model, capsys):
    needles = tmp_path / "needles.jsonl"
    row = {"needle": "The vault code at the Orlen museum is 4471.", "id": "vault",
           "question": "What is the vault code at the Orlen museum?", "real_needle": "4471"}
    needles.write_text(json.dumps(row) + "\n")
    argv = ["detect", *GRID, "--needles", str(needles), "--max-new-tokens", "8", "--device", "cpu",
            "--out", str(tmp_path / "run")]
    assert main(argv) == 0
    needles.write_text(json.dumps({**row, "needle": row["needle"].replace("4471", "4471 exactly")})
                       + "\n")
    capsys.readouterr()
    assert main(argv) == 2
    assert "probes.needles.vault:" in capsys.readouterr().err


def test_niah_with_masks_from_a_run(detect_run, tmp_path):
    out = tmp_path / "niah"
    assert main(["niah", *GRID, "--n-needles", "1", "--scores", str(detect_run),
                 "--mask", "heads:0.1,2.3", "--mask", "random:3:1", "--max-new-tokens", "12",
                 "--device", "cpu", "--out", str(out)]) == 0
    from rhlens.runs import read_run

    niah = read_run(out).niah
    assert set(niah.masks) == {"heads:0.1,2.3", "random-3-s1"}
    random_heads = {tuple(h) for h in niah.masks["random-3-s1"]["heads"]}
    scores = json.loads((detect_run / "head_scores.json").read_text())
    assert all(sum(scores[f"{la}-{h}"]) / 2 <= 0.1 for la, h in random_heads)  # no retrieval head
    assert (out / "niah_heatmaps.png").exists()


def test_mask_sweep(detect_run, tmp_path):
    out = tmp_path / "sweep"
    assert main(["mask-sweep", *GRID, "--n-needles", "1", "--scores", str(detect_run),
                 "--ks", "2", "--seeds", "1", "--max-new-tokens", "12", "--device", "cpu",
                 "--out", str(out)]) == 0
    from rhlens.runs import read_run

    sweep = read_run(out).sweep
    assert list(sweep.ks) == [0, 2] and list(sweep.seeds) == [0]
    masks = sweep.niah.masks
    assert set(masks) == {"none", "top-2", "random-2-s0"}
    paper = json.loads((detect_run / "head_scores.json").read_text())
    best = sorted(paper, key=lambda k: (-sum(paper[k]), *map(int, k.split("-"))))[:2]
    assert sorted(f"{la}-{h}" for la, h in masks["top-2"]["heads"]) == sorted(best)
    assert (out / "k_curve.png").exists()


def test_cot(detect_run, tmp_path):
    out = tmp_path / "cot"
    assert main(["cot", "--task", "arithmetic", "--n-items", "1", "--k", "2", "--seeds", "1",
                 "--scores", str(detect_run), "--max-new-tokens-cot", "12",
                 "--max-new-tokens-direct", "8", "--device", "cpu", "--quiet", "--out", str(out)]) == 0
    from rhlens.cot.experiment import CoTResult

    result = CoTResult.load(out / "cot" / "arithmetic")
    assert set(result.masks) == {"none", "top-2", "random-2-s0"}
    assert len(result.records) == 1 * 3 * 2  # items x masks x (cot, direct)
    assert (out / "cot_bars.png").exists()


def test_ask(reuse_model, capsys):
    assert main(["ask", "--length", "450", "--max-new-tokens", "24", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "expected: smoked blue cardamom from the island of Vell" in out
    assert "ROUGE-1 recall: 1.00" in out


def test_patch(detect_run, tmp_path):
    out = tmp_path / "patch"
    assert main(["patch", "--lengths", "450", "--n-needles", "1", "--layers", "18", "--top", "3",
                 "--scores", str(detect_run), "--device", "cpu", "--quiet", "--out", str(out)]) == 0
    for name in ("patching", "patching_heatmap.png", "patching_vs_retrieval", "patching.jsonl"):
        assert (out / name).exists(), name
    from rhlens.runs import read_run

    contents = read_run(out)
    assert contents.patching is not None and contents.patching.n_layers == 30
    before = (out / "patching.jsonl").read_text()
    # A rerun resumes: every pair is found in the log, nothing is appended.
    assert main(["patch", "--lengths", "450", "--n-needles", "1", "--layers", "18", "--top", "3",
                 "--scores", str(detect_run), "--device", "cpu", "--quiet", "--out", str(out)]) == 0
    assert (out / "patching.jsonl").read_text() == before


def test_report_into_a_new_directory(detect_run, tmp_path, capsys):
    target = tmp_path / "newdir"
    assert main(["report", str(detect_run), "--out", f"{target}/"]) == 0
    assert (target / "report.html").exists() and (target / "report.md").exists()
    assert not (tmp_path / "newdir.html").exists()


# ---- the parser -----------------------------------------------------------------------------
def _subparsers(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield from action.choices.items()


def test_every_flag_has_help():
    missing = [f"{name} {'/'.join(a.option_strings) or a.dest}"
               for name, sub in _subparsers(build_parser()) for a in sub._actions
               if not (a.help or "").strip() or a.help == argparse.SUPPRESS]
    assert missing == []


def test_lengths_help_says_the_answer_buffer_is_included(capsys):
    assert main(["detect", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "Each length includes the --answer-buffer (200 tokens by default)" in text
    assert "(315 for the default model and needles)" in text


def test_version(capsys):
    from rhlens import __version__

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"rhlens {__version__}"


def test_help_does_not_import_torch():
    code = ("import sys; from rhlens.cli import main; rc = main(['detect', '--help']); "
            "assert rc == 0; assert 'torch' not in sys.modules, 'torch imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": ""}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--max-new-tokens" in done.stdout


def test_python_dash_m_rhlens():
    done = subprocess.run([sys.executable, "-m", "rhlens", "--version"], capture_output=True,
                          text=True, env={"PYTHONPATH": str(ROOT), "PATH": ""}, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("rhlens ")


def test_the_old_patch_cli_names_still_work():
    from rhlens.patching_cli import add_patch_parser, cmd_patch

    assert callable(add_patch_parser) and callable(cmd_patch)
