"""A new optimizer is one class: register a model and the replay splits its updates exactly."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch

import chisel
from chisel.attribution import optim_models as M
from chisel.attribution import optim_replay as R

from .test_credit import batches, flat, mlp, per_sample_loss


class SignDescent(torch.optim.Optimizer):
    """θ ← θ − lr·sign(g): not a torch optimizer chisel knows."""

    def __init__(self, params, lr: float = 0.01):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(torch.sign(p.grad), alpha=-group["lr"])


@dataclass(frozen=True)
class SignHyper:
    lr: float


class SignDescentModel:
    """The whole model of SignDescent: κ = −lr/|g| elementwise (0 where g = 0), no state."""

    classes = ("SignDescent",)
    algebra = ("lr",)
    state_keys: dict[str, str] = {}  # noqa: RUF012

    def hyper(self, cls: str, group: dict[str, Any]) -> SignHyper:
        return SignHyper(float(group["lr"]))

    def needs_theta(self, hyper: SignHyper) -> bool:
        return False

    def count_note(self, hyper, state, group) -> str:
        return ""

    def step(self, h: SignHyper, theta, g: torch.Tensor, state) -> M.StepParts:
        kappa = torch.where(g != 0, -h.lr / g.abs().clamp_min(1e-300), torch.zeros_like(g))
        zero = torch.zeros_like(g)
        parts = {M.WEIGHT_DECAY: zero, M.MOMENTUM: zero, M.GRADIENT: kappa * g}
        return M.StepParts(parts, kappa, 0.0, decay=0.0, inject=0.0)


def _record(path) -> chisel.Run:
    model = mlp()
    opt = SignDescent(model.parameters(), lr=0.01)
    with chisel.record(model, opt, path, dtype="float64", keyframe_every=3):
        for x, y in batches(steps=5):
            per_sample_loss(model, x, y).sum().backward()
            opt.step()
            opt.zero_grad()
    return chisel.load(path)


def test_an_unknown_optimizer_goes_to_the_residual_with_its_name(tmp_path):
    run = _record(tmp_path / "sign")
    split = R.split_update(run, 2)
    assert not split.modelled and "SignDescent is not modelled" in split.note
    assert torch.equal(flat(split.parts[R.RESIDUAL]), flat(run.update(2)))


def test_one_registered_class_models_a_new_optimizer(tmp_path, monkeypatch):
    run = _record(tmp_path / "sign")
    monkeypatch.setitem(M._MODELS, "SignDescent", SignDescentModel())
    replay = R.OptimizerReplay(run)
    for t in range(len(run)):
        split = replay.split(t)
        assert split.modelled, split.note
        update = flat(split.update)
        assert float(flat(split.parts[R.RESIDUAL]).norm()) <= 1e-12 * float(update.norm())
        assert torch.allclose(flat(split.parts[R.GRADIENT]), update, rtol=0, atol=1e-15)


def test_registry_models_the_torch_optimizers_it_names():
    for cls in ("SGD", "Adam", "AdamW"):
        model, note = M.model_for(cls)
        assert model is not None and note == ""
    model, note = M.model_for("RMSprop")
    assert model is None and "RMSprop is not modelled (Adam, AdamW, SGD are)" in note


@pytest.mark.parametrize("cls", ["Adam", "AdamW"])
def test_adam_hyper_reads_decoupling_from_the_class(cls):
    model, _ = M.model_for(cls)
    h = model.hyper(cls, {"lr": 0.1, "betas": (0.8, 0.9), "eps": 1e-6, "weight_decay": 0.01})
    assert h.decoupled == (cls == "AdamW") and (h.beta1, h.beta2, h.eps) == (0.8, 0.9, 1e-6)
