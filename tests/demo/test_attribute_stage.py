"""The demo's attribution stage never leaves a half-written ledger under the finished name."""

from __future__ import annotations

from types import SimpleNamespace

import pandas as pd
import pytest

from chisel.attribution import ledger as L
from chisel.demo import attribute as A
from chisel.demo.config import DemoConfig
from chisel.report.artifacts import LEDGER_FILE


def _fake_attribute(run, agent, features, metric, *, steps, families, **options):
    rows = [L.row(t, L.INTEGRATED, "", "", L.WHOLE, L.TOTAL, 1.0) for t in steps]
    return L.to_frame(pd.DataFrame(rows), [])


def test_a_failed_ledger_write_leaves_no_ledger(tmp_path, monkeypatch):
    monkeypatch.setattr(A.chisel, "attribute", _fake_attribute)

    def broken_write(self, frame):
        raise OSError("disk full")

    monkeypatch.setattr(L.LedgerWriter, "write", broken_write)
    run = SimpleNamespace(path=tmp_path)
    plan = A.attribution_plan(8, DemoConfig.make(quick=True, factors_every=4, attribute_every=2))
    with pytest.raises(OSError, match="disk full"):
        A.attribute_run(run, None, None, None, plan, DemoConfig.make(quick=True))
    assert list(tmp_path.iterdir()) == []  # neither the ledger nor its temporary file


def test_a_written_ledger_takes_its_name(tmp_path, monkeypatch):
    monkeypatch.setattr(A.chisel, "attribute", _fake_attribute)
    run = SimpleNamespace(path=tmp_path)
    plan = A.attribution_plan(8, DemoConfig.make(quick=True, factors_every=4, attribute_every=2))
    ledger = A.attribute_run(run, None, None, None, plan, DemoConfig.make(quick=True))
    assert sorted(ledger[L.STEP]) == [0, 2, 4, 6]
    assert [p.name for p in tmp_path.iterdir()] == [LEDGER_FILE]
    assert L.load_ledger(tmp_path / LEDGER_FILE)[L.STEP].tolist() == [0, 2, 4, 6]
