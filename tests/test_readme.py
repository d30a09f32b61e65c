"""The README says what runs: its Python blocks run as written, its commands and flags exist.

The Python blocks load the default model and run it on four short probes, so that test is
``slow``; the command checks only build the CLI's parser.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, flags=re.M | re.S)


def _subcommands() -> dict[str, set[str]]:
    """Each ``rhlens`` subcommand and its option strings."""
    import argparse

    from rhlens.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name: {o for action in p._actions for o in action.option_strings}
            for name, p in sub.choices.items()}


def test_quick_start_is_two_commands():
    """A newcomer gets exactly two commands: make demo and make test."""
    first = _blocks("bash")[0]
    commands = [line.split("#")[0].strip() for line in first.splitlines() if line.strip()]
    assert commands == ["make demo", "make test"]


def test_readme_commands_and_flags_exist():
    """Every ``rhlens <command>`` row of the command table names a real subcommand, and every
    flag in the row is one of its options; a flag named in the prose exists somewhere."""
    commands = _subcommands()
    rows = [line for line in README.splitlines() if line.startswith("| `rhlens ")]
    assert len(rows) >= 8
    for row in rows:
        name = re.match(r"\| `rhlens ([a-z-]+)", row).group(1)
        assert name in commands, row
        flags = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", row))
        assert flags <= commands[name], (name, flags - commands[name])
    everywhere = set().union(*commands.values())
    prose = set(re.findall(r"`(--[a-z][a-z-]*)", README))
    assert prose <= everywhere, prose - everywhere


def test_makefile_demo_flags_parse():
    """``make demo``'s detect and report lines parse (a renamed flag would break the demo)."""
    from rhlens.cli import build_parser

    makefile = (ROOT / "Makefile").read_text(encoding="utf-8").replace("\\\n", " ")
    lines = re.findall(r"\$\(BIN\)/rhlens (.+)", makefile)
    assert [line.split()[0] for line in lines] == ["detect", "show", "report"]
    for line in lines:
        argv = shlex.split(line.replace("$(OUT)", "runs/demo"))
        args = build_parser().parse_args(argv)
        assert args.command == argv[0]


@pytest.mark.slow
def test_readme_python_runs(tmp_path, monkeypatch):
    """The README's Python blocks, run in order as one session, do what their comments say."""
    blocks = _blocks("python")
    assert len(blocks) == 3
    monkeypatch.chdir(tmp_path)  # they write runs/mine, runs/kv and head_scores.json
    ns: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), ns)

    scores, probe = ns["scores"], ns["probe"]
    assert scores.n_probes == 4
    trace = ns["trace"]
    assert trace.heads[:2] == [list(h) for h in scores.top_heads(2)]
    assert (tmp_path / "heads.html").read_text().count('class="rhv"') == 1
    assert (tmp_path / "head_scores.json").is_file()
    assert (tmp_path / "runs" / "mine" / "probes.jsonl").is_file()
    # "[layer, head], as the engine scores": the same answer, the same per-probe scores
    # (the engine's records keep 6 decimals).
    assert ns["tokens"][probe.n_tokens:] == scores.probes[0]["response_ids"]
    assert torch.allclose(ns["per_head"], scores.per_probe[0], atol=1e-6)
    layer, head = ns["layer"], ns["head"]
    effect = ns["moved"].effects[0, layer, head]
    # The README says: 0 to 1, and on these probes between 0 and 0.5 (one head restores only
    # part of the answer).
    print(f"README: top head L{layer}H{head}, ov effect {float(effect):.3f}")
    assert 0.0 < float(effect) < 0.5
    assert ns["moved"].to_transformer_lens().values.shape[:2] == (30, 9)
    table = ns["cot"].to_dataframe()
    assert set(table["mask"]) == {"none", "top-20"}
    assert set(table["mode"]) == {"cot", "direct"}
    # the KV-compression block: every budget has each policy's NIAH score, the full cache too
    rows = ns["sweep"].table()
    assert [r["budget"] for r in rows] == [0.5, 0.75]
    assert all(0 <= r["retrieval"] <= 100 and 0 <= r["streaming"] <= 100 for r in rows)
    assert 0 <= ns["sweep"].score("full") <= 100
    assert (tmp_path / "runs" / "kv" / "compress.jsonl").is_file()
