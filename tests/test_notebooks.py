"""Every notebook in ``notebooks/`` runs top to bottom, headless, and shows its figures.

Slow (each loads the default model and runs it on a few short probes), so marked ``slow``.
The notebooks are executed in memory from ``notebooks/`` as working directory; nothing is
written back, so git keeps the stripped versions ``scripts/make_notebooks.py`` generates.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
PATHS = sorted(NOTEBOOKS.glob("*.ipynb"))
CELL_TIMEOUT = 900  # seconds per cell; a whole notebook takes a few minutes on 2 CPU cores


def _kernel_manager():
    """A kernel manager whose ``python3`` is this interpreter (the venv with rhlens in it).

    A ``python3`` kernelspec found elsewhere on the machine (a user-wide Jupyter) could point
    at another Python without rhlens; asking for this interpreter by path rules that out.
    """
    from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
    from jupyter_client.manager import KernelManager

    class ThisPython(KernelSpecManager):
        def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
            return KernelSpec(argv=[sys.executable, "-m", "ipykernel_launcher", "-f",
                                    "{connection_file}"],
                              display_name="Python 3 (rhlens venv)", language="python",
                              resource_dir=str(NOTEBOOKS))

    return KernelManager(kernel_name="python3", kernel_spec_manager=ThisPython())


def test_notebooks_are_generated():
    """notebooks/ holds exactly what scripts/make_notebooks.py writes (outputs stripped)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import make_notebooks
    finally:
        sys.path.pop(0)
    assert {p.name for p in PATHS} == set(make_notebooks.NOTEBOOK_CELLS)
    assert make_notebooks.main(["--check"]) == 0


@pytest.mark.slow
@pytest.mark.parametrize("path", PATHS, ids=[p.name for p in PATHS])
def test_notebook_runs(path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    # torch threads inside the kernel: as many as the rest of the suite uses
    monkeypatch.setenv("RHLENS_THREADS", os.environ.get("RHLENS_TEST_THREADS", "2"))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # let the kernel use its inline backend

    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, km=_kernel_manager(), timeout=CELL_TIMEOUT,
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()  # raises CellExecutionError, naming the cell, when one fails

    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert images, f"{path.name} displayed no figure"
    # tqdm's notebook bars have their widgets (no "IProgress not found" warning) ...
    stderr = "".join(o.get("text", "") for o in outputs if o.get("name") == "stderr")
    assert "IProgress" not in stderr
    assert "DeprecationWarning" not in stderr  # the notebooks use rhlens' current import paths
    # ... and the quickstart draws the head view.
    if path.name.startswith("01"):
        html = "".join(o.get("data", {}).get("text/html", "") for o in outputs)
        assert 'class="rhv"' in html and "rhv-needle" in html
