"""Issue 28, what remained: every record read back is checked before the weights load, token
ids are checked before any forward, counts that expand work are bounded, and a refusal names
the flag on the command line and the field in the library.

Each CLI test resumes a run whose log holds one malformed record: it must end with exit 2 and
one line naming the file, the line and the field, and the model loader must never be called.
"""

from __future__ import annotations

import json

import pytest

from rhlens.cli import main
from rhlens.errors import RhlensError

GRID = (30, 9)  # the default model's layers x heads (its config is read, never its weights)
TINY = ["--lengths", "400", "--depths", "50", "--n-needles", "1"]


def _refused(argv: list[str], capsys) -> str:
    code = main(argv)
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if not ln.startswith("rhlens: warning:")]
    assert code == 2, (out, err)
    assert len(lines) == 1 and lines[0].startswith("rhlens: error: "), err
    assert "loading" not in out
    return lines[0]


@pytest.fixture
def no_weights(monkeypatch):
    """The loader fails if called; the run's header is taken as matching (the records are
    what is tested)."""
    import rhlens.cli.prepare as prepare
    import rhlens.store.logs as logs

    def load(args):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(prepare, "load", load)
    monkeypatch.setattr(logs, "check_resume", lambda *a, **k: None)


def _log(path, good: dict, bad: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n" + json.dumps(good) + "\n")


def _scores_file(tmp_path):
    path = tmp_path / "scores.json"
    path.write_text(json.dumps({f"{la}-{h}": [(la * 9 + h) / 270] for la in range(30) for h in range(9)}))
    return str(path)


COT = {"key": "none|cot|arithmetic-0-0", "task": "arithmetic", "mask": "none", "group": "none",
       "mode": "cot", "id": "arithmetic-0-0", "gold": "5", "output": "3 + 2 = 5", "extracted": "5",
       "correct": True, "stop": "eos"}
NIAH = {"key": "full|p", "mask": "full", "probe": "p", "response": "x", "rouge_recall": 1.0,
        "score": 100.0, "answer_class": "correct"}
FAMILY = {"key": "p", "success": True, "rouge_recall": 1.0, "response": "x",
          "copy": [[0.0] * 9 for _ in range(30)], "mass": [[0.5] * 9 for _ in range(30)]}
PATCH = {"key": "0-abc", "index": 0, "clean": 6.5, "corrupted": -5.3, "seconds": 1.0, "pair": {},
         "patched": [[0.1] * 9] + [[None] * 9 for _ in range(29)]}


def test_a_malformed_cot_record_is_named_before_the_weights_load(tmp_path, no_weights, capsys):
    out = tmp_path / "o"
    _log(out / "cot_arithmetic.jsonl", COT, {k: v for k, v in COT.items() if k != "correct"})
    line = _refused(["cot", "--task", "arithmetic", "--k", "0", "--n-items", "2", "--out", str(out)],
                    capsys)
    assert "cot_arithmetic.jsonl, line 2: CoT record is malformed (field 'correct' is missing)" in line


def test_a_malformed_compress_record_is_named_before_the_weights_load(tmp_path, no_weights, capsys):
    out = tmp_path / "o"
    _log(out / "compress.jsonl", NIAH, {**NIAH, "score": None})
    line = _refused(["compress", "--scores", _scores_file(tmp_path), *TINY, "--budgets", "0.8",
                     "--seeds", "0", "--out", str(out)], capsys)
    assert "compress.jsonl, line 2: NIAH record is malformed (field 'score' must be a finite number" in line


def test_a_nan_in_the_kept_needle_mass_is_named_before_the_weights_load(tmp_path, no_weights, capsys):
    import torch
    from safetensors.torch import save_file

    out = tmp_path / "o"
    out.mkdir()
    mass = torch.rand(GRID)
    mass[3, 4] = float("nan")
    save_file({"mass": mass}, out / "needle_mass.safetensors")
    line = _refused(["compress", "--scores", _scores_file(tmp_path), *TINY, "--budgets", "0.8",
                     "--seeds", "0", "--needle-mass", "--out", str(out)], capsys)
    assert "needle_mass.safetensors: 'mass' holds 1 value(s) that are NaN or infinite" in line
    assert "(3, 4)" in line


def test_a_malformed_families_record_is_named_before_the_weights_load(tmp_path, no_weights, capsys):
    out = tmp_path / "o"
    short = json.loads(json.dumps(FAMILY))
    short["copy"][0] = short["copy"][0][:8]
    _log(out / "families.jsonl", FAMILY, short)
    line = _refused(["scores", "--family", "copy,mass", *TINY, "--out", str(out)], capsys)
    assert ("families.jsonl, line 2: score-families record is malformed ('copy' row 0 has 8 heads, "
            "expected 9)") in line


def test_a_malformed_judge_record_is_named_before_the_weights_load(tmp_path, no_weights, capsys):
    out = tmp_path / "o"
    _log(out / "damage" / "niah.jsonl", NIAH, {**NIAH, "rouge_recall": "1.0"})
    line = _refused(["scores", "--family", "copy", "--judge", "--ks", "1", "--seeds", "1", *TINY,
                     "--out", str(out)], capsys)
    assert "damage/niah.jsonl, line 2: NIAH record is malformed (field 'rouge_recall'" in line


def test_a_malformed_patching_record_is_named_before_the_weights_load(tmp_path, no_weights, capsys):
    out = tmp_path / "o"
    bad = json.loads(json.dumps(PATCH))
    bad["patched"][0][0] = "0.5"
    _log(out / "patching.jsonl", PATCH, bad)
    line = _refused(["patch", *TINY, "--layers", "0", "--out", str(out)], capsys)
    assert ("patching.jsonl, line 2: patching record is malformed ('patched' of head (0, 0) is "
            "'0.5', not a finite number or null)") in line


def test_a_malformed_record_in_a_shard_log_is_named_too(tmp_path, no_weights, capsys):
    out = tmp_path / "o"
    _log(out / "shards" / "20260101-000000-1" / "r1" / "cot_arithmetic.jsonl", COT, {**COT, "mode": "x"})
    line = _refused(["cot", "--task", "arithmetic", "--k", "0", "--n-items", "2", "--out", str(out)],
                    capsys)
    assert "r1/cot_arithmetic.jsonl, line 2: CoT record is malformed (field 'mode' must be" in line


# ---- the record checks themselves -------------------------------------------------------------
@pytest.mark.parametrize(("rec", "message"), [
    ([], "not a JSON object"),
    ({**COT, "correct": 1}, "field 'correct' must be true or false, got 1"),
    ({**COT, "id": True}, "field 'id' must be an item id"),
    ({**COT, "output": None}, "field 'output' must be a string"),
    ({**COT, "mask": ""}, "field 'mask' must be a non-empty string"),
])
def test_cot_record_problems(rec, message):
    from rhlens.validate import cot_record_problem

    assert cot_record_problem(COT) is None and cot_record_problem({**COT, "id": 3}) is None
    assert message in cot_record_problem(rec)


@pytest.mark.parametrize(("change", "message"), [
    ({"index": -1}, "field 'index' must be a whole number >= 0"),
    ({"clean": float("nan")}, "field 'clean' must be a finite number or null"),
    ({"seconds": "1"}, "field 'seconds' must be a finite number >= 0"),
    ({"patched": [[0.1] * 9] * 29}, "'patched' has 29 layers, the model 30"),
    ({"patched": [[0.1] * 9] * 29 + [[0.1] * 10]}, "'patched' row 29 has 10 heads, expected 9"),
    ({"patched": [[True] * 9] * 30}, "'patched' of head (0, 0) is True"),
    ({"pair": []}, "field 'pair' must be a JSON object"),
])
def test_patching_record_problems(change, message):
    from rhlens.validate import patching_record_problem

    assert patching_record_problem(PATCH, GRID) is None
    assert patching_record_problem({**PATCH, "clean": None}, GRID) is None  # a metric that was NaN
    assert message in patching_record_problem({**PATCH, **change}, GRID)


@pytest.mark.parametrize(("change", "message"), [
    ({"success": "yes"}, "field 'success' must be true or false"),
    ({"mass": [[float("inf")] * 9] * 30}, "'mass' of head (0, 0) is inf, not a finite number"),
    ({"copy": None}, "field 'copy' must be a [layer][head] list"),
])
def test_families_record_problems(change, message):
    from rhlens.validate import families_record_problem

    assert families_record_problem(FAMILY, GRID, ("copy", "mass")) is None
    assert message in families_record_problem({**FAMILY, **change}, GRID, ("copy", "mass"))
    no_mass = {k: v for k, v in FAMILY.items() if k != "mass"}
    assert families_record_problem(no_mass, GRID, ("copy", "mass")) == "field 'mass' is missing"


# ---- token ids, before any forward ---------------------------------------------------------
def _bad_tokens(bad: str, vocab: int):
    """Token ids a user might pass as a tensor (what the functions' annotations take; lists,
    strings and ragged rows reach the same check: test_check_token_rows_refuses_any_non_ids)."""
    import torch

    return {"outside": torch.tensor([[1, 2, vocab]]), "negative": torch.tensor([[1, -1, 2]]),
            "float": torch.tensor([[1.0, 2.0, 3.0]]), "bool": torch.tensor([[True, False, True]]),
            "3-D": torch.tensor([[[1, 2, 3]]]), "empty": torch.zeros(1, 0, dtype=torch.long),
            "complex": torch.tensor([[1, 2, 3]], dtype=torch.complex64)}[bad]


BAD_TOKENS = ["outside", "negative", "float", "bool", "3-D", "empty", "complex"]


@pytest.fixture
def embed_calls(toy_model):
    """How many times the model's embedding ran (it must not, for bad ids)."""
    from rhlens.engine import hf_model

    calls = []
    handle = hf_model(toy_model[0]).get_input_embeddings().register_forward_pre_hook(
        lambda module, args: calls.append(1))
    yield calls
    handle.remove()


@pytest.mark.parametrize("bad", BAD_TOKENS)
def test_patch_activation_refuses_bad_token_ids_before_any_forward(bad, toy_model, embed_calls):
    from rhlens.patching import patch_activation

    model, _ = toy_model
    with pytest.raises(RhlensError, match="corrupted_tokens") as info:
        patch_activation(model, _bad_tokens(bad, model.cfg.d_vocab), {}, lambda logits: logits[:, -1, 0])
    assert "\n" not in str(info.value)
    assert not embed_calls


@pytest.mark.parametrize("bad", BAD_TOKENS)
def test_cache_answer_patterns_refuses_bad_token_ids_before_any_forward(bad, toy_model, embed_calls):
    from rhlens.retrieval.detect import cache_answer_patterns

    model, _ = toy_model
    with pytest.raises(RhlensError, match="tokens") as info:
        cache_answer_patterns(model, _bad_tokens(bad, model.cfg.d_vocab), answer_start=2)
    assert "\n" not in str(info.value)
    assert not embed_calls


def test_good_token_ids_still_run(toy_model, embed_calls):
    import torch

    from rhlens.retrieval.detect import cache_answer_patterns

    model, _ = toy_model
    cache = cache_answer_patterns(model, torch.tensor([5, 6, 7, 8], dtype=torch.int32), answer_start=2)
    assert tuple(cache["blocks.0.attn.hook_pattern"].shape[-2:]) == (2, 3)  # the answer rows
    assert embed_calls


@pytest.mark.parametrize("bad", [[[1, 2, 3], [1, 2]], "1 2 3", [[1, None, 3]], [[1, 2, 10**30]],
                                 [[1.5]], [[True]], [], [[]], [[[1]]], None, 3, {"a": 1}])
def test_check_token_rows_refuses_any_non_ids(bad):
    import numpy as np

    from rhlens.validate import check_token_rows

    with pytest.raises(RhlensError, match="corrupted_tokens"):
        check_token_rows(bad, 50, "corrupted_tokens")
    with pytest.raises(RhlensError, match="corrupted_tokens"):
        check_token_rows(np.array([[0.5]]), 50, "corrupted_tokens")


def test_check_token_rows_names_the_id_and_the_vocabulary():
    from rhlens.validate import check_token_rows

    with pytest.raises(RhlensError, match=r"id 60 is outside the vocabulary \(\[0, 49\]\)"):
        check_token_rows([[1, 60]], 50, "corrupted_tokens")
    assert check_token_rows([4, 5], 50).tolist() == [[4, 5]]


# ---- counts that expand work: refused with the real limit, before anything runs ----------------
@pytest.mark.parametrize(("argv", "message"), [
    (["mask-sweep", "--scores", "{scores}", "--seeds", "1000000000"],
     "argument --seeds: 1000000000 is above the limit of 10,000 (random draws averaged"),
    (["cot", "--task", "arithmetic", "--scores", "{scores}", "--k", "2", "--seeds", "1000000000"],
     "argument --seeds: 1000000000 is above the limit of 10,000"),
    (["compress", "--scores", "{scores}", "--seeds", "1000000000"],
     "argument --seeds: 1000000000 is above the limit of 10,000"),
    (["scores", "--judge", "--seeds", "1000000000"], "argument --seeds: 1000000000 is above the limit"),
    (["scores", "--family", "induction", "--sequences", "1000000000"],
     "argument --sequences: 1000000000 is above the limit of 10,000"),
    (["cot", "--task", "arithmetic", "--k", "0", "--n-items", "1000000000000"],
     "--n-items 1000000000000 is more than the 30 items the task holds (arithmetic: 30)"),
    (["patch", "--batch-size", "1000000000000"],
     "--batch-size 1000000000000 is more than the 270 heads patched per pair (every head: 30 x 9)"),
    (["patch", "--layers", "0", "--batch-size", "10"],
     "--batch-size 10 is more than the 9 heads patched per pair (--layers: 1 x 9)"),
    # the refusal names the flag, never the library's field
    (["detect", "--max-new-tokens", "1000000000"],
     "--max-new-tokens 1000000000 does not fit the model's maximum context of 8192 tokens"),
    (["niah", "--max-new-tokens", "1000000000"], "use --max-new-tokens below 8192"),
    (["detect", "--max-new-tokens", "8100", *TINY],
     "(--max-new-tokens 8100), more than the model's maximum context of 8192; use shorter lengths "
     "or --max-new-tokens of at most"),
    (["cot", "--task", "arithmetic", "--k", "0", "--max-new-tokens-cot", "1000000000"],
     "--max-new-tokens-cot 1000000000 does not fit the model's maximum context of 8192 tokens"),
    (["compress", "--scores", "{scores}", *TINY, "--budgets", "0.8", "--window", "1000000000000"],
     "the sink and window already hold the whole 200-token context: use a window below 196"),
    (["detect", "--answer-buffer", "1000000000000", "--lengths", "400"],
     "keep fewer tokens for the answer (answer_buffer, --answer-buffer: at most"),
])
def test_absurd_counts_are_refused_with_the_real_limit(argv, message, tmp_path, no_weights, capsys):
    argv = [a.replace("{scores}", _scores_file(tmp_path)) for a in argv]
    line = _refused([*argv, "--out", str(tmp_path / "o")], capsys)
    assert message in line
    assert "max_new_tokens=" not in line  # the CLI names its flag


def test_the_library_names_its_own_fields():
    import torch

    from rhlens.families import FamiliesConfig
    from rhlens.masks import seed_list, sweep_masks
    from rhlens.probes import Probe
    from rhlens.retrieval import check_probes
    from rhlens.retrieval.scores import RetrievalScores

    with pytest.raises(RhlensError, match="seeds is 1000000000, above the limit of 10000"):
        seed_list(10**9)
    with pytest.raises(RhlensError, match="seeds holds 10001 seeds"):
        seed_list(range(10_001))
    scores = RetrievalScores(per_probe=torch.rand(1, *GRID), success=torch.ones(1, dtype=torch.bool),
                             model_name="m")
    with pytest.raises(RhlensError, match="seeds is 1000000000"):
        sweep_masks(scores, [2], seeds=10**9)
    with pytest.raises(RhlensError, match="n_sequences is 1000000000, above the limit"):
        FamiliesConfig(n_sequences=10**9)
    probe = Probe([1, 2, 3, 4], (1, 2), "x", length=4, depth=0.0, needle_id="n")
    with pytest.raises(RhlensError, match=r"max_new_tokens=9000 \(of the config's GenerationConfig\)"):
        check_probes([probe], 8192, 9000)
    with pytest.raises(RhlensError, match="--max-new-tokens 9000 does not fit"):
        check_probes([probe], 8192, 9000, name="--max-new-tokens")


def test_cot_budgets_beyond_the_context_are_refused_before_any_buffer(toy_model):
    from rhlens.cot.experiment import CoTConfig, cot_ablation

    model, tok = toy_model
    n_ctx = model.cfg.n_ctx
    with pytest.raises(RhlensError, match=f"max_new_tokens_cot={n_ctx} \\(of the CoTConfig\\)"):
        cot_ablation(model, [("1 + 1 =", "2")], config=CoTConfig(max_new_tokens_cot=n_ctx),
                     tokenizer=tok, progress=False)


def test_families_size_their_buffers_by_the_probes_not_the_flag(toy_model):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_families import _toy_probes

    from rhlens.families import FamiliesConfig, score_families
    from rhlens.retrieval import DetectConfig

    model, tok = toy_model
    probes = _toy_probes(tok, n=2)
    huge = score_families(model, probes, tokenizer=tok, config=FamiliesConfig(
        families=("copy", "mass"), detect=DetectConfig(max_new_tokens=4, batch_size=10**12)))
    two = score_families(model, probes, tokenizer=tok, config=FamiliesConfig(
        families=("copy", "mass"), detect=DetectConfig(max_new_tokens=4, batch_size=2)))
    for family in ("copy", "mass"):
        assert torch_equal(huge[family].per_probe, two[family].per_probe)


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)


