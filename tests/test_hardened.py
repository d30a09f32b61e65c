"""Issue 28: no input erases a file, hangs, or passes silently wrong.

Each test holds one case of the issue's classes: it fails on the code before the fix.
"""

from __future__ import annotations

import json
import os
import stat

import pytest

from rhlens.cli import main
from rhlens.errors import RhlensError


def _refused(argv: list[str], capsys) -> str:
    """Run ``rhlens argv``: it must end with exit 2 and one error line, before the weights load."""
    code = main(argv)
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if not ln.startswith("rhlens: warning:")]
    assert code == 2, (out, err)
    assert len(lines) == 1 and lines[0].startswith("rhlens: error: "), err
    assert "loading" not in out
    return lines[0]


# ---- data lost ---------------------------------------------------------------------------------
def test_a_symlinked_lock_leaves_its_target_byte_identical(tmp_path, capsys):
    target = tmp_path / "notes.txt"
    content = b"my notes\n\x00\xff binary too\n"
    target.write_bytes(content)
    out = tmp_path / "OUT"
    out.mkdir()
    (out / ".rhlens.lock").symlink_to(target)
    line = _refused(["detect", "--lengths", "300", "--out", str(out)], capsys)
    assert "is not rhlens' lock file (a symbolic link" in line
    assert target.read_bytes() == content
    assert (out / ".rhlens.lock").is_symlink()


@pytest.mark.parametrize("kind", ["hard link", "foreign content"])
def test_a_lock_that_is_not_rhlens_own_is_left_untouched(kind, tmp_path):
    from rhlens.io import lock_output

    out = tmp_path / "OUT"
    out.mkdir()
    target = tmp_path / "notes.txt"
    target.write_text("precious\n")
    if kind == "hard link":
        os.link(target, out / ".rhlens.lock")
    else:
        (out / ".rhlens.lock").write_text("precious\n")
    with pytest.raises(RhlensError, match="is not rhlens' lock file"):
        lock_output(out)
    assert (out / ".rhlens.lock").read_text() == "precious\n"


def test_rhlens_own_stale_lock_is_reused(tmp_path):
    from rhlens.io import lock_output, unlock_output

    out = tmp_path / "OUT"
    out.mkdir()
    (out / ".rhlens.lock").write_text("12345\n")  # a finished process's pid
    lock_output(out)
    try:
        assert (out / ".rhlens.lock").read_text() == f"{os.getpid()}\n"
    finally:
        unlock_output(out)


def test_a_symlinked_log_is_never_appended_through(tmp_path):
    from rhlens.io import ShardLog

    target = tmp_path / "notes.txt"
    target.write_text("precious\n")
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "probes.jsonl").symlink_to(target)
    with pytest.raises(RhlensError, match="symbolic link"):
        ShardLog(tmp_path / "r" / "probes.jsonl")
    assert target.read_text() == "precious\n"


def test_results_are_written_through_no_planted_link_and_readable(tmp_path):
    import torch

    from rhlens.scores import RetrievalScores

    target = tmp_path / "notes.txt"
    target.write_text("precious\n")
    folder = tmp_path / "scores"
    folder.mkdir()
    (folder / ".tensors.safetensors.tmp").symlink_to(target)  # the old fixed temporary name
    (folder / "tensors.safetensors").symlink_to(target)
    s = RetrievalScores(per_probe=torch.rand(2, 3, 4), success=torch.ones(2, dtype=torch.bool),
                        model_name="m")
    s.save(folder)
    assert target.read_text() == "precious\n"
    written = folder / "tensors.safetensors"
    assert not written.is_symlink()
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(written.stat().st_mode) == 0o666 & ~umask  # 644 like the rest
    assert stat.S_IMODE((folder / "result.json").stat().st_mode) == 0o666 & ~umask
    assert torch.equal(RetrievalScores.load(folder).per_probe, s.per_probe)


# ---- silently wrong: the output folder ---------------------------------------------------------
def test_empty_out_is_refused(capsys):
    assert "the output directory is empty" in _refused(["detect", "--out", ""], capsys)


def test_a_symlink_loop_as_out_says_so(tmp_path, capsys):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    line = _refused(["detect", "--out", str(tmp_path / "loop")], capsys)
    assert "symbolic link that cannot be followed" in line and "File exists" not in line


