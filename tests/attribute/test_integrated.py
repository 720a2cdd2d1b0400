"""Integrated family: completeness in float64, exact feature splits, agreement with captum."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import chisel
import probes
from chisel.attribution import ledger as L
from tests.attribute.helpers import policy, record_policy_gradient

OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
}


def _features(width: int = 16, seed: int = 3) -> probes.FeatureSet:
    gen = torch.Generator().manual_seed(seed)
    return probes.FeatureSet(
        [probes.custom(f"h{i}", "3:out", torch.randn(width, generator=gen)) for i in range(3)]
        + [probes.custom("obs_dir", "0:in", torch.randn(6, generator=gen))]
    )


def _metric(seed: int = 5):
    gen = torch.Generator().manual_seed(seed)
    obs = torch.randn(40, 6, generator=gen)
    return chisel.metrics.logprob(obs, torch.randint(0, 3, (40,), generator=gen))


@pytest.mark.parametrize("act", [nn.Tanh, nn.GELU])
@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
def test_completeness_and_exact_feature_split(tmp_path, act, opt):
    model = policy(act)
    run = record_policy_gradient(tmp_path / "run", model, OPTIMIZERS[opt](model.parameters()))
    ledger = chisel.attribute(run, model, _features(), _metric(), families=("integrated",))
    integrated = ledger[ledger.family == L.INTEGRATED]
    per_step = integrated.pivot_table(index="step", columns="quantity", values="value", aggfunc="first")
    assert len(per_step) == len(run)
    assert (per_step[L.COMPLETENESS_REL] <= 1e-8).all(), per_step[L.COMPLETENESS_REL]
    for t in range(len(run)):
        rows = integrated[integrated.step == t]
        whole = rows[(rows.feature == L.WHOLE) & (rows.quantity == L.ATTRIBUTION)].set_index("param").value
        assert whole.sum() == pytest.approx(per_step.loc[t, L.DELTA_METRIC], rel=1e-8)
        for weight, bias in (("4.weight", "4.bias"), ("0.weight", "0.bias")):
            split = rows[(rows.param.isin([weight, bias])) & (rows.feature != L.WHOLE)]
            assert set(split.feature) >= {L.RESIDUAL, L.BIAS}
            layer = whole[weight] + whole[bias]
            assert abs(split.value.sum() - layer) <= 1e-10 * max(1.0, abs(layer))


def test_relu_needs_split_paths(tmp_path):
    model = policy(nn.ReLU, width=32)
    run = record_policy_gradient(tmp_path / "run", model, torch.optim.Adam(model.parameters(), lr=3e-2), steps=2)
    metric = _metric()

    def worst(split: str) -> float:
        ledger = chisel.attribute(run, model, None, metric, families=("integrated",), split=split)
        return ledger[ledger.quantity == L.COMPLETENESS_REL].value.max()

    fixed, adaptive = worst("none"), worst("auto")
    assert adaptive <= 1e-8
    assert fixed > 100 * adaptive  # fixed Gauss-Legendre stalls at the kinks


def test_agrees_with_captum_integrated_gradients(tmp_path):
    from captum.attr import IntegratedGradients
    from torch.func import functional_call

    model = policy(nn.Tanh)
    run = record_policy_gradient(tmp_path / "run", model, torch.optim.Adam(model.parameters(), lr=1e-2), steps=2)
    metric = _metric()
    ledger = chisel.attribute(run, model, None, metric, families=("integrated",), steps=[1], points=16)
    ours = ledger[(ledger.quantity == L.ATTRIBUTION) & (ledger.feature == L.WHOLE)].set_index("param").value
    names = run.param_names
    theta, delta = run.params(1), run.update(1)
    reference = policy(nn.Tanh)

    class Wrapped(nn.Module):  # metric(model) as a module, so functional_call can swap θ
        def __init__(self) -> None:
            super().__init__()
            self.reference = reference

        def forward(self) -> torch.Tensor:
            return metric(self.reference)

    wrapped = Wrapped()

    def forward(*stacked: torch.Tensor) -> torch.Tensor:  # [n_steps, *shape] per parameter
        def one(*params: torch.Tensor) -> torch.Tensor:
            return functional_call(wrapped, {f"reference.{n}": v for n, v in zip(names, params)}, ())

        return torch.func.vmap(one)(*stacked)

    baselines = tuple(theta[n].double().unsqueeze(0) for n in names)
    inputs = tuple((theta[n].double() + delta[n]).unsqueeze(0) for n in names)
    ig = IntegratedGradients(forward)
    attrs = ig.attribute(inputs, baselines=baselines, n_steps=16, method="gausslegendre")
    for n, a in zip(names, attrs):
        assert float(a.sum()) == pytest.approx(ours[n], rel=1e-6, abs=1e-12)


def test_two_layer_bilinear_known_answer(tmp_path):
    """m = 1ᵀ W2 W1 x0 is bilinear: IG has a closed form, ½ ΔW2 ΔW1 shared between the layers."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4, bias=False), nn.Linear(4, 2, bias=False)).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
    x = torch.randn(5, 3, dtype=torch.float64)
    with chisel.record(model, optimizer, tmp_path / "run", dtype="float64"):
        W1, W2 = model[0].weight.detach().clone(), model[1].weight.detach().clone()
        (model(x) ** 2).sum().backward()
        optimizer.step()
    # the update by hand: loss = Σ (W2 W1 x)², ∂/∂W2 = 2 Σ y hᵀ, ∂/∂W1 = 2 Σ W2ᵀ y xᵀ
    h, y = x @ W1.T, x @ W1.T @ W2.T
    dW2, dW1 = -0.3 * 2 * y.T @ h, -0.3 * 2 * W2.T @ y.T @ x
    run = chisel.load(tmp_path / "run")
    torch.testing.assert_close(run.update(0)["1.weight"], dW2, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(run.update(0)["0.weight"], dW1, rtol=1e-12, atol=1e-14)

    x0 = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    ones = torch.ones(2, dtype=torch.float64)

    def metric(m):
        return m(chisel.metrics.as_input(x0, m)).sum()

    basis = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))[0].T  # orthonormal features
    features = probes.FeatureSet([probes.custom(f"b{i}", "1:in", basis[i]) for i in range(4)])
    ledger = chisel.attribute(run, model, features, metric, families=("integrated",))
    rows = ledger[(ledger.quantity == L.ATTRIBUTION)]
    whole = rows[rows.feature == L.WHOLE].set_index("param").value
    cross = 0.5 * float(ones @ dW2 @ dW1 @ x0)
    assert whole["1.weight"] == pytest.approx(float(ones @ dW2 @ W1 @ x0) + cross, rel=1e-12)
    assert whole["0.weight"] == pytest.approx(float(ones @ W2 @ dW1 @ x0) + cross, rel=1e-12)
    # per feature: ⟨ΔW2 d_j d_jᵀ, 1 ⊗ (W1 + ½ΔW1) x0⟩ = (1ᵀ ΔW2 d_j)(d_j · (W1 + ½ΔW1) x0)
    mid = (W1 + 0.5 * dW1) @ x0
    shares = rows[(rows.param == "1.weight") & rows.feature.str.startswith("b")].set_index("feature").value
    for i in range(4):
        expected = float(ones @ dW2 @ basis[i]) * float(basis[i] @ mid)
        assert shares[f"b{i}"] == pytest.approx(expected, rel=1e-10, abs=1e-14)
    residual = rows[(rows.param == "1.weight") & (rows.feature == L.RESIDUAL)].value
    assert abs(float(residual.iloc[0])) < 1e-12  # the features span the whole site


def test_vmapped_and_looped_quadrature_agree(tmp_path):
    model = policy(nn.Tanh)
    run = record_policy_gradient(tmp_path / "run", model, torch.optim.Adam(model.parameters(), lr=1e-2), steps=2)
    metric = _metric()
    batched, looped = (
        chisel.attribute(run, model, _features(), metric, families=("integrated",), batch_points=flag)
        for flag in (True, False)
    )
    assert batched.value.to_numpy() == pytest.approx(looped.value.to_numpy(), rel=1e-10, abs=1e-15)
