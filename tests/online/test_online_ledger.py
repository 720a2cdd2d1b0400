"""The online ledger against the exact offline ledger of the same training (chisel.record +
chisel.attribute), on tiny float64 models."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

import chisel
import probes
from chisel.attribution import ledger as L
from chisel.online import ORDER, OnlineLedger, OnlineLedgerError, online_ledger
from tests.attribute.helpers import policy

KEY = [L.STEP, L.FAMILY, L.PARAM, L.SITE, L.FEATURE, L.QUANTITY]


def _features(site: str, dim: int, gen: torch.Generator, n: int = 3) -> probes.FeatureSet:
    return probes.FeatureSet([
        probes.Feature(name=f"f{j}", site=site, read=torch.randn(dim, generator=gen, dtype=torch.float64))
        for j in range(n)
    ])


def _train_both(tmp_path, model, make_opt, features, metric, loss_fn, steps=4, batch=32, **options):
    """The same training recorded (offline) and ledgered online; returns (online, offline)."""
    gen = torch.Generator().manual_seed(7)
    opt = make_opt(model)
    d_in = model[0].in_features
    with chisel.record(model, opt, tmp_path / "run", factors=True, dtype="float64", keyframe_every=2), \
            online_ledger(model, opt, features, metric, tmp_path / "online.parquet", **options):
        for _ in range(steps):
            obs = torch.randn(batch, d_in, generator=gen, dtype=torch.float64)
            loss_fn(model, obs, gen).backward()
            opt.step()
            opt.zero_grad()
    online = chisel.load_ledger(tmp_path / "online.parquet")
    fresh = type(model)(*model) if isinstance(model, nn.Sequential) else model
    offline = chisel.attribute(tmp_path / "run", fresh, features, metric)
    return online, offline


def _pg_loss(model, obs, gen):
    logits = model(obs)
    actions = torch.distributions.Categorical(logits=logits.detach()).sample()
    adv = torch.randn(len(obs), generator=gen, dtype=torch.float64)
    return -(torch.log_softmax(logits, -1)[torch.arange(len(obs)), actions] * adv).mean()


def _mlp_metric(gen):
    obs = torch.randn(20, 6, generator=gen, dtype=torch.float64)
    actions = torch.randint(0, 3, (20,), generator=gen)
    return chisel.metrics.logprob(obs, actions)


@pytest.fixture(scope="module")
def mlp_runs(tmp_path_factory):
    out = {}
    for name, make_opt in (
        ("sgd", lambda m: torch.optim.SGD(m.parameters(), lr=0.05)),
        ("adam", lambda m: torch.optim.Adam(m.parameters(), lr=1e-3)),
    ):
        torch.manual_seed(0)
        gen = torch.Generator().manual_seed(3)
        features = _features("1:out", 16, gen)  # read by the second Linear, written by the first
        metric = _mlp_metric(gen)
        out[name] = _train_both(tmp_path_factory.mktemp(name), policy(), make_opt, features, metric, _pg_loss)
    return out


def _joined(online, offline, family):
    a = online[online[L.FAMILY] == family]
    b = offline[offline[L.FAMILY] == family]
    return a.merge(b, on=KEY, suffixes=("_on", "_off"), validate="one_to_one")


def _sample_credit(online, offline):
    """This step's per-sample gradient-part credit, online and offline, joined."""
    on = online[(online[L.FAMILY] == L.CREDIT) & (online[L.PART] == "gradient")
                & (online[L.FEATURE] == "") & online[L.SAMPLE].notna()]
    off = offline[(offline[L.FAMILY] == L.CREDIT) & (offline[L.PART] == "gradient")
                  & (offline[L.FEATURE] == "") & (offline[L.ORIGIN_STEP] == offline[L.STEP])]
    return on.merge(off, on=[L.STEP, L.PARAM, L.SAMPLE], suffixes=("_on", "_off"), validate="one_to_one")


