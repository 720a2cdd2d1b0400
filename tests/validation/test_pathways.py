"""Pathway removal against a reference computed by hand (numpy, float64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import chisel
import probes
from tests.validation.helpers import (
    direction,
    features_at_input,
    logprob_metric,
    record_run,
    states,
    tanh_net,
)

TOL = 1e-12  # float64: the reference and the engine differ only by rounding


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    run = record_run(tmp_path_factory.mktemp("v") / "run", tanh_net())
    obs = states()
    return run, obs, logprob_metric(obs)


def _np(t):
    return t.detach().double().numpy()


def _forward(theta, obs, actions):
    """The metric by hand: mean log-softmax of the chosen actions of tanh(x W1ᵀ + b1) W2ᵀ + b2."""
    h = np.tanh(obs @ theta["0.weight"].T + theta["0.bias"])
    z = h @ theta["2.weight"].T + theta["2.bias"]
    z = z - z.max(1, keepdims=True)
    lp = z - np.log(np.exp(z).sum(1, keepdims=True))
    return lp[np.arange(len(obs)), actions].mean()


def _dual(reads):
    d = np.stack([r / np.linalg.norm(r) for r in reads])  # [F, in]
    e = d.T @ np.linalg.pinv(d @ d.T)  # [in, F]
    return d, e


def _reference(run, obs, actions, feats, centred=True):
    """{pathway id: effect} for the first layer's pathways, computed by hand."""
    final = {n: _np(v) for n, v in run.params(len(run)).items()}
    start = {n: _np(v) for n, v in run.params(0).items()}
    dw, db = final["0.weight"] - start["0.weight"], final["0.bias"] - start["0.bias"]
    d, e = _dual([_np(f.read) for f in feats])
    xbar = _np(obs).mean(0) if centred else np.zeros(obs.shape[1])
    m_final = _forward(final, _np(obs), actions)

    def effect(dW, shift):
        theta = dict(final, **{"0.weight": final["0.weight"] - dW, "0.bias": final["0.bias"] + shift})
        return m_final - _forward(theta, _np(obs), actions)

    out = {}
    for j, f in enumerate(feats):
        part = np.outer(dw @ d[j], e[:, j])
        out[f"{f.name}→0.weight"] = effect(part, part @ xbar)
    rest = dw - dw @ (e @ d)
    out["<residual>→0.weight"] = effect(rest, rest @ xbar)
    if centred:
        out["<mean>→0.weight"] = effect(0 * dw, -dw @ xbar)
    out["<bias>→0.bias"] = effect(0 * dw, -db)
    return out


@pytest.mark.parametrize("centred", [True, False])
def test_effects_match_the_hand_computation(setup, centred):
    run, obs, metric = setup
    feats = features_at_input()
    table = chisel.pathway_effects(run, tanh_net(seed=7), feats, metric, centred=centred, groups=())
    expected = _reference(run, obs, metric_actions(metric, obs), list(feats), centred)
    got = table.set_index("pathway").effect
    assert set(got.index) == set(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=TOL), key
    assert (table.kind == "<mean>").any() == centred
    feature_rows = table[table.kind == "feature"]
    assert list(feature_rows.concept) == ["a", "b"] and list(feature_rows.site) == ["0:in"] * 2
    assert table.pathway.is_unique


def metric_actions(metric, obs):
    """The actions the helper metric scores (recomputed from its seed, as in helpers)."""
    gen = torch.Generator().manual_seed(4)
    return torch.randint(0, 3, (len(obs),), generator=gen).numpy()


def test_reverting_everything_gives_the_start_metric(setup):
    run, _obs, metric = setup
    feats = probes.FeatureSet([features_at_input(), direction([1, 0, 0, 0, 0, 1.0], "h", "1:out", "h")])
    model = tanh_net(seed=7)
    start = model_at(model, run.params(0))
    for centred in (True, False):
        table = chisel.pathway_effects(run, model, feats, metric, centred=centred)
        assert table.metric_all_reverted.iloc[0] == pytest.approx(float(metric(start).detach()), abs=TOL)
        final = model_at(model, run.params(len(run)))
        assert table.metric_final.iloc[0] == pytest.approx(float(metric(final).detach()), abs=TOL)


