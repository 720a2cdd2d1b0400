"""notebooks/03_tiny_lm.ipynb executes end to end (GRPO on a tiny GPT-2 with recording, probes
and an SAE in the residual stream, attribution, validation, the answer and the report)."""

from __future__ import annotations

import re

import pytest

from tests.notebooks import execute

pytestmark = pytest.mark.slow


def test_tiny_lm_notebook_executes(tmp_path, monkeypatch):
    monkeypatch.setenv("CHISEL_NB_OUT", str(tmp_path / "runs"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    text = execute("03_tiny_lm.ipynb", tmp_path)  # raises on the first failing cell
    assert "40 updates recorded" in text and "marker_agrees" in text
    assert "Did the spurious marker get reinforced?" in text
    assert "The shortcut itself, as its own metric" in text
    run_dir = tmp_path / "runs" / "tiny_lm"
    for name in ("manifest.json", "ledger.parquet", "validation.parquet", "report.html"):
        assert (run_dir / name).is_file(), name
    page = (run_dir / "report.html").read_text()
    for anchor in ("summary", "lm-answer", "timeline", "validation", "credit", "completeness"):
        assert f'<section id="{anchor}">' in page, anchor
    assert not re.search(r"trash|wall_blue|TrashWorld", page, re.I)