# ---- the library's side: a notebook resuming with out= gets the same reason, before any answer ----
def _damage(log, line: int, **change) -> None:
    lines = log.read_text().splitlines()
    rec = json.loads(lines[line - 1])
    rec.update(change)
    lines[line - 1] = json.dumps(rec)
    log.write_text("\n".join(lines) + "\n")


def _never(*args, **kwargs):
    raise AssertionError("computed before the resumed records were checked")


def test_a_notebook_resume_checks_cot_records_first(toy_model, tmp_path, monkeypatch):
    import rhlens.cot.experiment as experiment

    model, tok = toy_model
    items = [("1 + 1 =", "2"), ("2 + 2 =", "4")]
    config = experiment.CoTConfig(max_new_tokens_cot=2, max_new_tokens_direct=2, n_boot=10)
    experiment.cot_ablation(model, items, config=config, tokenizer=tok, out=tmp_path, progress=False)
    _damage(tmp_path / "cot_items.jsonl", 2, correct="yes")
    monkeypatch.setattr(experiment, "generate_many", _never)
    with pytest.raises(RhlensError, match=r"cot_items.jsonl: the CoT record '[^']+' is malformed "
                                          r"\(field 'correct' must be true or false, got 'yes'\)"):
        experiment.cot_ablation(model, items, config=config, tokenizer=tok, out=tmp_path, progress=False)