# -- exact where first order is exact -----------------------------------------------------------
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_on_a_loss_and_metric_linear_in_the_parameters_agrees_exactly(tmp_path, momentum):
    torch.manual_seed(1)
    gen = torch.Generator().manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 4)).double()
    features = probes.FeatureSet([
        probes.Feature(name=f"{side}{j}", site=f"0:{side}", read=torch.randn(dim, generator=gen, dtype=torch.float64))
        for side, dim in (("in", 6), ("out", 4)) for j in range(2)
    ])
    mobs = torch.randn(10, 6, generator=gen, dtype=torch.float64)
    metric = lambda m: m(chisel.metrics.as_input(mobs, m))[:, 0].mean()  # noqa: E731
    weights = torch.randn(4, generator=gen, dtype=torch.float64)
    loss = lambda m, obs, g: (m(obs) @ weights).mean()  # noqa: E731  linear in θ
    online, offline = _train_both(
        tmp_path, model, lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=momentum),
        features, metric, loss, steps=3, batch=8,
    )
    for family in (L.GEOMETRY, L.INTEGRATED):
        joined = _joined(online, offline, family)
        assert len(joined) == (online[L.FAMILY] == family).sum() > 0
        np.testing.assert_allclose(joined["value_on"], joined["value_off"], rtol=1e-10, atol=1e-12)
    samples = _sample_credit(online, offline)
    assert len(samples) == 3 * 8 * 2  # steps × samples × (weight, bias)
    np.testing.assert_allclose(samples["value_on"], samples["value_off"], rtol=1e-10, atol=1e-14)
    rel = online[online[L.QUANTITY] == L.COMPLETENESS_REL][L.VALUE]
    assert (rel < 1e-9).all()


