"""Faults and bad input: clear errors, and no recorded step is ever lost."""

from __future__ import annotations

import errno

import pytest
import torch
from torch import nn

import chisel
from chisel.store import writer as writer_module
from tests.chisel.helpers import mlp, module_hook_count, optimizer_hook_count, snapshot


def _loop(model, optimizer, rec, steps, observed=None):
    for _ in range(steps):
        model(torch.randn(4, 6)).pow(2).mean().backward()
        before = snapshot(model)
        optimizer.step()
        optimizer.zero_grad()
        if observed is not None:
            observed.append({n: p.detach().double() - before[n].double() for n, p in model.named_parameters()})


def test_writer_error_is_raised_in_training_thread_and_earlier_steps_survive(tmp_path, monkeypatch):
    real_write = writer_module.write_tensors

    def failing_write(path, tensors, meta, **kw):
        if path.parent.name == "steps" and int(path.stem) >= 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(path, tensors, meta, **kw)

    monkeypatch.setattr(writer_module, "write_tensors", failing_write)
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    observed = []
    with pytest.raises(chisel.WriterError, match=r"writing step 3.*No space left.*resume=True"):
        with chisel.record(model, optimizer, tmp_path / "run", factors=True) as rec:
            _loop(model, optimizer, rec, 10, observed)
    assert module_hook_count(model) == 0 and optimizer_hook_count(optimizer) == 0
    run = chisel.load(tmp_path / "run")
    assert len(run) == 3
    for t in range(3):
        assert all(torch.equal(run.update(t)[n], observed[t][n]) for n in run.param_names)


def test_writer_error_surfaces_at_close(tmp_path, monkeypatch):
    real_write = writer_module.write_tensors

    def failing_write(path, tensors, meta, **kw):
        if path.parent.name == "keyframes" and meta.get("reason") == "end":
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_write(path, tensors, meta, **kw)

    monkeypatch.setattr(writer_module, "write_tensors", failing_write)
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = chisel.record(model, optimizer, tmp_path / "run")
    _loop(model, optimizer, rec, 2)
    with pytest.raises(chisel.WriterError, match="Permission denied"):
        rec.close()
    assert len(chisel.load(tmp_path / "run")) == 2


def test_existing_run_dir_needs_overwrite_or_resume(tmp_path):
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with chisel.record(model, optimizer, tmp_path / "run") as rec:
        _loop(model, optimizer, rec, 2)
    with pytest.raises(chisel.RunExistsError, match="already holds a run.*overwrite=True.*resume=True"):
        chisel.record(model, optimizer, tmp_path / "run")
    assert len(chisel.load(tmp_path / "run")) == 2  # untouched
    assert optimizer_hook_count(optimizer) == 0
    with chisel.record(model, optimizer, tmp_path / "run", overwrite=True) as rec:
        _loop(model, optimizer, rec, 1)
    assert len(chisel.load(tmp_path / "run")) == 1
    other = tmp_path / "notes"
    other.mkdir()
    (other / "paper.txt").write_text("precious")
    with pytest.raises(chisel.RunExistsError, match="not a chisel run.*will not delete"):
        chisel.record(model, optimizer, other, overwrite=True)
    assert (other / "paper.txt").read_text() == "precious"


@pytest.mark.parametrize("damage", ["truncate", "garble"])
def test_damaged_step_file_names_file_and_step(tmp_path, damage):
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    observed = []
    with chisel.record(model, optimizer, tmp_path / "run", keyframe_every=0) as rec:
        _loop(model, optimizer, rec, 5, observed)
    path = tmp_path / "run" / "steps" / "000000002.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x13" * 16 + data[16:])
    run = chisel.load(tmp_path / "run")
    with pytest.raises(chisel.CorruptStepError, match=r"step 2.*000000002\.safetensors"):
        run.update(2)
    for t in (0, 1, 4):
        assert all(torch.equal(run.update(t)[n], observed[t][n]) for n in run.param_names)
    with pytest.warns(UserWarning, match="step 2"):
        steps = run.steps
    assert steps["error"].notna().tolist() == [False, False, True, False, False]