def test_a_window_reverts_only_its_own_change(setup):
    run, _obs, metric = setup
    feats = probes.FeatureSet([features_at_input(), direction([1, 0, 0, 0, 0, 1.0], "h", "1:out", "h")])
    model = tanh_net(seed=7)
    table = chisel.pathway_effects(run, model, feats, metric, steps=range(2, 4))
    final, a, b = run.params(len(run)), run.params(2), run.params(4)
    expected = model_at(model, {n: final[n] - (b[n] - a[n]) for n in final})
    assert table.metric_all_reverted.iloc[0] == pytest.approx(float(metric(expected).detach()), abs=TOL)
    assert table.attrs["window"] == (2, 4)
    with pytest.raises(chisel.ValidationError, match="contiguous window"):
        chisel.pathway_effects(run, model, feats, metric, steps=[0, 2])


def test_a_linear_without_bias_is_compensated_by_an_output_offset(tmp_path):
    model = tanh_net(bias=False)
    run = record_run(tmp_path / "run", model)
    obs = states()
    metric = logprob_metric(obs)
    feats = features_at_input()
    table = chisel.pathway_effects(run, tanh_net(seed=5, bias=False), feats, metric)
    final = {n: _np(v) for n, v in run.params(len(run)).items()}
    start = {n: _np(v) for n, v in run.params(0).items()}
    zero = {"0.bias": np.zeros(6), "2.bias": np.zeros(3)}
    d, e = _dual([_np(f.read) for f in feats])
    dw, xbar = final["0.weight"] - start["0.weight"], _np(obs).mean(0)
    part = np.outer(dw @ d[0], e[:, 0])
    theta = {**final, **zero, "0.weight": final["0.weight"] - part, "0.bias": part @ xbar}
    actions = metric_actions(metric, obs)
    expected = _forward({**final, **zero}, _np(obs), actions) - _forward(theta, _np(obs), actions)
    assert table.set_index("pathway").effect["a@in→0.weight"] == pytest.approx(expected, abs=TOL)
    # all reverted (features + residual + mean): W_start and no net offset; the second layer
    # has no features at its input, so no pathways, and keeps its final weight
    want = _forward({**final, **zero, "0.weight": start["0.weight"]}, _np(obs), actions)
    assert table.metric_all_reverted.iloc[0] == pytest.approx(want, abs=TOL)
    assert "<bias>" not in set(table.kind)


def test_groups_revert_their_members_together(setup):
    run, obs, metric = setup
    feats = probes.FeatureSet([
        features_at_input(),
        direction([1, 0, 0, 0, 0, 1.0], "a@h", "1:out", "a"),
        direction([0, 1, 1, 0, 0, 0.0], "c@h", "1:out", "c"),
    ])
    model = tanh_net(seed=7)
    table = chisel.pathway_effects(run, model, feats, metric).set_index("pathway")
    assert {"concept=a", "site=0:in", "site=1:out"} <= set(table.index)
    assert "concept=b" not in table.index  # one pathway only: no group
    assert table.loc["concept=a", "members"] == 2 and table.loc["concept=a", "kind"] == "group"
    custom = chisel.pathway_effects(run, model, feats, metric, groups={"both a": ["a@in", "a@h"]})
    assert custom.set_index("pathway").effect["both a"] == pytest.approx(table.effect["concept=a"], abs=TOL)
    # the group by hand: revert both a-pathways from the final weights
    final = {n: v.clone() for n, v in run.params(len(run)).items()}
    start = run.params(0)
    # the second layer's x̄ is taken at the final weights, before any reversion
    hidden = torch.tanh(obs @ final["0.weight"].T + final["0.bias"])
    for param, f, xin in (("0.weight", feats["a@in"], obs), ("2.weight", feats["a@h"], hidden)):
        reads = [g.read.double() for g in feats if g.site == f.site]
        dd = torch.stack([r / r.norm() for r in reads])
        dual = dd.T @ torch.linalg.pinv(dd @ dd.T)
        j = [g.name for g in feats if g.site == f.site].index(f.name)
        dw = final[param] - start[param]
        part = torch.outer(dw @ dd[j], dual[:, j])
        bias = param.replace("weight", "bias")
        final[param] = final[param] - part
        final[bias] = final[bias] + part @ xin.mean(0)
    want = table.metric_final.iloc[0] - float(metric(model_at(model, final)).detach())
    assert table.effect["concept=a"] == pytest.approx(want, abs=TOL)


