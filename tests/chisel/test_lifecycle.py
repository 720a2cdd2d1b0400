"""A Recorder's life: durability (`flush`, `durable_steps`) and a Recorder dropped unclosed."""

from __future__ import annotations

import gc
import threading

import pytest
import torch

import chisel
from tests.chisel.helpers import mlp, module_hook_count, optimizer_hook_count


def _steps(model, optimizer, n):
    for _ in range(n):
        model(torch.randn(4, 6)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()


def test_flush_makes_every_acknowledged_step_durable(tmp_path):
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    with chisel.record(model, optimizer, tmp_path / "run", queue_size=8) as rec:
        assert rec.durable_steps == 0
        _steps(model, optimizer, 6)
        assert rec.durable_steps <= 6
        assert rec.flush() == 6 == rec.durable_steps
        assert len(chisel.load(tmp_path / "run")) == 6  # on disk, before close()
        _steps(model, optimizer, 2)
    assert rec.durable_steps == 8


def test_durable_steps_count_from_the_resume_point(tmp_path):
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with chisel.record(model, optimizer, tmp_path / "run"):
        _steps(model, optimizer, 3)
    with chisel.record(model, optimizer, tmp_path / "run", resume=True) as rec:
        assert rec.durable_steps == 3
        _steps(model, optimizer, 2)
        assert rec.flush() == 5


def test_a_recorder_dropped_without_close_removes_its_hooks_and_stops_its_writer(tmp_path):
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    rec = chisel.record(model, optimizer, tmp_path / "run", factors=True)
    _steps(model, optimizer, 2)
    rec.flush()
    writer = rec._writer._thread
    assert module_hook_count(model) > 0 and writer.is_alive()
    with pytest.warns(ResourceWarning, match="dropped without close"):
        del rec
        gc.collect()
    assert module_hook_count(model) == 0 and optimizer_hook_count(optimizer) == 0
    assert not writer.is_alive() and writer not in threading.enumerate()
    assert len(chisel.load(tmp_path / "run")) == 2
    _steps(model, optimizer, 1)  # training goes on, unrecorded


def test_a_closed_recorder_has_no_finalizer_left(tmp_path):
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with chisel.record(model, optimizer, tmp_path / "run") as rec:
        _steps(model, optimizer, 1)
    assert not rec._finalizer.alive


def test_a_start_failing_at_the_manifest_leaves_nothing_and_no_hook(tmp_path, monkeypatch):
    import errno

    from chisel import recorder as recorder_module

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    with chisel.record(model, optimizer, tmp_path / "kept"):
        _steps(model, optimizer, 2)
    monkeypatch.setattr(recorder_module, "write_json", full)
    with pytest.raises(chisel.WriterError, match="No space left.*Nothing was left behind"):
        chisel.record(model, optimizer, tmp_path / "new", factors=True)
    assert not (tmp_path / "new").exists()
    with pytest.raises(chisel.WriterError, match="recorded steps are intact"):
        chisel.record(model, optimizer, tmp_path / "kept", resume=True)
    assert module_hook_count(model) == 0 and optimizer_hook_count(optimizer) == 0
    monkeypatch.undo()
    assert len(chisel.load(tmp_path / "kept")) == 2
    with chisel.record(model, optimizer, tmp_path / "new"):  # the retry works
        _steps(model, optimizer, 1)
    assert len(chisel.load(tmp_path / "new")) == 1
