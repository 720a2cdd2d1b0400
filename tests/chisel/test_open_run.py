"""The store's one entry to a run directory: create, resume, refuse, clean up."""

from __future__ import annotations

import pytest
import torch

import chisel
from chisel.store.run_dir import open_run


def _run(path, steps=3):
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with chisel.record(model, opt, path):
        for _ in range(steps):
            model(torch.ones(1, 2)).sum().backward()
            opt.step()
            opt.zero_grad()


def test_a_new_run_and_its_failed_start_leave_nothing(tmp_path):
    opened = open_run(tmp_path / "new")
    assert opened.fresh and opened.first_step == 0 and not opened.existed
    assert {p.name for p in (tmp_path / "new").iterdir()} == {"steps", "keyframes"}
    opened.abandon()
    assert not (tmp_path / "new").exists()


def test_resume_continues_the_numbering_and_asks_the_check(tmp_path):
    _run(tmp_path / "run")
    (tmp_path / "run" / "steps" / ".tmp-half").write_bytes(b"x")  # a killed writer's leftover
    seen = []
    opened = open_run(tmp_path / "run", resume=True, check_resume=seen.append)
    assert opened.first_step == 3 and not opened.fresh
    assert seen and seen[0]["optimizer"]["class"] == "SGD"
    assert not (tmp_path / "run" / "steps" / ".tmp-half").exists()
    opened.abandon()  # never touches a resumed run
    assert len(chisel.load(tmp_path / "run")) == 3


def test_it_refuses_what_is_not_its_to_delete(tmp_path):
    _run(tmp_path / "run")
    with pytest.raises(chisel.RunExistsError, match="already holds a run"):
        open_run(tmp_path / "run")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(chisel.RunExistsError, match="not a chisel run"):
        open_run(tmp_path / "other", overwrite=True)
    with pytest.raises(chisel.NotARunError, match="no chisel run to continue"):
        open_run(tmp_path / "empty", resume=True)
    assert open_run(tmp_path / "run", overwrite=True).fresh