def test_the_users_model_is_untouched(setup):
    run, _obs, metric = setup
    model = tanh_net(seed=7).float().train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    chisel.pathway_effects(run, model, features_at_input(), metric)
    chisel.pathway_shapley(run, model, features_at_input(), metric, permutations=2)
    assert model.training and all(p.dtype == torch.float32 for p in model.parameters())
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def model_at(model, theta):
    """A fresh float64 net of the same shape holding θ."""
    out = tanh_net(seed=11)
    with torch.no_grad():
        for n, p in out.named_parameters():
            p.copy_(theta[n].double())
    return out.eval()


def test_the_mean_input_can_come_from_other_data(setup):
    """x̄ over `data` instead of the metric's states: only the compensation changes."""
    run, obs, metric = setup
    feats = features_at_input()
    other = (states(seed=9) + 1.0).float()  # float32 inputs are cast to the copy's float64
    table = chisel.pathway_effects(run, tanh_net(), feats, metric, data=other, groups=())
    final = {n: _np(v) for n, v in run.params(len(run)).items()}
    start = {n: _np(v) for n, v in run.params(0).items()}
    d, e = _dual([_np(f.read) for f in feats])
    dw, xbar = final["0.weight"] - start["0.weight"], _np(other).mean(0)
    part = np.outer(dw @ d[1], e[:, 1])
    theta = dict(final, **{"0.weight": final["0.weight"] - part, "0.bias": final["0.bias"] + part @ xbar})
    actions = metric_actions(metric, obs)
    want = _forward(final, _np(obs), actions) - _forward(theta, _np(obs), actions)
    assert table.set_index("pathway").effect["b@in→0.weight"] == pytest.approx(want, abs=TOL)


def test_a_transposed_conv1d_weight_gives_the_same_effects_as_its_linear_twin(tmp_path):
    """Hugging Face Conv1D stores W as in × out: the reversion must transpose, not misread."""
    from transformers.pytorch_utils import Conv1D

    conv = torch.nn.Sequential(Conv1D(6, 5), torch.nn.Tanh(), Conv1D(3, 6)).double()
    with torch.no_grad():  # the linear twin's initial weights, in Conv1D layout
        for p, q in zip(conv.parameters(), tanh_net().parameters(), strict=True):
            p.copy_(q.T if p.ndim == 2 else q)
    runs = {}
    for name, model in (("lin", tanh_net()), ("conv", conv)):
        gen = torch.Generator().manual_seed(1)
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
        with chisel.record(model, opt, tmp_path / name, dtype="float64"):
            for _ in range(3):
                x = torch.randn(32, 5, generator=gen, dtype=torch.float64)
                ((model(x) - x[:, :3]) ** 2).mean().backward()
                opt.step()
                opt.zero_grad()
        runs[name] = chisel.load(tmp_path / name)
    obs = states()
    metric = logprob_metric(obs)
    feats = features_at_input()
    want = chisel.pathway_effects(runs["lin"], tanh_net(), feats, metric, groups=())
    got = chisel.pathway_effects(runs["conv"], conv, feats, metric, groups=())
    assert list(got.pathway) == list(want.pathway)
    np.testing.assert_allclose(got.effect, want.effect, rtol=0, atol=1e-12)