# ---- hangs -------------------------------------------------------------------------------------
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_a_fifo_as_needles_is_refused_without_reading_it(tmp_path, capsys):
    os.mkfifo(tmp_path / "n.jsonl")  # reading it would block forever
    line = _refused(["detect", "--needles", str(tmp_path / "n.jsonl"), "--out", str(tmp_path / "o")],
                    capsys)
    assert "is a named pipe (FIFO), not a regular file" in line


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_a_fifo_in_a_haystack_folder_is_refused_without_reading_it(tmp_path, capsys):
    hay = tmp_path / "hay"
    hay.mkdir()
    (hay / "a.txt").write_text("Some text. " * 500)
    os.mkfifo(hay / "b.txt")
    line = _refused(["detect", "--haystack", str(hay), "--out", str(tmp_path / "o")], capsys)
    assert "b.txt is a named pipe (FIFO)" in line


@pytest.mark.parametrize(("argv", "message"), [
    (["--length-range", "400", "8000", "100000"], "only 7601 whole-number lengths lie from 400 to 8000"),
    (["--depth-count", "1000000000"], "use COUNT <= 2000"),
    (["--max-new-tokens", "1000000000"], "does not fit the model's maximum context of 8192 tokens"),
])
def test_huge_counts_are_refused_with_the_real_limit(argv, message, tmp_path, capsys):
    line = _refused(["detect", *argv, "--out", str(tmp_path / "o")], capsys)
    assert message in line and "use shorter lengths" not in line


def test_linspace_is_bounded_before_it_expands():
    from rhlens.probes import ProbeConfig

    with pytest.raises(RhlensError, match="only 101 distinct whole numbers"):
        ProbeConfig.linspace(0, 100, 10**12)


# ---- silently wrong ----------------------------------------------------------------------------
@pytest.mark.parametrize(("ref", "hyp", "want"), [
    ("🎉 🚀", "🎉 🚀", 1.0), ("🎉🚀", "🚀", 0.5), ("→ ∑ ©", "→ ∑ ©", 1.0), ("€5", "5 €", 1.0),
    ("🎉", "🚀", 0.0), ("a, b!", "a b", 1.0)])
def test_rouge_counts_symbols_and_emoji(ref, hyp, want):
    from rhlens.stats import rouge1_recall

    assert rouge1_recall(ref, hyp) == pytest.approx(want)


def test_rouge_still_equals_rouge_score_on_ascii_symbols():
    from rouge_score import rouge_scorer

    from rhlens.stats import rouge1_recall

    scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)
    for ref, hyp in [("$5 & 10% off!", "5 10 off"), ("a_b-c", "a b c"), ("~^|", "~^|")]:
        assert rouge1_recall(ref, hyp) == pytest.approx(scorer.score(ref, hyp)["rouge1"].recall)


def test_nan_scores_are_refused_on_load_and_before_top_k(tmp_path, capsys):
    import torch

    from rhlens.scores import RetrievalScores

    (tmp_path / "nan.json").write_text(json.dumps({f"{la}-{h}": [float("nan")]
                                                   for la in range(30) for h in range(9)}))
    line = _refused(["niah", "--scores", str(tmp_path / "nan.json"), "--mask", "top:3",
                     "--out", str(tmp_path / "o")], capsys)
    assert "NaN or infinity" in line
    with pytest.raises(RhlensError, match="NaN or infinite"):
        RetrievalScores(per_probe=torch.full((1, 2, 2), float("inf")),
                        success=torch.ones(1, dtype=torch.bool), model_name="m")


@pytest.mark.parametrize("item", ["31", (0.5, 1), (True, 1), ("3", "1"), "3.1", (1, 2, 3), (-1, 0)])
def test_heads_are_never_coerced(item):
    from rhlens.ablation import Mask

    with pytest.raises(RhlensError):
        Mask((item,))


def test_numpy_and_tensor_heads_are_accepted():
    import numpy as np
    import torch

    from rhlens.ablation import Mask

    assert Mask(((np.int64(2), np.int32(1)), (torch.tensor(0), 3))).heads == ((0, 3), (2, 1))


def _cache(seq: int, layers: int = 2, heads: int = 3):
    import torch

    pattern = torch.softmax(torch.randn(1, heads, seq, seq), -1).tril()
    return {f"blocks.{la}.attn.hook_pattern": pattern for la in range(layers)}


@pytest.mark.parametrize("n_tokens", [8, 12])
def test_cache_and_tokens_of_other_lengths_are_refused(n_tokens):
    from rhlens.retrieval import retrieval_scores_from_cache

    with pytest.raises(RhlensError, match=r"positions but tokens has|query rows"):
        retrieval_scores_from_cache(_cache(10), list(range(n_tokens)), needle_span=(2, 4),
                                    answer_start=6)


