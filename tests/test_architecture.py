"""The shape of the package (docs/ARCHITECTURE.md): data flows one way.

Every import is read from the source (module level and inside functions alike): no module
imports one of a higher layer, there is no import loop, no private name crosses a package,
and the store loads a result whose module nothing has imported yet.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import torch

import rhlens

ROOT = Path(rhlens.__file__).resolve().parent

# docs/ARCHITECTURE.md's layers: a module may import its own layer's (without a loop) and lower ones.
LAYERS = {
    "errors": 0, "stats": 0, "version": 0, "deprecation": 0, "validate": 0,
    "store": 1, "engine": 1,
    "models": 2, "probes": 2, "needlesets": 2, "distributed": 2, "data": 2,
    "retrieval": 3, "masks": 3, "ablation": 3,
    "niah": 4, "cot": 4, "patching": 4, "properties": 4, "families": 4, "compress": 4, "trace": 4,
    "plotting": 5, "views": 5, "report": 5, "cli": 5,
    "__main__": 6, "": 6,  # rhlens/__init__.py, the face
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = ("rhlens", *path.relative_to(ROOT).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports() -> list[tuple[str, str, str | None, int]]:
    """(importer, imported module, imported name or None, line) for every internal import."""
    out = []
    for module, path in MODULES.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [(a.name, None) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                targets = [(f"{base}.{a.name}", a.name) for a in node.names]
            else:
                continue
            for target, name in targets:
                if target.split(".")[0] != "rhlens":
                    continue
                found = _resolve(target)
                if found and found != module and not module.startswith(found + "."):
                    named = name if found != target else None  # `from pkg import submodule` names none
                    out.append((module, found, named, node.lineno))
    return out


IMPORTS = _imports()


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
