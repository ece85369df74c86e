"""The notebooks in ``notebooks/`` run top to bottom in a fresh kernel, match their sources, and show pictures.

Each saved ``.ipynb`` must hold the code of its ``notebooks/src/*.py`` source (rebuild with ``make notebooks``
after editing a source) and at least one PNG picture; then it is executed again from scratch (outputs
cleared, a new ``python3`` kernel, one CPU thread) and must finish without an error and draw pictures again.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
CELL_TIMEOUT = 120  # seconds per cell; each notebook takes seconds


def _build_module():
    spec = importlib.util.spec_from_file_location("notebooks_build", NOTEBOOKS / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build = _build_module()
SOURCES = sorted((NOTEBOOKS / "src").glob("*.py"))
EXPECTED = ["01_quickstart", "02_many_targets_vmap", "03_segmentation_detection", "04_vit", "05_metrics", "06_compile"]


def _pictures(nb: nbformat.NotebookNode) -> int:
    return sum("image/png" in out.get("data", {}) for cell in nb.cells for out in cell.get("outputs", []))


def _errors(nb: nbformat.NotebookNode) -> list[str]:
    return [
        f"{out.get('ename')}: {out.get('evalue')}"
        for cell in nb.cells
        for out in cell.get("outputs", [])
        if out.get("output_type") == "error"
    ]


def test_every_source_has_a_saved_notebook_and_the_readme_lists_it() -> None:
    assert [s.stem for s in SOURCES] == EXPECTED
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == EXPECTED
    readme = (NOTEBOOKS / "README.md").read_text()
    assert all(f"{name}.ipynb" in readme for name in EXPECTED)


def test_cells_parse_code_and_markdown() -> None:
    cells = build.cells("# %% [markdown]\n# # Title\n#\n# text\n\n# %%\nimport torch\n\n\n# %%\nx = 1\n")
    assert [(c.cell_type, c.source) for c in cells] == [
        ("markdown", "# Title\n\ntext"),
        ("code", "import torch"),
        ("code", "x = 1"),
    ]


@pytest.mark.parametrize("source", SOURCES, ids=[s.stem for s in SOURCES])
def test_notebook_runs_in_a_fresh_kernel(source: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    saved = nbformat.read(NOTEBOOKS / f"{source.stem}.ipynb", as_version=4)
    fresh = build.notebook(source)
    code = [c.source for c in saved.cells if c.cell_type == "code"]
    assert code == [c.source for c in fresh.cells if c.cell_type == "code"], "stale notebook: run `make notebooks`"
    assert _pictures(saved) >= 1, "the saved notebook shows no picture: run `make notebooks`"
    assert not _errors(saved)

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the kernel inherits it: one thread beside other test workers
    ran = build.execute(copy.deepcopy(fresh), timeout=CELL_TIMEOUT)  # raises CellExecutionError on any error
    assert not _errors(ran)
    assert _pictures(ran) == _pictures(saved)
