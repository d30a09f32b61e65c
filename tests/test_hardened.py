"""Issue 28: no input erases a file, hangs, or passes silently wrong.

Each test holds one case of the issue's classes: it fails on the code before the fix.
"""

from __future__ import annotations

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
