"""fit_probe: planted directions recovered with the expected held-out scores."""

from __future__ import annotations

import math

import pytest
import torch

import probes
from probes import Feature, FeatureSet, ProbeFitError
from probes.metrics import r2_score, roc_auc


def _planted(n: int, d: int, seed: int, mix: bool = False):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(d, generator=g)
    u /= u.norm()
    x = torch.randn(n, d, generator=g)
    if mix:  # correlated, shifted activations
        x = x @ (torch.eye(d) + 0.3 * torch.randn(d, d, generator=g)) + 2.0
    return g, u, x


def test_binary_planted_direction_and_bayes_accuracy():
    g, u, x = _planted(6000, 32, seed=1)
    noise = 0.5
    y = x @ u + noise * torch.randn(6000, generator=g) > 0
    f = probes.fit_probe(x, y, name="trash_visible", site="torso.2:out")
    assert isinstance(f, Feature) and f.source == "probe" and f.site == "torso.2:out"
    assert torch.dot(f.read, u) >= 0.95
    assert math.isclose(f.read.norm().item(), 1.0, rel_tol=1e-5)
    bayes = (
        1 - math.atan(noise) / math.pi
    )  # P(sign(z + e) == sign(z)), z ~ N(0,1), e ~ N(0, noise²)
    assert abs(f.metadata["accuracy"] - bayes) < 0.035
    assert f.metadata["score"] == f.metadata["accuracy"] and f.metadata["score_name"] == "accuracy"
    assert 0.88 < f.metadata["auc"] < 0.97
    assert f.metadata["n_test"] == 1200 and f.metadata["n_train"] == 4800
    assert f.metadata["concept"] == "trash_visible" and f.metadata["classes"] == [False, True]


def test_binary_on_correlated_shifted_activations():
    _, u, x = _planted(8000, 16, seed=2, mix=True)
    y = (x - 2.0) @ u > 0.3
    f = probes.fit_probe(x, y.long(), name="c", site="s:out")
    logit = f.score(x) * f.metadata["weight_norm"]
    # decision boundary recovered: x @ u = 0.3 + 2 * sum(u)
    assert torch.dot(f.read, u) >= 0.95
    assert f.metadata["accuracy"] > 0.97
    assert ((logit > 0) == y).float().mean() > 0.97


def test_ridge_planted_direction_and_r2():
    g, u, x = _planted(5000, 24, seed=3)
    y = 3.0 * (x @ u) + 1.0 + 0.5 * torch.randn(5000, generator=g)
    f = probes.fit_probe(x, y, name="value", site="v:out")
    assert f.metadata["kind"] == "ridge"
    assert torch.dot(f.read, u) >= 0.99
    assert abs(f.metadata["r2"] - 9 / 9.25) < 0.01  # signal var 9, noise var 0.25
    assert f.metadata["score"] == f.metadata["r2"]
    assert abs(f.metadata["weight_norm"] - 3.0) < 0.05
    assert abs(f.bias * f.metadata["weight_norm"] - 1.0) < 0.05


def test_multiclass_gives_one_feature_per_class():
    g = torch.Generator().manual_seed(4)
    d, n = 12, 6000
    means = torch.zeros(3, d)
    means[0, 0], means[1, 1] = 2.0, 2.0
    means[2] = -(means[0] + means[1])  # class means sum to zero: softmax weights are the means
    y = torch.randint(0, 3, (n,), generator=g)
    x = means[y] + torch.randn(n, d, generator=g)
    fs = probes.fit_probe(x, y + 5, name="room", site="s:out")
    assert isinstance(fs, FeatureSet) and fs.names == ["room=5", "room=6", "room=7"]
    nearest = torch.cdist(x, means).argmin(1)  # Bayes rule for equal priors, identity cov
    bayes = (nearest == y).float().mean().item()
    for k, f in enumerate(fs):
        cos = torch.dot(f.read, means[k] / means[k].norm())
        assert cos >= 0.95, (k, cos)
        assert f.metadata["class"] == k + 5 and 0.85 < f.metadata["auc"] <= 1
    assert fs[0].metadata["accuracy"] > bayes - 0.03


