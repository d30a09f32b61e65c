"""Architecture figures of rhlens beside ../shared/tools/import_graph.py's loops (issue 24).

Imports that point from a lower layer up to a higher one (the layers of docs/ARCHITECTURE.md;
older module names mapped to the layer of their new home, so a checkout of any version can be
measured), private names imported across modules and across packages, generation settings
declared in a config other than GenerationConfig, and the rhlens import lines of the README's
Python examples. Run from the repository root: ``python scripts/architecture_metrics.py [-v]``.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

# The one table of docs/ARCHITECTURE.md's layers; tests/test_architecture.py reads it from here.
LAYERS = {  # top-level module or package -> layer
    "errors": 0, "stats": 0, "version": 0, "deprecation": 0, "validate": 0,
    "store": 1, "results": 1, "io": 1, "identity": 1, "runs": 1, "engine": 1,
    "models": 2, "model_files": 2, "probes": 2, "probe": 2, "haystacks": 2, "needlesets": 2,
    "distributed": 2, "data": 2,
    "retrieval": 3, "scores": 3, "official": 3, "masks": 3, "ablation": 3,
    "niah": 4, "cot": 4, "patching": 4, "properties": 4, "families": 4, "compress": 4, "trace": 4,
    "plotting": 5, "views": 5, "report": 5, "cli": 5, "patching_cli": 5,
    "__main__": 6, "": 6,  # rhlens/__init__.py, the face
}
# Fields named like a generation setting that are not one: PatchConfig.batch_size is patched
# copies per forward (patching generates nothing).
NOT_GENERATION = frozenset({"PatchConfig.batch_size"})


def modules(root: Path) -> dict[str, Path]:
    out = {}
    for path in root.rglob("*.py"):
        parts = ("rhlens", *path.relative_to(root).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def layer(module: str) -> int | None:
    return LAYERS.get(module.split(".")[1] if "." in module else "")


def imports(mods: dict[str, Path]):
    """(importer, imported module, name or None, line) for every internal import, module level
    or inside a function; ``name`` is None where a module itself is imported."""
    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    for module, path in sorted(mods.items()):
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
                found = resolve(target) if target.split(".")[0] == "rhlens" else None
                if found and found != module and not module.startswith(found + "."):
                    yield module, found, (name if found != target else None), node.lineno


def main() -> None:
    verbose = "-v" in sys.argv
    mods = modules(Path("rhlens"))
    edges = sorted(set(imports(mods)), key=lambda e: (e[0], e[1], e[2] or "", e[3]))
    up = sorted({f"{a} (L{layer(a)}) -> {b} (L{layer(b)}), line {n}" for a, b, _, n in edges
                 if layer(a) is not None and layer(b) is not None and layer(b) > layer(a)})
    private = [(a, b, name) for a, b, name, _ in edges
               if name and name.startswith("_") and not name.startswith("__")]
    crossing = [p for p in private if p[0].split(".")[:2] != p[1].split(".")[:2]]
    generation, declared = set(), {}
    for module, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef) and node.name.endswith("Config"):
                fields = [s.target.id for s in node.body
                          if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)]
                if node.name == "GenerationConfig":
                    generation = set(fields)
                else:
                    declared[f"{module}.{node.name}"] = fields
    repeated = sorted(f"{c}.{f}" for c, fs in declared.items() for f in fs
                      if f in generation and f"{c.rpartition('.')[2]}.{f}" not in NOT_GENERATION)
    blocks = re.findall(r"```python\n(.*?)```", Path("README.md").read_text(encoding="utf-8"), re.S)
    lines = [ln for b in blocks for ln in b.splitlines()
             if re.match(r"\s*(from rhlens\S* import|import rhlens)", ln)]
    report = [("imports from a lower layer to a higher one", up),
              ("private names imported across modules", [f"{a} <- {b}.{n}" for a, b, n in private]),
              ("private names imported across packages", [f"{a} <- {b}.{n}" for a, b, n in crossing]),
              ("generation settings declared outside GenerationConfig", repeated),
              ("rhlens import lines in the README's Python examples", lines)]
    for what, items in report:
        print(f"{what}: {len(items)}")
        for item in items if verbose else []:
            print(f"    {item}")


if __name__ == "__main__":
    main()