@pytest.mark.parametrize("span", [(1, 2, 3), (True, 3), [(1, 3), (2, 4, 5)], (4, 2)])
def test_malformed_spans_are_one_line(span):
    from rhlens.retrieval import retrieval_scores_from_cache

    with pytest.raises(RhlensError):
        retrieval_scores_from_cache(_cache(10), list(range(10)), needle_span=span, answer_start=6)


@pytest.mark.parametrize("span", [(1.5, 3), (1, 2, 3), ("1", 3), 13, (3, 3), (-1, 2)])
def test_check_span_takes_only_two_ordered_whole_numbers(span):
    from rhlens.validate import check_span

    with pytest.raises(RhlensError, match="needle_span"):
        check_span(span, 10)


def test_cache_scores_of_matching_tokens_still_work():
    from rhlens.retrieval import retrieval_scores_from_cache

    got = retrieval_scores_from_cache(_cache(10), list(range(10)), needle_span=(2, 4), answer_start=6)
    assert tuple(got.shape) == (2, 3)
    again = retrieval_scores_from_cache(_cache(9), list(range(10)), needle_span=(2, 4), answer_start=6)
    assert tuple(again.shape) == (2, 3)  # a cache without the last answer token


# ---- tracebacks --------------------------------------------------------------------------------
def _record(key="k", **over):
    rec = {"key": key, "success": True, "rouge_recall": 1.0, "response": "x",
           "scores": [[0.0] * 9 for _ in range(30)]}
    rec.update(over)
    return rec


@pytest.mark.parametrize(("record", "message"), [
    (_record(success=None), "field 'success' must be true or false"),
    ({k: v for k, v in _record().items() if k != "scores"}, "field 'scores' is missing"),
    (_record(scores=[[0.0] * 8] + [[0.0] * 9] * 29), "'scores' row 0 has 8 heads, expected 9"),
    (_record(scores=[[0.0] * 9] * 29), "'scores' has 29 layers, the model 30"),
])
def test_a_malformed_probes_jsonl_record_is_named_before_the_model_loads(record, message, tmp_path,
                                                                           monkeypatch, capsys):
    import rhlens.io

    monkeypatch.setattr(rhlens.io, "check_resume", lambda *a, **k: None)  # the header is fine
    out = tmp_path / "o"
    out.mkdir()
    (out / "probes.jsonl").write_text(json.dumps(_record("a")) + "\n" + json.dumps(record) + "\n"
                                      + json.dumps(_record("c")) + "\n")
    line = _refused(["detect", "--lengths", "500", "--depths", "50", "--n-needles", "1",
                     "--out", str(out)], capsys)
    assert "probes.jsonl, line 2: detection record is malformed" in line and message in line


def test_a_malformed_niah_record_is_named_before_the_model_loads(tmp_path, monkeypatch, capsys):
    import rhlens.io

    monkeypatch.setattr(rhlens.io, "check_resume", lambda *a, **k: None)  # the header is fine
    out = tmp_path / "o"
    out.mkdir()
    good = {"key": "none|p", "mask": "none", "response": "x", "rouge_recall": 1.0, "score": 100.0,
            "answer_class": "correct"}
    (out / "niah.jsonl").write_text(json.dumps(good) + "\n" + json.dumps({**good, "score": None})
                                    + "\n" + json.dumps(good) + "\n")
    line = _refused(["niah", "--lengths", "500", "--depths", "50", "--n-needles", "1",
                     "--out", str(out)], capsys)
    assert "niah.jsonl, line 2: NIAH record is malformed (field 'score' must be a finite number" in line


def test_heads_written_3_1_2_are_one_line(tmp_path, capsys):
    assert "heads are written layer.head" in _refused(
        ["niah", "--mask", "heads:3.1.2", "--out", str(tmp_path / "o")], capsys)


def test_token_ids_outside_the_vocabulary_are_refused():
    from rhlens.validate import check_token_ids

    with pytest.raises(RhlensError, match="id 50000 is outside the vocabulary"):
        check_token_ids([1, 50000], 49152)
    with pytest.raises(RhlensError, match="must be integers"):
        check_token_ids(__import__("torch").tensor([1.0]), 10)


# ---- refusals with the real reason -------------------------------------------------------------
def test_a_needle_too_long_for_the_model_says_so(tmp_path, capsys):
    big = {"id": "big", "needle": "The code is 4471. " + "word " * 9000,
           "question": "What is the code?", "real_needle": "4471"}
    (tmp_path / "big.jsonl").write_text(json.dumps(big) + "\n")
    line = _refused(["detect", "--needles", str(tmp_path / "big.jsonl"), "--out", str(tmp_path / "o")],
                    capsys)
    assert "needle 'big' cannot fit the model's maximum context of 8192 tokens" in line
    assert "use lengths" not in line


