"""The step record is one typed object from capture to attribution, and its JSON form round-trips."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import chisel
from chisel.capture.step_record import StepRecord
from chisel.store.layout import read_meta
from tests.chisel.helpers import mlp


def _recorded(tmp_path, *, factors=False):
    model = mlp(seed=3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)
    with chisel.record(model, opt, tmp_path / "run", factors=factors) as rec:
        for _ in range(3):
            x = torch.randn(5, 6, generator=gen)
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            rec.tag(reward=torch.arange(5.0), phase=2)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            opt.step()
    return chisel.load(tmp_path / "run")


def test_the_reader_returns_a_frozen_typed_record_of_what_the_loop_did(tmp_path):
    run = _recorded(tmp_path, factors=True)
    rec = run.record(1)
    assert isinstance(rec, StepRecord) and list(run)[1].record == rec
    assert rec.step == 1 and rec.skipped is False and rec.skip_reason is None
    assert rec.lr == pytest.approx(1e-2) and rec.groups[0]["weight_decay"] == pytest.approx(0.1)
    assert rec.batch_sizes == (5,) and rec.grad_missing == ()
    assert rec.tags == {"reward": {"len": 5}, "phase": 2}
    assert set(rec.update_norms) == set(run.param_names)
    total = sum(v**2 for v in rec.update_norms.values()) ** 0.5
    assert rec.update_norm == pytest.approx(total, rel=1e-12)
    assert rec.has_factors and set(rec.factor_calls) == {"0", "2"}
    assert rec.grad_coef is not None and rec.clip_coef is not None
    with pytest.raises(dataclasses.FrozenInstanceError):
        rec.lr = 1.0  # type: ignore[misc]


def test_the_stored_json_round_trips_and_only_sets_what_was_set(tmp_path):
    run = _recorded(tmp_path)
    stored = read_meta(run.layout.step_file(0), 0, "step")
    rec = StepRecord.from_json(stored)
    assert rec.to_json() == stored
    assert json.loads(json.dumps(rec.to_json())) == stored
    # no factors recorded: their fields are absent from the file, not written as empty
    assert not any(k.startswith("factor_") for k in stored) and "skip_reason" not in stored
    assert StepRecord.from_json(rec.to_json()) == rec


def test_a_field_written_by_a_newer_chisel_is_kept_not_dropped():
    data = {"step": 4, "time": 1.0, "skipped": False, "lr": 0.1, "groups": [{"lr": 0.1}],
            "grad_norm": 2.0, "grad_missing": [], "batch_sizes": [8], "tags": {},
            "update_norm": 1.0, "update_norms": {"w": 1.0}, "shard_of_rank": 3}
    rec = StepRecord.from_json(data)
    assert rec.extra == {"shard_of_rank": 3}
    assert rec.to_json() == data


def test_an_old_record_without_the_newer_fields_loads_with_their_defaults():
    rec = StepRecord.from_json({"step": 0, "skipped": True, "skip_reason": "inf", "update_norm": None})
    assert rec.skipped and rec.skip_reason == "inf" and rec.groups == () and rec.tags == {}
    assert rec.update_norm is None and rec.update_norms == {} and not rec.has_factors


def test_a_record_of_the_wrong_shape_is_a_corrupt_step_not_a_type_error(tmp_path):
    from chisel.store.manifest import record_problems

    good = {"step": 2, "groups": [{"lr": 0.1}], "grad_missing": [], "tags": {}}
    assert record_problems(good, 2) == []
    for key, bad in (("groups", [1, 2]), ("groups", "lr"), ("grad_missing", [3]), ("skip_reason", 7),
                     ("factor_layout", []), ("loss_scale", "big")):
        problems = record_problems({**good, key: bad}, 2)
        assert problems and problems[0].startswith(key), (key, problems)
