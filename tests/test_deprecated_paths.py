"""Import paths of older rhlens keep working, each with one DeprecationWarning naming the new home.

pyproject's filterwarnings ignores DeprecationWarning, so every check here records warnings
explicitly; whole-module moves are checked in a fresh interpreter (a module warns on its first
import only).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import rhlens
from rhlens.deprecation import MOVED_MODULES

ROOT = Path(rhlens.__file__).resolve().parent

# every module path that moved, with a name it must still give
OLD_NAMES = {
    "rhlens.results": "load_result", "rhlens.io": "ProbeLog", "rhlens.identity": "run_header",
    "rhlens.runs": "save_detection_run", "rhlens.scores": "RetrievalScores",
    "rhlens.official": "load_official", "rhlens.probe": "Probe", "rhlens.haystacks": "make_haystack",
    "rhlens.model_files": "file_sha256", "rhlens.patching_cli": "cmd_patch",
}

_PROBE = r"""
import importlib, json, sys, warnings
out = {}
for old, name in json.loads(sys.argv[1]).items():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    dep = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
    new = sys.modules[json.loads(sys.argv[2])[old]]
    out[old] = {"warnings": dep, "same": module is new, "has": hasattr(module, name),
                "spec": module.__spec__.name, "file": module.__file__}
print(json.dumps(out))
"""


def test_every_moved_module_is_listed_here():
    assert set(OLD_NAMES) == set(MOVED_MODULES)


def test_old_module_paths_warn_once_and_are_the_new_modules():
    run = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(OLD_NAMES), json.dumps(MOVED_MODULES)],
                         capture_output=True, text=True, check=True)
    got = json.loads(run.stdout)
    for old, new in MOVED_MODULES.items():
        seen = got[old]
        assert len(seen["warnings"]) == 1 and new in seen["warnings"][0], (old, seen)
        assert seen["same"] and seen["has"], (old, seen)
        assert seen["spec"] == new  # the module keeps its own identity
        assert Path(seen["file"]).resolve().is_relative_to(ROOT)  # never a stale file elsewhere


def test_no_file_is_left_at_an_old_path():
    for old in MOVED_MODULES:
        assert not (ROOT.parent / (old.replace(".", "/") + ".py")).exists(), old


def test_runs_keeps_its_older_names():
    import rhlens.report.runs as runs

    for name in ("RunDir", "RunContents", "read_run", "load_saved", "load_single_file", "find_scores",
                 "save_detection_run", "save_niah_run", "save_mask_sweep_run", "save_compress_run",
                 "save_properties", "save_figure", "detection_summary", "NIAH_LOG", "COMPRESS_LOG"):
        assert hasattr(runs, name), name


@pytest.mark.parametrize("name", ["top_k_mask", "random_k_mask", "parse_mask", "random_k_heads",
                                  "MASK_SPECS", "RETRIEVAL_THRESHOLD", "random_heads"])
def test_mask_names_left_ablation_with_a_warning(name):
    import rhlens.ablation
    import rhlens.masks

    with pytest.warns(DeprecationWarning, match=f"rhlens.masks.{name}"):
        value = getattr(rhlens.ablation, name)
    assert value is getattr(rhlens.masks, name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert rhlens.ablation.ablate_heads  # what stays raises no warning
    with pytest.raises(AttributeError):
        rhlens.ablation.no_such_name  # noqa: B018


def test_rhlens_itself_imports_no_old_path():
    moved = set(MOVED_MODULES)
    offenders = []
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n in moved]
            if isinstance(node, ast.ImportFrom) and node.module == "rhlens.ablation":
                offenders += [f"{path.relative_to(ROOT)}: ablation.{a.name}" for a in node.names
                              if a.name not in ("ablate_heads", "ablation_hooks", "head_means",
                                                "mean_reference_prompts")]
    assert not offenders
