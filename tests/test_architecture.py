"""The shape of the package (docs/ARCHITECTURE.md): data flows one way.

Every import is read from the source (module level and inside functions alike): no module
imports one of a higher layer, there is no import loop, no private name crosses a package,
and the store loads a result whose module nothing has imported yet.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import torch

import rhlens

ROOT = Path(rhlens.__file__).resolve().parent


def _metrics_script():
    """scripts/architecture_metrics.py: the one home of the layers table and the import reader."""
    path = ROOT.parent / "scripts" / "architecture_metrics.py"
    spec = importlib.util.spec_from_file_location("architecture_metrics", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_SCRIPT = _metrics_script()
# docs/ARCHITECTURE.md's layers: a module may import its own layer's (without a loop) and lower ones.
LAYERS = _SCRIPT.LAYERS
MODULES = _SCRIPT.modules(ROOT)
IMPORTS = sorted(set(_SCRIPT.imports(MODULES)), key=lambda e: (e[0], e[1], e[2] or "", e[3]))


def _layer(module: str) -> int:
    return LAYERS[module.split(".")[1] if "." in module else ""]


def test_every_module_has_a_layer():
    assert not [m for m in MODULES if (m.split(".")[1] if "." in m else "") not in LAYERS]


def test_no_import_points_up_a_layer():
    up = [f"{a} (layer {_layer(a)}) imports {b} (layer {_layer(b)}), line {line}"
          for a, b, _, line in IMPORTS if _layer(b) > _layer(a)]
    assert not up


def test_no_import_loop():
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for a, b, _, _ in IMPORTS:
        graph[a].add(b)
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def loop_from(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt] if nxt in path else [node, nxt]
            if nxt not in state and (found := loop_from(nxt, [*path, nxt])):
                return found
        state[node] = 2
        return None

    for start in sorted(MODULES):
        if start not in state:
            assert (found := loop_from(start, [start])) is None, " -> ".join(found)


def test_no_private_name_crosses_a_package():
    def package(m: str) -> str:
        return ".".join(m.split(".")[:2])

    crossing = [f"{a} imports {b}.{name} (line {line})" for a, b, name, line in IMPORTS
                if name and name.startswith("_") and not name.startswith("__")
                and package(a) != package(b)]
    assert not crossing


def test_the_store_loads_a_result_whose_module_is_not_imported(tmp_path):
    from rhlens.properties import sparse
    from rhlens.retrieval import RetrievalScores

    per = torch.zeros(3, 2, 2)
    per[:, 1, 0] = 0.5
    scores = RetrievalScores(per, torch.tensor([True, True, False]), "toy")
    sparse(scores).save(tmp_path / "sparse")
    code = ("import sys, rhlens\n"
            "assert 'rhlens.properties' not in sys.modules\n"
            f"r = rhlens.load_result({str(tmp_path / 'sparse')!r})\n"
            "print(type(r).__module__, type(r).__name__, r.n_probes)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.split() == ["rhlens.properties.paper", "SparsityResult", "2"]
