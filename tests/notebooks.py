"""Run a notebook of notebooks/ in a fresh kernel and hand back what its code cells printed."""

from __future__ import annotations

from pathlib import Path

import nbclient
import nbformat

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def execute(name: str, cwd: Path, timeout: int = 120) -> str:
    """Execute notebooks/<name> with `cwd` as its working directory (the environment is the
    test's: set CHISEL_* variables with monkeypatch first); raise CellExecutionError on the first
    failing cell; return the text of every code cell's outputs."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=timeout, resources={"metadata": {"path": str(cwd)}}
    )
    client.execute()
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
