"""Per-sample factors: Σ_i g_i x_iᵀ equals each weight's .grad (float64, 1e-10), per call."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import chisel

TOL = 1e-10


def _record_one_step(tmp_path, model, loss_fn, *, factors=True):
    """Record one SGD step; return (run, {param name: grad seen by the optimizer})."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with chisel.record(model, optimizer, tmp_path / "run", factors=factors, dtype="float64"):
        loss_fn(model).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        optimizer.step()
    return chisel.load(tmp_path / "run"), grads


def _linear_grad(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Σ over samples (and tokens) of g xᵀ: [out, in]."""
    return g.reshape(-1, g.shape[-1]).T @ x.reshape(-1, x.shape[-1])


def test_linear_factors_match_grad_and_a_per_sample_loop(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    x = torch.randn(11, 5, dtype=torch.float64)
    target = torch.randn(11, 3, dtype=torch.float64)

    def loss_fn(m):
        return (m(x) - target).pow(2).mean()

    run, grads = _record_one_step(tmp_path, model, loss_fn)
    factors = run.factors(0)
    assert set(factors) == {"0", "2"}
    for module in ("0", "2"):
        xs, gs = factors[module]
        assert xs.dtype == torch.float64 and xs.shape[0] == 11
        torch.testing.assert_close(_linear_grad(xs, gs), grads[f"{module}.weight"], rtol=0, atol=TOL)
    # brute force: the gradient of each sample's own share of the loss, one at a time
    reference = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    reference.load_state_dict({n: v for n, v in run.params(0).items()})
    xs, gs = factors["2"]
    for i in range(11):
        reference.zero_grad()
        ((reference(x[i : i + 1]) - target[i : i + 1]).pow(2).sum() / (11 * 3)).backward()
        per_sample = torch.outer(gs[i], xs[i])
        torch.testing.assert_close(per_sample, reference[2].weight.grad, rtol=0, atol=TOL)


def test_module_called_twice_pairs_each_call(tmp_path):
    torch.manual_seed(1)
    shared = nn.Linear(4, 4).double()
    model = nn.ModuleDict({"shared": shared})
    x = torch.randn(6, 4, dtype=torch.float64)

    def loss_fn(m):
        h = torch.tanh(m["shared"](x))
        return m["shared"](h * 2.0).pow(3).sum()

    run, grads = _record_one_step(tmp_path, model, loss_fn)
    assert run.record(0).factor_calls == {"shared": 2}
    xs, gs = run.factors(0)["shared"]
    assert xs.shape == (12, 4)
    torch.testing.assert_close(_linear_grad(xs, gs), grads["shared.weight"], rtol=0, atol=TOL)


def test_sequence_inputs_are_kept_per_token(tmp_path):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)).double()
    x = torch.randn(3, 5, 8, dtype=torch.float64)  # [batch, pos, d]

    def loss_fn(m):
        return m(x).sin().sum()

    run, grads = _record_one_step(tmp_path, model, loss_fn)
    xs, gs = run.factors(0)["0"]
    assert xs.shape == (3, 5, 8) and gs.shape == (3, 5, 16)
    torch.testing.assert_close(_linear_grad(xs, gs), grads["0.weight"], rtol=0, atol=TOL)


def test_conv2d_factors_through_unfold(tmp_path):
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(2, 4, kernel_size=3, stride=2, padding=1), nn.Tanh(), nn.Conv2d(4, 3, 2, dilation=2)
    ).double()
    x = torch.randn(5, 2, 9, 9, dtype=torch.float64)

    def loss_fn(m):
        return m(x).pow(2).mean()

    run, grads = _record_one_step(tmp_path, model, loss_fn)
    for module in ("0", "2"):
        xs, gs = run.factors(0)[module]
        assert xs.ndim == 3 and xs.shape[:2] == gs.shape[:2]  # [n, positions, C·kh·kw]
        weight_grad = grads[f"{module}.weight"]
        rebuilt = torch.einsum("nlo,nlc->oc", gs, xs).reshape(weight_grad.shape)
        torch.testing.assert_close(rebuilt, weight_grad, rtol=0, atol=TOL)


def test_forward_pass_never_backpropagated_is_dropped(tmp_path):
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(7, 3, dtype=torch.float64)

    def loss_fn(m):
        m(torch.randn(9, 3, dtype=torch.float64))  # e.g. a value estimate for logging only
        with torch.no_grad():
            m(torch.randn(13, 3, dtype=torch.float64))  # a rollout
        return m(x).pow(2).sum()

    run, grads = _record_one_step(tmp_path, model, loss_fn)
    xs, gs = run.factors(0)["0"]
    assert xs.shape[0] == 7
    torch.testing.assert_close(_linear_grad(xs, gs), grads["0.weight"], rtol=0, atol=TOL)


def test_hugging_face_conv1d(tmp_path):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(5)
    model = nn.Sequential(Conv1D(6, 4), nn.Tanh(), Conv1D(2, 6)).double()  # Conv1D(nf=out, nx=in)
    x = torch.randn(3, 5, 4, dtype=torch.float64)

    run, grads = _record_one_step(tmp_path, model, lambda m: m(x).pow(2).sum())
    xs, gs = run.factors(0)["0"]
    # Conv1D's weight is [in, out]: its gradient is Σ x gᵀ
    torch.testing.assert_close(_linear_grad(xs, gs).T, grads["0.weight"], rtol=0, atol=TOL)


def test_selected_modules_and_bad_names(tmp_path):
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with chisel.record(model, optimizer, tmp_path / "run", factors=["2"]):
        model(torch.randn(4, 3)).sum().backward()
        optimizer.step()
    assert set(chisel.load(tmp_path / "run").factors(0)) == {"2"}
    with pytest.raises(chisel.UnknownModuleError, match=r"no module 'fc9'.*\['0', '2'\]"):
        chisel.record(model, optimizer, tmp_path / "bad", factors=["fc9"])
    with pytest.raises(chisel.UnknownModuleError, match="'1' is a Tanh"):
        chisel.record(model, optimizer, tmp_path / "bad2", factors=["1"])


def test_compact_factor_dtype(tmp_path):
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with chisel.record(model, optimizer, tmp_path / "run", factors=True, factor_dtype="bfloat16"):
        model(torch.randn(32, 5)).pow(2).mean().backward()
        grad = model[0].weight.grad.clone()
        optimizer.step()
    xs, gs = chisel.load(tmp_path / "run").factors(0)["0"]
    assert xs.dtype == torch.bfloat16
    rebuilt = _linear_grad(xs.double(), gs.double())
    assert (rebuilt - grad.double()).norm() <= 2e-2 * grad.norm()  # ~3 significant digits


def test_shared_inputs_and_reused_buffers(tmp_path):
    """Actor and critic read one observation tensor (stored once); the user overwrites that
    buffer in place right after step(), before the writer may have written it."""
    torch.manual_seed(7)
    model = nn.ModuleDict({"actor": nn.Linear(3, 2), "critic": nn.Linear(3, 1)}).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    obs = torch.zeros(5, 3, dtype=torch.float64)
    expected = []
    with chisel.record(model, optimizer, tmp_path / "run", factors=True, dtype="float64"):
        for _ in range(4):
            obs.copy_(torch.randn(5, 3, dtype=torch.float64))  # a rollout buffer, reused
            expected.append(obs.clone())
            (model["actor"](obs).sum() + model["critic"](obs).pow(2).sum()).backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
            optimizer.step()
            optimizer.zero_grad()
            obs.fill_(float("nan"))
    run = chisel.load(tmp_path / "run")
    for t in range(4):
        factors = run.factors(t)
        for module in ("actor", "critic"):
            xs, _ = factors[module]
            assert torch.equal(xs, expected[t])
    xs, gs = run.factors(3)["critic"]
    torch.testing.assert_close(_linear_grad(xs, gs), grads["critic.weight"], rtol=0, atol=TOL)
    assert run.record(0).factor_calls == {"actor": 1, "critic": 1}


def test_factors_every_k_steps(tmp_path):
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with chisel.record(model, optimizer, tmp_path / "run", factors=True, factors_every=3, dtype="float64"):
        grads = []
        for _ in range(7):
            model(torch.randn(5, 3, dtype=torch.float64)).pow(2).sum().backward()
            grads.append(model[2].weight.grad.clone())
            optimizer.step()
            optimizer.zero_grad()
    run = chisel.load(tmp_path / "run")
    assert [bool(run.factors(t)) for t in range(7)] == [True, False, False, True, False, False, True]
    xs, gs = run.factors(6)["2"]
    torch.testing.assert_close(_linear_grad(xs, gs), grads[6], rtol=0, atol=TOL)
    assert len(run) == 7 and all(len(run.update(t)) == 4 for t in range(7))