# -- measured agreement on a nonlinear MLP ------------------------------------------------------
# measured (float64, 4 steps of 32 samples, 3 features; benchmarks-free, this exact training):
#   SGD lr 0.05:  completeness_rel <= 0.059, per-feature rows within 4.9% of the step's largest
#                 share, per-sample credit within 2.8% of the largest sample, correlation 0.9998
#   Adam lr 1e-3: completeness_rel <= 0.075, rows within 2.7%, samples within 0.25%, corr 0.999997
# The gap is the second-order term of the path (∝ |Δθ|²): larger steps give larger gaps.
TOLERANCE = {  # (completeness_rel, rows rel. to the step's largest, samples rel., correlation)
    "sgd": (0.09, 0.075, 0.045, 0.999),
    "adam": (0.11, 0.04, 0.004, 0.9999),
}


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_first_order_rows_agree_with_the_offline_ledger_within_the_measured_tolerance(mlp_runs, name):
    online, offline = mlp_runs[name]
    complete, rows_tol, _, _ = TOLERANCE[name]
    assert (online[online[L.QUANTITY] == L.COMPLETENESS_REL][L.VALUE] < complete).all()
    joined = _joined(online, offline, L.INTEGRATED)
    shares = joined[joined[L.QUANTITY].isin([L.ATTRIBUTION, L.WRITE_ATTRIBUTION])]
    features = shares[shares[L.FEATURE].str.startswith("f")]
    assert len(features) == 4 * 3 * 3  # steps × features × (read by 2.weight, written by 0.weight, 0.bias)
    scale = shares.groupby(L.STEP)["value_off"].transform(lambda v: v.abs().max())
    assert ((shares["value_on"] - shares["value_off"]).abs() / scale).max() < rows_tol
    # exact quantities are exact
    exact = joined[joined[L.QUANTITY].isin([L.METRIC_BEFORE, L.DELTA_METRIC])]
    np.testing.assert_allclose(exact["value_on"], exact["value_off"], rtol=1e-12)


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_ghost_per_sample_credit_agrees_with_the_offline_credit(mlp_runs, name):
    online, offline = mlp_runs[name]
    _, _, tol, corr = TOLERANCE[name]
    s = _sample_credit(online, offline)
    assert len(s) == 4 * 32 * 6  # steps × samples × params
    scale = s["value_off"].abs().max()
    assert ((s["value_on"] - s["value_off"]).abs() / scale).max() < tol
    assert np.corrcoef(s["value_on"], s["value_off"])[0, 1] > corr


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_online_geometry_is_exact(mlp_runs, name):
    online, offline = mlp_runs[name]
    joined = _joined(online, offline, L.GEOMETRY)
    assert len(joined) == (online[L.FAMILY] == L.GEOMETRY).sum() > 0
    np.testing.assert_allclose(joined["value_on"], joined["value_off"], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_credit_parts_close_to_the_first_order_total(mlp_runs, name):
    online, _ = mlp_runs[name]
    credit = online[(online[L.FAMILY] == L.CREDIT) & (online[L.FEATURE] == "")]
    total = online[online[L.QUANTITY] == L.TOTAL].set_index(L.STEP)[L.VALUE]
    np.testing.assert_allclose(credit.groupby(L.STEP)[L.VALUE].sum(), total, rtol=1e-10, atol=1e-15)
    # features + <mean> + <residual> + <bias> close each param's first-order share
    rows = online[(online[L.FAMILY] == L.INTEGRATED) & (online[L.QUANTITY] == L.ATTRIBUTION)]
    whole = rows[rows[L.FEATURE] == ""].set_index([L.STEP, L.PARAM])[L.VALUE]
    parts = rows[(rows[L.FEATURE] != "") & (rows[L.PARAM] == "2.weight")].groupby(L.STEP)[L.VALUE].sum()
    bias = rows[(rows[L.FEATURE] == L.BIAS)].set_index(L.STEP)[L.VALUE]
    np.testing.assert_allclose(parts + bias, whole.xs("2.weight", level=1) + whole.xs("2.bias", level=1),
                               rtol=1e-10)
    if name == "adam":  # Adam's momentum part is whole online (no earlier samples are kept)
        assert (credit[credit[L.PART] == "momentum (unresolved)"][L.VALUE].abs() > 0).any()


def test_first_order_rows_are_marked(mlp_runs, tmp_path):
    online, _ = mlp_runs["sgd"]
    marked = online[online[ORDER] == 1]
    assert set(marked[L.FAMILY]) == {L.INTEGRATED, L.CREDIT}
    assert online[online[L.FAMILY] == L.GEOMETRY][ORDER].isna().all()
    exact = online[online[L.QUANTITY].isin([L.METRIC_BEFORE, L.DELTA_METRIC])]
    assert len(exact) == 8 and exact[ORDER].isna().all()
    assert online[online[L.QUANTITY] == L.ATTRIBUTION][ORDER].eq(1).all()


def test_the_parquet_file_says_it_is_online_and_first_order(tmp_path):
    model = policy()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(0)
    with online_ledger(model, opt, None, _mlp_metric(gen), tmp_path / "l.parquet") as led:
        model(torch.randn(4, 6, dtype=torch.float64)).sum().backward()
        opt.step()
        assert "step=1" in repr(led)
    meta = pq.read_schema(tmp_path / "l.parquet").metadata
    assert meta[b"chisel.ledger"] == b"online" and b"first-order" in meta[b"chisel.order"]


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_hooks_are_removed_on_exit_and_on_errors(tmp_path):
    model = policy()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    metric = _mlp_metric(torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match="boom"):
        with online_ledger(model, opt, None, metric, tmp_path / "l.parquet"):
            model(torch.randn(4, 6, dtype=torch.float64)).sum().backward()
            opt.step()
            raise RuntimeError("boom")
    assert _hooks(model) == 0 and not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    assert not (tmp_path / "l.parquet").exists() and (tmp_path / "l.parquet.partial").exists()
    model(torch.randn(4, 6, dtype=torch.float64)).sum().backward()
    opt.step()  # no hook left to fire


def test_bad_inputs_raise_clear_errors(tmp_path):
    model = policy()
    metric = _mlp_metric(torch.Generator().manual_seed(0))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(OnlineLedgerError, match="file path"):
        OnlineLedger(model, opt, None, metric, tmp_path)
    with pytest.raises(OnlineLedgerError, match="callable"):
        OnlineLedger(model, opt, None, 3.0, tmp_path / "l.parquet")
    with pytest.raises(OnlineLedgerError, match="flush_every"):
        OnlineLedger(model, opt, None, metric, tmp_path / "l.parquet", flush_every=0)
    with pytest.raises(OnlineLedgerError, match="credit=False"):
        with online_ledger(model, torch.optim.RMSprop(model.parameters()), None, metric, tmp_path / "r.parquet"):
            pass
    assert _hooks(model) == 0
    with online_ledger(model, torch.optim.RMSprop(model.parameters()), None, metric,
                       tmp_path / "r.parquet", credit=False):
        pass
    assert pd.read_parquet(tmp_path / "r.parquet").empty


def test_sample_feature_rows_split_each_samples_credit_exactly(tmp_path):
    model = policy()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(5)
    features = _features("1:out", 16, gen)
    metric = _mlp_metric(gen)
    with online_ledger(model, opt, features, metric, tmp_path / "l.parquet", sample_features=True):
        for _ in range(2):
            _pg_loss(model, torch.randn(8, 6, generator=gen, dtype=torch.float64), gen).backward()
            opt.step()
            opt.zero_grad()
    ledger = chisel.load_ledger(tmp_path / "l.parquet")
    samples = ledger[(ledger[L.FAMILY] == L.CREDIT) & ledger[L.SAMPLE].notna()]
    whole = samples[samples[L.FEATURE] == ""].set_index([L.STEP, L.PARAM, L.SAMPLE])[L.VALUE]
    for quantity, param in ((L.ATTRIBUTION, "2.weight"), (L.WRITE_ATTRIBUTION, "0.weight")):
        split = samples[(samples[L.QUANTITY] == quantity) & (samples[L.FEATURE] != "")
                        & (samples[L.PARAM] == param)]
        assert set(split[L.FEATURE]) >= {"f0", "f1", "f2", L.RESIDUAL}
        summed = split.groupby([L.STEP, L.PARAM, L.SAMPLE])[L.VALUE].sum()
        np.testing.assert_allclose(summed, whole.loc[summed.index], rtol=1e-9, atol=1e-15)
        assert split[ORDER].eq(1).all() and len(summed) == 2 * 8


def _train(model, opt, steps):
    gen = torch.Generator().manual_seed(11)
    for _ in range(steps):
        obs = torch.randn(16, 6, generator=gen, dtype=next(model.parameters()).dtype)
        logits = model(obs)
        (-(torch.log_softmax(logits, -1)[:, 0] * obs[:, 0]).mean()).backward()
        opt.step()
        opt.zero_grad()


def test_the_ledger_does_not_change_training(tmp_path):
    metric = _mlp_metric(torch.Generator().manual_seed(0))
    plain, watched = policy(), policy()
    opt_plain = torch.optim.Adam(plain.parameters(), lr=1e-2)
    opt_watched = torch.optim.Adam(watched.parameters(), lr=1e-2)
    _train(plain, opt_plain, 3)
    with online_ledger(watched, opt_watched, None, metric, tmp_path / "l.parquet"):
        _train(watched, opt_watched, 3)
    for a, b in zip(plain.parameters(), watched.parameters()):
        assert torch.equal(a, b)


def test_float32_training_closes_to_float32_precision(tmp_path):
    model = policy().float()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(4)
    with online_ledger(model, opt, _features("1:out", 16, gen), _mlp_metric(gen), tmp_path / "l.parquet"):
        _train(model, opt, 3)
    ledger = chisel.load_ledger(tmp_path / "l.parquet")
    assert np.isfinite(ledger[L.VALUE].dropna()).all()
    credit = ledger[(ledger[L.FAMILY] == L.CREDIT) & (ledger[L.FEATURE] == "")]
    total = ledger[ledger[L.QUANTITY] == L.TOTAL].set_index(L.STEP)[L.VALUE]
    np.testing.assert_allclose(credit.groupby(L.STEP)[L.VALUE].sum(), total, rtol=1e-4)
    assert (ledger[ledger[L.QUANTITY] == L.COMPLETENESS_REL][L.VALUE] < 0.2).all()


def test_every_k_steps_gives_the_every_step_ledgers_rows_of_those_steps(tmp_path):
    """`every=3` keeps the rows of steps 0, 3, 6 and they are those of `every=1` (the same training,
    the same θ_t and ∇m(θ_t)); Δm of a kept step is still measured at θ_{t+1}."""
    gen = torch.Generator().manual_seed(5)
    features, metric = _features("1:out", 16, gen), _mlp_metric(gen)
    ledgers = {}
    for every in (1, 3):
        model = policy()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        with online_ledger(model, opt, features, metric, tmp_path / f"e{every}.parquet", every=every):
            _train(model, opt, 7)
        ledgers[every] = chisel.load_ledger(tmp_path / f"e{every}.parquet")
    sparse, dense = ledgers[3], ledgers[1]
    assert sorted(sparse[L.STEP].unique()) == [0, 3, 6]
    key = [*KEY, L.PART, L.SAMPLE]
    kept = dense[dense[L.STEP].isin([0, 3, 6])]
    joined = sparse.merge(kept, on=key, suffixes=("_k", "_all"), validate="one_to_one", how="outer",
                          indicator=True)
    assert (joined["_merge"] == "both").all()
    np.testing.assert_allclose(joined[f"{L.VALUE}_k"], joined[f"{L.VALUE}_all"], rtol=1e-12, atol=1e-15)
    with pytest.raises(OnlineLedgerError, match="every=0"):
        online_ledger(policy(), torch.optim.SGD(policy().parameters(), lr=0.1), features, metric,
                      tmp_path / "x.parquet", every=0)
