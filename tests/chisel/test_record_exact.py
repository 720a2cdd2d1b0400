"""Exactness: θ_0, the final θ and every update are recorded bit for bit, for every optimizer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import chisel
from tests.chisel.helpers import mlp, snapshot

OPTIMIZERS = {
    "sgd": lambda p, **kw: torch.optim.SGD(p, lr=0.05, **kw),
    "sgd_momentum": lambda p, **kw: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3, **kw),
    "sgd_nesterov": lambda p, **kw: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, **kw),
    "adam": lambda p, **kw: torch.optim.Adam(p, lr=1e-2, **kw),
    "adamw": lambda p, **kw: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, **kw),
    "rmsprop": lambda p, **kw: torch.optim.RMSprop(p, lr=1e-2, momentum=0.5, **kw),
}
VARIANTS = [
    (name, impl)
    for name in OPTIMIZERS
    for impl in ("single", "foreach", "fused")
    if not (impl == "fused" and name == "rmsprop")
]


def _impl_kwargs(impl: str) -> dict:
    return {"single": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}[impl]


def _train(
    model, optimizer, steps, *, rec=None, clip=None, scheduler=None, accumulate=1, seed=1, norms=None
):
    """A short regression loop; returns the Δθ observed around each step() in float64."""
    gen = torch.Generator().manual_seed(seed)
    observed = []
    dtype = next(model.parameters()).dtype
    for _ in range(steps):
        for _ in range(accumulate):
            x = torch.randn(8, 6, generator=gen, dtype=dtype)
            loss = (model(x) - 1.0).pow(2).mean() / accumulate
            loss.backward()
        if rec is not None:
            rec.tag(weight=torch.arange(8 * accumulate, dtype=torch.float32))
        if clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            if norms is not None:
                norms.append(float(norm))
        before = snapshot(model)
        optimizer.step()
        observed.append({n: p.detach().double() - before[n].double() for n, p in model.named_parameters()})
        optimizer.zero_grad()
        if scheduler is not None:
            scheduler.step()
    return observed


def _assert_exact(run, initial, final, observed):
    assert len(run) == len(observed)
    p0 = run.params(0)
    assert all(torch.equal(p0[n], initial[n]) for n in initial)
    p_end = run.params(len(run))
    assert all(torch.equal(p_end[n], final[n]) for n in final)
    for t, obs in enumerate(observed):
        update = run.update(t)
        for n in obs:
            assert update[n].dtype == torch.float64
            assert torch.equal(update[n], obs[n]), f"step {t} param {n}"


@pytest.mark.parametrize(("name", "impl"), VARIANTS)
def test_every_optimizer_is_recorded_exactly(tmp_path, name, impl):
    model = mlp()
    optimizer = OPTIMIZERS[name](model.parameters(), **_impl_kwargs(impl))
    initial = snapshot(model)
    with chisel.record(model, optimizer, tmp_path / "run", keyframe_every=3) as rec:
        observed = _train(model, optimizer, 7, rec=rec)
    _assert_exact(chisel.load(tmp_path / "run"), initial, snapshot(model), observed)


def test_clipping_schedulers_and_accumulation(tmp_path):
    model = mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    initial = snapshot(model)
    with chisel.record(model, optimizer, tmp_path / "run", factors=True) as rec:
        norms = []
        observed = _train(
            model, optimizer, 6, rec=rec, clip=0.05, scheduler=scheduler, accumulate=3, norms=norms
        )
    run = chisel.load(tmp_path / "run")
    _assert_exact(run, initial, snapshot(model), observed)
    assert run.steps["lr"].tolist() == [1e-2, 1e-2, 5e-3, 5e-3, 2.5e-3, 2.5e-3]
    # clipping was active (tiny max-norm) and is measured from the factors
    clip = run.steps["clip_coef"]
    assert (clip < 1).all() and (clip > 0).all()
    for t in range(len(run)):
        assert run.record(t).grad_norm == pytest.approx(0.05, rel=1e-4)  # the clipped grad
        assert clip[t] == pytest.approx(0.05 / (norms[t] + 1e-6), rel=1e-6)
        assert len(run.tags(t)["weight"]) == 24  # three micro-batches of 8, concatenated
        x, _g = run.factors(t)["0"]
        assert x.shape[0] == 24


def test_frozen_params_and_params_without_grad(tmp_path):
    torch.manual_seed(0)
    model = nn.ModuleDict({"a": nn.Linear(4, 4), "b": nn.Linear(4, 4), "unused": nn.Linear(4, 4)})
    model["b"].weight.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=0.1, weight_decay=0.5)  # decay moves grad-less params
    initial = snapshot(model)
    observed = []
    with chisel.record(model, optimizer, tmp_path / "run"):
        for _ in range(3):
            x = torch.randn(5, 4)
            model["b"](model["a"](x)).sum().backward()
            before = snapshot(model)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            observed.append({n: p.detach().double() - before[n].double() for n, p in model.named_parameters()})
        assert "unused.weight" in repr(chisel.load(tmp_path / "run").manifest["params"])
    run = chisel.load(tmp_path / "run")
    assert run.manifest["frozen"] == ["b.weight"]
    assert "b.weight" not in run.param_names
    assert run.record(0).grad_missing == ("unused.weight", "unused.bias")
    for t in range(3):
        update = run.update(t)
        for n in run.param_names:
            assert torch.equal(update[n], observed[t][n])
    assert torch.equal(run.params(0)["unused.weight"], initial["unused.weight"])
    # AdamW never steps a param whose grad is None, so it stayed put
    assert torch.equal(run.params(3)["unused.weight"], initial["unused.weight"])


def test_step_that_reenters_itself_counts_once(tmp_path):
    class Wrapped(torch.optim.SGD):
        def step(self, closure=None):
            return super().step(closure)

    model = mlp()
    optimizer = Wrapped(model.parameters(), lr=0.1)
    with chisel.record(model, optimizer, tmp_path / "run") as rec:
        observed = _train(model, optimizer, 4, rec=rec)
    run = chisel.load(tmp_path / "run")
    assert len(run) == 4
    assert all(torch.equal(run.update(t)["0.weight"], observed[t]["0.weight"]) for t in range(4))


def test_change_outside_step_is_not_counted_as_an_update(tmp_path):
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with chisel.record(model, optimizer, tmp_path / "run") as rec:
        observed = _train(model, optimizer, 2, rec=rec)
        with torch.no_grad():
            model[0].weight.mul_(0.5)  # e.g. a checkpoint reload or a manual edit
        edited = snapshot(model)
        observed += _train(model, optimizer, 2, rec=rec)
    run = chisel.load(tmp_path / "run")
    for t in range(4):
        assert torch.equal(run.update(t)["0.weight"], observed[t]["0.weight"])
    assert torch.equal(run.params(2)["0.weight"], edited["0.weight"])
    assert 2 in run.keyframes


@pytest.mark.parametrize("storage", ["bfloat16", "float16"])
def test_compact_storage_error_does_not_accumulate(tmp_path, storage):
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    with chisel.record(model, optimizer, tmp_path / "run", dtype=storage, keyframe_every=50) as rec:
        truth = [snapshot(model)]
        for _ in range(40):
            _train(model, optimizer, 1, rec=rec)
            truth.append(snapshot(model))
    run = chisel.load(tmp_path / "run")
    assert {p["encoding"] for p in run.manifest["params"]} == {"delta"}
    eps = {"bfloat16": 2**-8, "float16": 2**-11}[storage]  # relative rounding of one delta
    step_size = {
        n: max((truth[t + 1][n].double() - truth[t][n].double()).abs().max() for t in range(40))
        for n in truth[0]
    }
    for t in (1, 10, 39):
        params, update = run.params(t), run.update(t)
        for n, value in params.items():
            # θ̂_t is off by at most one rounding of the last stored delta, whatever t: the
            # error is fed back into the next delta, never summed up
            err = (value.double() - truth[t][n].double()).abs().max()
            assert err <= eps * step_size[n], (t, n, err)
            true_step = truth[t + 1][n].double() - truth[t][n].double()
            assert (update[n] - true_step).abs().max() <= 2 * eps * step_size[n]
    assert all(torch.equal(run.params(40)[n], truth[40][n]) for n in truth[40])  # exact end keyframe


def test_float64_model_with_float32_storage_uses_deltas(tmp_path):
    model = mlp(dtype=torch.float64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with chisel.record(model, optimizer, tmp_path / "run") as rec:
        observed = _train(model, optimizer, 3, rec=rec)
    run = chisel.load(tmp_path / "run")
    assert run.manifest["params"][0]["encoding"] == "delta"
    for t in range(3):
        for n, v in run.update(t).items():
            scale = max(observed[s][n].abs().max() for s in range(t + 1))
            assert (v - observed[t][n]).abs().max() <= 2**-23 * scale
    with chisel.record(model, optimizer, tmp_path / "exact", dtype="float64") as rec:
        observed = _train(model, optimizer, 3, rec=rec)
    run = chisel.load(tmp_path / "exact")
    assert all(torch.equal(run.update(t)[n], observed[t][n]) for t in range(3) for n in observed[t])


def test_recording_does_not_change_training(tmp_path):
    def train(record: bool) -> dict[str, torch.Tensor]:
        model = mlp(seed=3)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        if not record:
            _train(model, optimizer, 12, clip=1.0, accumulate=2)
            return snapshot(model)
        with chisel.record(model, optimizer, tmp_path / "run", factors=True) as rec:
            _train(model, optimizer, 12, rec=rec, clip=1.0, accumulate=2)
        return snapshot(model)

    plain, recorded = train(False), train(True)
    assert all(torch.equal(plain[n], recorded[n]) for n in plain)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stored_gradients_are_the_consumed_ones(tmp_path, dtype):
    model = mlp(dtype=dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    consumed = []
    with chisel.record(model, optimizer, tmp_path / "run", dtype="float64") as rec:
        for _ in range(3):
            model(torch.randn(4, 6, dtype=dtype)).pow(2).sum().backward()
            rec.tag(w=torch.ones(4))
            consumed.append({n: p.grad.clone() for n, p in model.named_parameters()})
            optimizer.step()
            optimizer.zero_grad()
    run = chisel.load(tmp_path / "run")
    for t in range(3):
        grads = run.grads(t)
        assert all(torch.equal(grads[n].to(dtype), consumed[t][n]) for n in consumed[t])
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in consumed[t].values()))
        assert run.record(t).grad_norm == pytest.approx(float(norm), rel=1e-12)


def test_mixed_dtypes_store_exact_and_lossy_params_side_by_side(tmp_path):
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3).double())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    observed = []
    with chisel.record(model, optimizer, tmp_path / "run") as rec:
        for _ in range(3):
            h = model[1](model[0](torch.randn(4, 6)))
            model[2](h.double()).pow(2).sum().backward()
            rec.tag(w=torch.ones(4))
            before = snapshot(model)
            optimizer.step()
            optimizer.zero_grad()
            observed.append({n: p.detach().double() - before[n].double() for n, p in model.named_parameters()})
    run = chisel.load(tmp_path / "run")
    encodings = {p["name"]: p["encoding"] for p in run.manifest["params"]}
    assert encodings == {"0.weight": "after", "0.bias": "after", "2.weight": "delta", "2.bias": "delta"}
    for t in range(3):
        update = run.update(t)
        assert torch.equal(update["0.weight"], observed[t]["0.weight"])  # exact
        scale = max(observed[s]["2.weight"].abs().max() for s in range(t + 1))
        assert (update["2.weight"] - observed[t]["2.weight"]).abs().max() <= 2**-23 * scale
    assert all(torch.equal(run.params(3)[n], p.detach()) for n, p in model.named_parameters())
