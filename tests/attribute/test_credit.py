"""Credit: the exact split of recorded updates into weight decay, momentum, samples and residual."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import chisel
from chisel.attribution import credit as C
from chisel.attribution import optim_replay as R

D_IN, WIDTH, D_OUT, BATCH, STEPS = 5, 6, 3, 7, 8

OPTIMIZERS: dict[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer]] = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=0.05),
    "momentum": lambda p: torch.optim.SGD(
        p, lr=0.1, momentum=0.9, dampening=0.2, weight_decay=0.05
    ),
    "nesterov": lambda p: torch.optim.SGD(
        p, lr=0.1, momentum=0.8, nesterov=True, weight_decay=0.05
    ),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.05),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
    "adam_amsgrad_maximize": lambda p: torch.optim.Adam(p, lr=0.01, amsgrad=True, maximize=True),
    "adamw_foreach": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1, foreach=True),
}
CLIPPED = {"momentum", "adamw"}


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D_IN, WIDTH), nn.Tanh(), nn.Linear(WIDTH, D_OUT)).double()


def per_sample_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[n] losses that sum to the training loss (a mean): sample i's gradient includes the 1/n."""
    return (model(x) - y).pow(2).sum(-1) / x.shape[0]


def batches(seed: int = 1, steps: int = STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(BATCH, D_IN, generator=gen, dtype=torch.float64),
            torch.randn(BATCH, D_OUT, generator=gen, dtype=torch.float64),
        )
        for _ in range(steps)
    ]


def record(path: Path, make_opt, *, clip: float | None = None, **options) -> chisel.Run:
    model = mlp()
    opt = make_opt(list(model.parameters()))
    options.setdefault("keyframe_every", 3)
    with chisel.record(model, opt, path, factors=True, dtype="float64", **options) as rec:
        for k, (x, y) in enumerate(batches()):
            per_sample_loss(model, x, y).sum().backward()
            rec.tag(
                reward=(torch.arange(BATCH) % 2).double(),
                advantage=torch.linspace(-1, 1, BATCH),
                episode=k,
            )
            if clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            opt.zero_grad()
    return chisel.load(path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, chisel.Run]:
    root = tmp_path_factory.mktemp("credit")
    out = {
        name: record(root / name, make, clip=0.3 if name in CLIPPED else None)
        for name, make in OPTIMIZERS.items()
    }
    out["rmsprop"] = record(
        root / "rmsprop", lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.5)
    )
    return out


def flat(params: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.reshape(-1) for v in params.values()])


def total(parts: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    names = next(iter(parts.values())).keys()
    return {n: sum(p[n] for p in parts.values()) for n in names}


def random_like(params: dict[str, torch.Tensor], seed: int = 5) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(v.shape, generator=gen, dtype=torch.float64) for n, v in params.items()}


# -- the optimizer split ------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_parts_rebuild_the_update_and_the_residual_is_rounding(runs, name):
    run = runs[name]
    replay = R.OptimizerReplay(run)
    for t in range(len(run)):
        split = replay.split(t)
        assert split.modelled, split.note
        update = flat(split.update)
        rebuilt = flat(total(split.parts))
        assert torch.allclose(rebuilt, update, rtol=0, atol=1e-15 * float(update.abs().max()) * 10)
        assert float(flat(split.parts[R.RESIDUAL]).norm()) <= 1e-10 * float(update.norm())
        assert float(flat(split.parts[R.GRADIENT]).norm()) > 0


def test_momentum_and_weight_decay_parts_are_there(runs):
    later = R.OptimizerReplay(runs["adamw"]).split(5)
    assert float(flat(later.parts[R.MOMENTUM]).norm()) > float(flat(later.parts[R.GRADIENT]).norm())
    assert float(flat(later.parts[R.WEIGHT_DECAY]).norm()) > 0
    first = R.OptimizerReplay(runs["momentum"]).split(0)  # no buffer yet: nothing is carried
    assert float(flat(first.parts[R.MOMENTUM]).norm()) == 0.0


def test_unmodelled_optimizer_goes_to_the_residual_whole(runs):
    run = runs["rmsprop"]
    split = R.split_update(run, 4)
    assert not split.modelled and "RMSprop" in split.note
    for name, delta in run.update(4).items():
        assert torch.equal(split.parts[R.RESIDUAL][name], delta)
        assert float(split.parts[R.GRADIENT][name].abs().max()) == 0.0


def test_consecutive_steps_replay_once_and_jumps_agree(runs):
    run = runs["adam"]
    replay = R.OptimizerReplay(run, history=0)
    walked = [replay.split(t) for t in range(len(run))]
    assert replay.replayed == len(run)
    for t in (6, 2, 7):
        jumped = R.OptimizerReplay(run, history=0).split(t)
        for part in R.PARTS:
            assert torch.allclose(
                flat(jumped.parts[part]), flat(walked[t].parts[part]), rtol=1e-12, atol=1e-18
            )


# -- samples ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["sgd", "momentum", "nesterov", "adam", "adamw"])
def test_sample_terms_rebuild_the_gradient_part(runs, name):
    run = runs[name]
    session = C.CreditSession(run)
    for t in range(len(run)):
        split = session.split(t)
        grad = split.base.parts[R.GRADIENT]
        summed = {n: torch.zeros_like(v) for n, v in grad.items()}
        for b in split.blocks:
            if b.part == R.GRADIENT:
                summed[b.param] += b.terms(grad[b.param].shape).sum(0)
        scale = float(flat(grad).norm())
        assert float(flat(split.unresolved[C.GRADIENT_UNRESOLVED]).norm()) <= 1e-12 * scale
        assert torch.allclose(flat(summed), flat(grad), rtol=0, atol=1e-13 * scale)
        assert float(
            flat(total(split.leaves())).sub(flat(split.base.update)).norm()
        ) <= 1e-13 * float(flat(split.base.update).norm())
