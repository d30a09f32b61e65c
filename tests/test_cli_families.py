"""The command line on model families other than Llama: a tiny random-weight Gemma-2 folder
(softcapped attention, which HF's SDPA refuses) through detect, niah under a mask and report;
a family with no attention heads refused in one line."""

from __future__ import annotations

import json

import pytest
from tiny_families import make_tiny_model

from rhlens.cli import main


@pytest.fixture(scope="module")
def gemma2_folder(tmp_path_factory):
    from rhlens.models import load_tokenizer

    return make_tiny_model("gemma2", tmp_path_factory.mktemp("gemma2"), load_tokenizer())


def test_gemma2_detect_niah_and_report(gemma2_folder, tmp_path, capsys):
    out = tmp_path / "detect"
    grid = ["--model", str(gemma2_folder), "--lengths", "400", "--depths", "50", "--n-needles", "1",
            "--max-new-tokens", "6", "--device", "cpu"]
    assert main(["detect", *grid, "--out", str(out)]) == 0
    assert (out / "summary.json").exists() and (out / "probes.jsonl").exists()
    probe = json.loads((out / "probes.jsonl").read_text().splitlines()[0])
    assert len(probe["response_ids"]) >= 1
    run = json.loads((out / "run.json").read_text())
    assert "kernel_policy" in json.dumps(run)
    masked = tmp_path / "niah"
    assert main(["niah", *grid, "--scores", str(out), "--mask", "heads:1.2", "--out", str(masked)]) == 0
    assert main(["report", str(out), str(masked), "--out", str(tmp_path / "report.html")]) == 0
    assert (tmp_path / "report.html").stat().st_size > 1000
    assert "Traceback" not in capsys.readouterr().err


def test_a_family_without_attention_is_refused_in_one_line(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, MambaConfig

    from rhlens.models import load_tokenizer

    tok = load_tokenizer()
    AutoModelForCausalLM.from_config(MambaConfig(hidden_size=32, num_hidden_layers=1, vocab_size=len(tok),
                                                 state_size=4)).save_pretrained(tmp_path / "mamba")
    tok.save_pretrained(tmp_path / "mamba")
    code = main(["detect", "--model", str(tmp_path / "mamba"), "--lengths", "400",
                 "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("rhlens: error: the model family 'mamba' has no attention heads")
    assert "Gemma-2" in err[-1] and "Traceback" not in "\n".join(err)