def test_a_file_as_haystack_says_it_is_a_file(tmp_path, capsys):
    (tmp_path / "hay.txt").write_text("text")
    line = _refused(["detect", "--haystack", str(tmp_path / "hay.txt"), "--out", str(tmp_path / "o")],
                    capsys)
    assert "is a file, not a directory" in line and "does not exist" not in line


def test_duplicate_needle_ids_are_named(tmp_path, capsys):
    row = {"id": "x", "needle": "The code is 4471.", "question": "What is the code?",
           "real_needle": "4471"}
    (tmp_path / "n.jsonl").write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n")
    line = _refused(["detect", "--needles", str(tmp_path / "n.jsonl"), "--out", str(tmp_path / "o")],
                    capsys)
    assert "line 2: needle id 'x' is already the id of line 1" in line


def test_a_needles_file_with_a_bom_is_read(tmp_path):
    from rhlens.probes import load_needles

    path = tmp_path / "n.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(
        {"id": "x", "needle": "The code is 4471.", "question": "What is the code?",
         "real_needle": "4471"}).encode() + b"\n")
    assert [n.id for n in load_needles(path)] == ["x"]


def test_a_full_disk_names_the_file(tmp_path):
    import errno

    from rhlens.results import atomic_write

    def full(tmp):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError) as info:
        atomic_write(tmp_path / "result.json", full)
    assert info.value.filename == str(tmp_path / "result.json")
    assert not list(tmp_path.iterdir())  # no temporary file left behind


def test_identity_differences_show_where_long_values_differ():
    from rhlens.identity import diff_identity

    a = {"masks": [{"heads": [], "mode": "uniform", "phase": "decode", "label": "none"}]}
    b = {"masks": [{"heads": [], "mode": "uniform", "phase": "decode", "label": "none"},
                   {"heads": [[1, 2]], "mode": "uniform", "phase": "decode", "label": "random-1"}]}
    (line,) = diff_identity(a, b)
    old, new = line.split(" -> ")
    assert old.split(": ", 1)[1] != new  # not the same cut on both sides
    assert "heads': [[1, 2]]" in new


def test_niah_with_other_masks_is_refused_before_the_model_loads(tmp_path, monkeypatch, capsys):
    import rhlens.cli.prepare as prepare
    from rhlens.identity import run_header
    from rhlens.io import open_header
    from rhlens.models import describe_model

    real = prepare.check_resume

    def check_then_write(args, out, log_name, probe_set=None, config=None, **extra):
        real(args, out, log_name, probe_set, config, **extra)  # what the library writes, early
        model = describe_model(args.model, dtype=args.dtype, offline=args.offline)
        open_header(out, run_header(model, probe_set, config, **extra), log_name)

    def stop(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare, "check_resume", check_then_write)
    monkeypatch.setattr(prepare, "load", stop)
    argv = ["niah", "--lengths", "500", "--depths", "50", "--n-needles", "1", "--out", str(tmp_path / "o")]
    assert main(argv) == 130
    capsys.readouterr()
    line = _refused([*argv, "--mask", "random:2"], capsys)
    assert "holds a run with other settings (masks:" in line


# ---- leftovers ---------------------------------------------------------------------------------
def test_a_killed_builds_temporary_folder_is_removed(tmp_path):
    from rhlens.models import remove_stale_builds

    dead = tmp_path / "smollm2-0123.tmp4194300"  # no process has this id
    (dead / "sub").mkdir(parents=True)
    (dead / "sub" / "model.safetensors").write_bytes(b"\0" * 64)
    mine = tmp_path / f"x.tmp{os.getpid()}"
    mine.mkdir()
    alive = tmp_path / f"y.tmp{os.getppid()}"
    alive.mkdir()
    keep = tmp_path / "smollm2-0123"
    keep.mkdir()
    assert remove_stale_builds(tmp_path) == [dead]
    assert mine.exists() and alive.exists() and keep.exists()


@pytest.mark.parametrize("bad", ["outside", "negative", "float", "bool"])
def test_prompt_ids_outside_the_vocabulary_are_one_line(bad, toy_model):
    import torch

    from rhlens.engine import GenerationConfig, generate

    model, tok = toy_model
    vocab = model.cfg.d_vocab
    prompt = {"outside": [1, 2, vocab], "negative": [1, -1], "float": torch.tensor([1.0, 2.0]),
              "bool": torch.tensor([True, False])}[bad]
    with pytest.raises(RhlensError, match="token ids"):
        generate(model, tok, prompt, config=GenerationConfig(max_new_tokens=2))