def test_bad_tags(tmp_path):
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with chisel.record(model, optimizer, tmp_path / "run") as rec:
        model(torch.randn(4, 6)).sum().backward()
        with pytest.raises(chisel.TagError, match=r"'advantage' has 3 values.*batch sizes \[4\]"):
            rec.tag(advantage=torch.ones(3))
        with pytest.raises(chisel.TagError, match="one value per sample"):
            rec.tag(mask=torch.ones(4, 2))
        with pytest.raises(chisel.TagError, match="not supported"):
            rec.tag(blob=object())
        rec.tag(advantage=torch.ones(4), episode=7, label=["a", "b", "c", "d"])
        optimizer.step()
        # a tag given before the forward pass is checked when the step comes
        rec.tag(reward=torch.ones(5))
        model(torch.randn(4, 6)).sum().backward()
        with pytest.raises(chisel.TagError, match="'reward' has 5 values"):
            optimizer.step()
    run = chisel.load(tmp_path / "run")
    assert len(run) == 1
    tags = run.tags(0)
    assert torch.equal(tags["advantage"], torch.ones(4)) and tags["episode"] == 7
    assert tags["label"] == ["a", "b", "c", "d"]
    assert run.steps["tag/episode"].tolist() == [7]


def test_optimizer_without_parameters(tmp_path):
    model = mlp()
    optimizer = torch.optim.SGD([{"params": []}], lr=0.1)
    with pytest.raises(chisel.RecordConfigError, match="no parameters"):
        chisel.record(model, optimizer, tmp_path / "run")
    assert module_hook_count(model) == 0


def test_bad_options_and_bad_paths(tmp_path):
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(chisel.RecordConfigError, match="dtype='int8'.*float32"):
        chisel.record(model, optimizer, tmp_path / "run", dtype="int8")
    with pytest.raises(chisel.NotARunError, match="manifest.json is missing"):
        chisel.load(tmp_path)
    with chisel.record(model, optimizer, tmp_path / "run") as rec:
        _loop(model, optimizer, rec, 2)
    run = chisel.load(tmp_path / "run")
    with pytest.raises(chisel.StepOutOfRangeError, match=r"step 2 is outside.*0\.\.1"):
        run.update(2)
    with pytest.raises(chisel.StepOutOfRangeError):
        run.params(3)
    assert len(run.params(2)) == 4  # the final θ


def test_no_hook_left_after_close_or_exception(tmp_path):
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    optimizer = torch.optim.Adam(model.parameters())
    scaler = torch.amp.GradScaler("cpu")
    assert module_hook_count(model) == 0
    with pytest.raises(RuntimeError, match="boom"):
        with chisel.record(model, optimizer, tmp_path / "a", factors=True, scaler=scaler) as rec:
            assert module_hook_count(model) > 0 and optimizer_hook_count(optimizer) == 2
            _loop(model, optimizer, rec, 2)
            raise RuntimeError("boom")
    assert module_hook_count(model) == 0 and optimizer_hook_count(optimizer) == 0
    assert "update" not in vars(scaler)
    assert len(chisel.load(tmp_path / "a")) == 2  # what was recorded before the error is kept
    rec = chisel.record(model, optimizer, tmp_path / "b", factors=True)
    _loop(model, optimizer, rec, 1)
    rec.close()
    rec.close()  # idempotent
    assert module_hook_count(model) == 0 and optimizer_hook_count(optimizer) == 0
    assert "closed" in repr(rec) and "factors of 2 modules" in repr(rec)


def test_resume_continues_step_numbering(tmp_path):
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    with chisel.record(model, optimizer, tmp_path / "run") as rec:
        _loop(model, optimizer, rec, 3)
    checkpoint = snapshot(model)
    _loop(model, optimizer, None, 2)  # unrecorded training, then a reload of the checkpoint
    model.load_state_dict(checkpoint)
    observed = []
    with chisel.record(model, optimizer, tmp_path / "run", resume=True) as rec:
        assert rec.step == 3
        _loop(model, optimizer, rec, 2, observed)
    run = chisel.load(tmp_path / "run")
    assert len(run) == 5 and run.steps["step"].tolist() == [0, 1, 2, 3, 4]
    assert all(torch.equal(run.update(3 + i)[n], observed[i][n]) for i in range(2) for n in run.param_names)
    assert [s["resumed"] for s in run.manifest["starts"]] == [False, True]
    other = nn.Sequential(nn.Linear(6, 5))
    with pytest.raises(chisel.ResumeMismatchError, match="differ"):
        chisel.record(other, torch.optim.SGD(other.parameters(), lr=0.1), tmp_path / "run", resume=True)