def test_class_balancing_moves_the_threshold_to_the_midpoint():
    g, u, _ = _planted(1, 8, seed=5)
    n = 20000
    y = torch.rand(n, generator=g) < 0.05
    x = torch.randn(n, 8, generator=g) + torch.where(y, 1.0, -1.0)[:, None] * u
    # logit = 2 x·u + log(0.05 / 0.95): unit read u, bias log(1/19) / 2 without balancing
    plain = probes.fit_probe(x, y, name="p", site="s", balance=False)
    balanced = probes.fit_probe(x, y, name="b", site="s", balance=True)
    assert abs(plain.bias - math.log(1 / 19) / 2) < 0.2
    assert abs(balanced.bias) < 0.2
    assert balanced.metadata["balanced_accuracy"] > plain.metadata["balanced_accuracy"]


def test_seeded_fit_is_deterministic():
    _, u, x = _planted(2000, 8, seed=6)
    y = x @ u > 0
    a = probes.fit_probe(x, y, name="a", site="s", seed=3)
    b = probes.fit_probe(x, y, name="a", site="s", seed=3)
    c = probes.fit_probe(x, y, name="a", site="s", seed=4)
    assert torch.equal(a.read, b.read) and a.bias == b.bias and a.metadata == b.metadata
    assert not torch.equal(a.read, c.read)


def test_float64_acts_and_no_holdout():
    _, u, x = _planted(500, 4, seed=7)
    f = probes.fit_probe(x.double(), x.double() @ u.double(), name="r", site="s", test_fraction=0.0)
    assert f.read.dtype == torch.float64 and f.metadata["scored_on"] == "train"
    assert f.metadata["r2"] > 0.999 and f.metadata["n_test"] == 0


def test_fit_errors():
    x = torch.randn(10, 3)
    with pytest.raises(ProbeFitError, match="single class"):
        probes.fit_probe(x, torch.ones(10, dtype=torch.long), name="a", site="s")
    with pytest.raises(ProbeFitError, match=r"\[n, d\]"):
        probes.fit_probe(torch.randn(10, 2, 3), torch.ones(10), name="a", site="s")
    with pytest.raises(ProbeFitError, match="labels must be"):
        probes.fit_probe(x, torch.ones(9), name="a", site="s")
    with pytest.raises(ProbeFitError, match="class labels"):
        probes.fit_probe(x, torch.rand(10), name="a", site="s", kind="logistic")
    with pytest.raises(ProbeFitError, match="NaN"):
        probes.fit_probe(x, torch.tensor([float("nan")] * 10), name="a", site="s")


def test_roc_auc_matches_pairwise_count_with_ties():
    g = torch.Generator().manual_seed(8)
    s = torch.randint(0, 5, (60,), generator=g).float()
    pos = torch.rand(60, generator=g) < 0.4
    sp, sn = s[pos][:, None], s[~pos][None, :]
    brute = ((sp > sn).double() + 0.5 * (sp == sn).double()).mean().item()
    assert math.isclose(roc_auc(s, pos), brute, rel_tol=1e-12)
    assert math.isnan(roc_auc(s, torch.ones(60, dtype=torch.bool)))
    assert r2_score(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 2.0, 4.0])) == 1 - 1 / (
        14 / 3
    )


@pytest.mark.parametrize("n_classes", [2, 3])
def test_logistic_solution_is_a_stationary_point_of_the_autograd_objective(n_classes):
    from probes.fit import _fit_logistic, _moments

    g = torch.Generator().manual_seed(9)
    x = torch.randn(300, 5, generator=g, dtype=torch.float64) * 2 + 1
    y = torch.randint(0, n_classes, (300,), generator=g)
    sample_w = torch.rand(300, generator=g, dtype=torch.float64) + 0.5
    n_out, l2 = (1 if n_classes == 2 else n_classes), 1e-2
    w, b = _fit_logistic(x, y, sample_w, n_out, l2, max_iter=500)
    mu, sd = _moments(x)
    w_std = (w * sd).requires_grad_(True)
    b_std = (b + w @ mu).detach().requires_grad_(True)
    lg = ((x - mu) / sd) @ w_std.T + b_std
    if n_out == 1:
        loss_i = torch.nn.functional.binary_cross_entropy_with_logits(
            lg[:, 0], y.double(), reduction="none"
        )
    else:
        loss_i = torch.nn.functional.cross_entropy(lg, y, reduction="none")
    coef = sample_w / sample_w.sum()
    loss = (loss_i * coef).sum() + 0.5 * l2 * w_std.pow(2).sum()
    grad_w, grad_b = torch.autograd.grad(loss, [w_std, b_std])
    assert grad_w.abs().max() < 1e-6 and grad_b.abs().max() < 1e-6
