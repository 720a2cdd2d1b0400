"""The file thread: step files are written in order, one at a time, while the writer prepares
the next; a failure there surfaces in the training thread naming its step; buffers are
released only once their file is in place."""

from __future__ import annotations

import threading

import pytest
import torch

import chisel
from chisel.store import stfile
from chisel.store import writer as writer_module
from chisel.store.filequeue import FileQueue
from tests.chisel.helpers import mlp


def test_jobs_run_in_order_one_at_a_time_and_put_returns_before_the_write():
    q = FileQueue()
    gate = threading.Event()
    log: list[str] = []
    q.put(lambda: (gate.wait(5), log.append("write 0")), lambda: log.append("done 0"))
    assert log == []  # put returned while the write waits
    waiter = threading.Thread(target=q.put, args=(lambda: log.append("write 1"), lambda: log.append("done 1")))
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive() and log == []  # the second file waits for the first
    gate.set()
    waiter.join(5)
    q.wait()
    assert log == ["write 0", "done 0", "write 1", "done 1"]
    q.close()


def test_a_failed_job_is_released_and_its_error_raised_by_the_next_put():
    q = FileQueue()
    released: list[int] = []

    def fail() -> None:
        raise OSError(28, "No space left on device")

    q.put(fail, lambda: released.append(0), step=7)
    q.wait()
    assert released == [0] and isinstance(q.error, OSError) and q.error_step == 7
    with pytest.raises(OSError, match="No space"):
        q.put(lambda: released.append(99), lambda: released.append(1))
    assert released == [0]  # a refused job is neither run nor released: the caller releases it
    q.close()


def _train(rec, model, optimizer, steps: int) -> None:
    for _ in range(steps):
        model(torch.randn(4, 6)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.fixture(params=["file thread", "writer thread"])
def where(request, monkeypatch) -> str:
    """Step files written by the file thread (every size queued) or by the writer itself."""
    monkeypatch.setattr(writer_module, "QUEUED_FILE_BYTES", 0 if request.param == "file thread" else 1 << 40)
    return request.param


def test_a_failed_write_is_a_writer_error_naming_its_step(tmp_path, monkeypatch, where):
    real = stfile.DirectFiles.write

    def write(self, path, parts, block=None):
        if path.parent.name == "steps" and path.name.endswith("000000003.safetensors"):
            raise OSError(28, "No space left on device")
        return real(self, path, parts, block)

    monkeypatch.setattr(stfile.DirectFiles, "write", write)
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = chisel.record(model, optimizer, tmp_path / "run")
    with pytest.raises(chisel.WriterError, match="while writing step 3.*No space"):
        _train(rec, model, optimizer, 40)
        rec.flush()
    with pytest.raises(chisel.WriterError):
        rec.close()
    assert rec.durable_steps == 3
    steps = sorted(p.name for p in (tmp_path / "run" / "steps").iterdir() if not p.name.startswith("."))
    assert steps == [f"{t:09d}.safetensors" for t in range(3)]
    pool = rec._capture._pool
    # every buffer handed to the writer came back, the failed step's too (the one packet
    # refused by submit() once the failure was known is dropped with the failed recorder)
    assert pool._free.qsize() >= pool._made - 1


def test_flush_waits_for_the_file_in_flight(tmp_path, monkeypatch, where):
    real = stfile.DirectFiles.write
    gate = threading.Event()

    def slow(self, path, parts, block=None):
        if path.parent.name == "steps":  # θ_0's keyframe is written at once
            assert gate.wait(5)
        return real(self, path, parts, block)

    monkeypatch.setattr(stfile.DirectFiles, "write", slow)
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with chisel.record(model, optimizer, tmp_path / "run") as rec:
        _train(rec, model, optimizer, 3)
        assert rec.durable_steps == 0  # step 0's file is held at the gate
        threading.Timer(0.1, gate.set).start()
        assert rec.flush() == 3
        assert all((tmp_path / "run" / "steps" / f"{t:09d}.safetensors").is_file() for t in range(3))
    run = chisel.load(tmp_path / "run")
    assert len(run) == 3 and set(run.update(2)) == set(run.param_names)
