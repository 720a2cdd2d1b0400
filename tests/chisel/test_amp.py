"""AMP: a step GradScaler skips is recorded as skipped (with its reason), never as a zero update."""

from __future__ import annotations

import pytest
import torch

import chisel
from tests.chisel.helpers import mlp, snapshot


@pytest.mark.parametrize("fused", [False, True])
def test_skipped_steps_are_recorded_as_skipped(tmp_path, fused):
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, fused=fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    observed, thetas = {}, [snapshot(model)]
    with chisel.record(model, optimizer, tmp_path / "run", scaler=scaler, factors=True) as rec:
        for i in range(5):
            x = torch.randn(8, 6)
            loss = model(x).pow(2).mean()
            scaler.scale(loss).backward()
            if i == 2:
                model[0].weight.grad[0, 0] = float("inf")  # an overflow
            rec.tag(reward=torch.ones(8))
            before = snapshot(model)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
            observed[i] = {n: p.detach().double() - before[n].double() for n, p in model.named_parameters()}
            thetas.append(snapshot(model))
    run = chisel.load(tmp_path / "run")
    assert len(run) == 5
    steps = run.steps
    assert steps["skipped"].tolist() == [False, False, True, False, False]
    assert "inf/NaN" in steps["skip_reason"][2]
    with pytest.raises(chisel.SkippedStepError, match="step 2 was skipped"):
        run.update(2)
    assert all(torch.equal(run.params(3)[n], run.params(2)[n]) for n in run.param_names)
    for t in (0, 1, 3, 4):
        assert all(torch.equal(run.update(t)[n], observed[t][n]) for n in run.param_names)
        assert run.steps["clip_coef"][t] == pytest.approx(1.0, rel=1e-6)  # loss scale divided out
    assert all(torch.equal(run.params(5)[n], thetas[5][n]) for n in run.param_names)
    assert run.record(2).loss_scale == 2.0**10
    assert run.steps["step"].tolist() == list(range(5))


def test_scaler_wrapper_is_removed_on_close(tmp_path):
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    with chisel.record(model, optimizer, tmp_path / "run", scaler=scaler):
        assert "update" in vars(scaler)
    assert "update" not in vars(scaler)
