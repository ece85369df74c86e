"""Build the notebooks: ``notebooks/src/*.py`` (``# %%`` cells) -> executed ``notebooks/*.ipynb`` with outputs.

A source is plain Python split into cells by lines starting with ``# %%``; a ``# %% [markdown]`` cell holds
markdown as ``# ``-prefixed comment lines. Each notebook is executed top to bottom in a fresh ``python3``
kernel (the interpreter running this script: its ``ipykernel`` spec) with the notebooks folder as the
working directory, and saved with its outputs, so the pictures show on GitHub. Volatile output (the
``text/plain`` twin of an image, which holds an object address) is dropped to keep diffs small.

Usage::

    python notebooks/build.py                # every notebook
    python notebooks/build.py 01 04_vit      # those whose name starts with 01 or 04_vit
"""

from __future__ import annotations

import argparse
import base64
import io
import re
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from PIL import Image

HERE = Path(__file__).resolve().parent
SOURCES = HERE / "src"
KERNEL = "python3"
CELL_TIMEOUT = 300
"""Seconds one cell may run before the build (or test) fails."""

_CELL = re.compile(r"^# %%(?P<markdown> \[markdown\])?.*$")


def cells(source: str) -> list[nbformat.NotebookNode]:
    """The cells of a ``# %%`` source: code cells as written, markdown cells with the ``# `` prefix removed.

    Example:
        >>> [(c.cell_type, c.source) for c in cells("# %% [markdown]\\n# # Title\\n#\\n# text\\n# %%\\nx = 1\\n")]
        [('markdown', '# Title\\n\\ntext'), ('code', 'x = 1')]
    """
    found: list[tuple[bool, list[str]]] = []
    for line in source.splitlines():
        head = _CELL.match(line)
        if head:
            found.append((bool(head["markdown"]), []))
        elif found:
            found[-1][1].append(line)
    out = []
    for markdown, lines in found:
        if markdown:
            text = "\n".join(ln[2:] if ln.startswith("# ") else ln.lstrip("#") for ln in lines).strip("\n")
            out.append(nbformat.v4.new_markdown_cell(text))
        else:
            out.append(nbformat.v4.new_code_cell("\n".join(lines).strip("\n")))
    return out


def notebook(source: Path) -> nbformat.NotebookNode:
    """An unexecuted notebook from a ``# %%`` source file."""
    nb = nbformat.v4.new_notebook(cells=cells(source.read_text()))
    nb.metadata["kernelspec"] = {"name": KERNEL, "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    return nb


def execute(nb: nbformat.NotebookNode, timeout: int = CELL_TIMEOUT) -> nbformat.NotebookNode:
    """Run every cell of ``nb`` in a fresh kernel (cwd: this folder); raises ``CellExecutionError`` on error."""
    client = NotebookClient(
        nb, timeout=timeout, kernel_name=KERNEL, resources={"metadata": {"path": str(HERE)}}, record_timing=False
    )
    client.execute()
    return nb


def _palette_png(encoded: str) -> str:
    picture = Image.open(io.BytesIO(base64.b64decode(encoded))).convert("RGB")
    buffer = io.BytesIO()
    picture.quantize(256).save(buffer, "png", optimize=True)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def tidy(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Keep only a compact PNG of image outputs.

    PIL images also give a JPEG copy and a ``text/plain`` line with an object address that changes every
    run: both are dropped; the PNG is re-encoded with a 256-colour palette (a third of the bytes).
    """
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if "image/png" in data:
                for twin in ("image/jpeg", "text/plain"):
                    data.pop(twin, None)
                data["image/png"] = _palette_png(data["image/png"])
    return nb


def build(source: Path) -> Path:
    """Execute the notebook of ``source`` and write ``notebooks/<name>.ipynb`` with its outputs."""
    target = HERE / f"{source.stem}.ipynb"
    nb = tidy(execute(notebook(source)))
    nbformat.validate(nb)
    nbformat.write(nb, target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="build only notebooks whose name starts with one of these")
    args = parser.parse_args(argv)
    sources = sorted(p for p in SOURCES.glob("*.py") if not args.names or p.stem.startswith(tuple(args.names)))
    if not sources:
        print(f"no notebook source matches {args.names} in {SOURCES}", file=sys.stderr)
        return 2
    for source in sources:
        start = time.perf_counter()
        target = build(source)
        print(f"wrote {target.relative_to(HERE.parent)}  ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
