"""Captured decode graphs own every byte they replay on (issue 26), on a GPU.

A graph that used a cuBLAS workspace allocated outside its own memory pool kept writing to it
after torch.compile's CUDA graphs (HF's compiled static-cache ``generate``) freed it: an
illegal memory access, or another tensor overwritten. Each check runs
``benchmarks/graph_lifetime.py`` in its own process (a fault poisons the CUDA context) on a
randomly initialised Llama of the real width and a few layers.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "graph_lifetime.py"


def _check(tmp_path, check: str, *extra: str) -> dict:
    out = tmp_path / f"{check}.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--check", check, "--layers", "2",
                           "--lengths", "1024,4096", "--new-tokens", "10", "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=900)
    assert out.exists(), proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_a_replay_after_the_workspaces_are_freed_writes_only_its_own_memory(tmp_path):
    res = _check(tmp_path, "soak")
    assert "error" not in res, res.get("traceback")
    assert res["pattern_intact"] and res["same_results"]


def test_a_replay_after_the_freed_memory_went_back_to_the_driver_runs_and_agrees(tmp_path):
    res = _check(tmp_path, "unmap")
    assert "error" not in res, res.get("traceback")
    assert res["same_results"]


def test_rhlens_alternated_with_hf_compiled_static_generate_agrees_with_itself(tmp_path):
    res = _check(tmp_path, "sequence")
    assert "error" not in res, res.get("traceback")
    assert res["ok"], res["steps"]
