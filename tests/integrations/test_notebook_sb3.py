"""notebooks/02_sb3.ipynb executes end to end (SB3 PPO on CartPole attached in one line, probes,
attribution, validation, report) and writes a report with no TrashWorld vocabulary."""

from __future__ import annotations

import re

import pytest

from tests.notebooks import execute

pytest.importorskip("stable_baselines3")

pytestmark = pytest.mark.slow


def test_sb3_notebook_executes(tmp_path, monkeypatch):
    monkeypatch.setenv("CHISEL_NB_OUT", str(tmp_path / "runs"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    text = execute("02_sb3.ipynb", tmp_path)  # raises on the first failing cell
    assert "256 optimizer steps recorded" in text and "advantage_used" in text
    run_dir = tmp_path / "runs" / "ppo_cartpole"
    for name in ("manifest.json", "ledger.parquet", "validation.parquet", "report.html"):
        assert (run_dir / name).is_file(), name
    page = (run_dir / "report.html").read_text()
    for anchor in ("summary", "timeline", "validation", "circuits", "credit", "completeness"):
        assert f'<section id="{anchor}">' in page, anchor
    assert "Not shown: the validation by intervention" not in page
    assert not re.search(r"trash|wall_blue|button|TrashWorld", page, re.I)