def test_a_notebook_resume_checks_niah_records_first(toy_model, tmp_path, monkeypatch):
    import sys
    from pathlib import Path

    import rhlens.niah as niah

    sys.path.insert(0, str(Path(__file__).parent))
    from test_families import _toy_probes

    model, tok = toy_model
    probes = _toy_probes(tok, n=2)
    config = niah.NIAHConfig(max_new_tokens=2)
    niah.niah_sweep(model, probes, config=config, tokenizer=tok, out=tmp_path, progress=False)
    _damage(tmp_path / "niah.jsonl", 1, rouge_recall=float("nan"))
    monkeypatch.setattr(niah, "generate_many", _never)
    with pytest.raises(RhlensError, match=r"niah.jsonl: the NIAH record '[^']+' is malformed "
                                          r"\(field 'rouge_recall' must be a finite number"):
        niah.niah_sweep(model, probes, config=config, tokenizer=tok, out=tmp_path, progress=False)


def test_a_notebook_resume_checks_patching_records_first(toy_model, tmp_path, monkeypatch):
    import sys
    from pathlib import Path

    import rhlens.patching.heads as heads

    sys.path.insert(0, str(Path(__file__).parent))
    from test_patching import toy_pair

    model, tok = toy_model
    pairs = [toy_pair(tok, seed) for seed in range(2)]
    heads.patch_heads(model, pairs, out=tmp_path, progress=False)
    _damage(tmp_path / "patching.jsonl", 2, patched=[[0.0]])
    monkeypatch.setattr(heads, "_fast_pair", _never)
    with pytest.raises(RhlensError, match=r"patching.jsonl: the patching record '[^']+' is malformed "
                                          r"\('patched' has 1 layers, the model 2\)"):
        heads.patch_heads(model, pairs, out=tmp_path, progress=False)
