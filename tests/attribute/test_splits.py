"""One split convention: centred input shares, output-side shares, and integrated == credit per
feature for any feature set and optimizer (known answers, float64)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import chisel
import probes
from chisel.attribution import ledger as L
from chisel.attribution.splits import read_kernels, write_kernels

D_IN, WIDTH, N_ACT = 5, 6, 3


def _policy(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D_IN, WIDTH), nn.Tanh(), nn.Linear(WIDTH, N_ACT)).double()


def _record(path, model, opt, steps: int = 4, batch: int = 16, seed: int = 1) -> chisel.Run:
    gen = torch.Generator().manual_seed(seed)
    with chisel.record(model, opt, path, factors=True, dtype="float64") as rec:
        for _ in range(steps):
            obs = torch.randn(batch, D_IN, generator=gen, dtype=torch.float64)
            dist = torch.distributions.Categorical(logits=model(obs))
            action = dist.sample()
            advantage = torch.randn(batch, generator=gen, dtype=torch.float64)
            (-(dist.log_prob(action) * advantage).mean()).backward()
            rec.tag(advantage=advantage)
            opt.step()
            opt.zero_grad()
    return chisel.load(path)


def _feature_sets() -> dict[str, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(WIDTH, generator=gen), torch.randn(WIDTH, generator=gen)
    return {
        "correlated": [a, a + 0.1 * b, b],
        "non_unit": [3.0 * a, 0.02 * b],
        "rank_deficient": [a, b, a + b, 2.0 * a],
    }


@pytest.mark.parametrize("kind", list(_feature_sets()))
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_integrated_and_credit_agree_per_feature(tmp_path, kind, optimizer):
    model = _policy()
    opt = (torch.optim.SGD(model.parameters(), lr=0.1) if optimizer == "sgd"
           else torch.optim.Adam(model.parameters(), lr=1e-2))
    run = _record(tmp_path / "run", model, opt)
    vectors = _feature_sets()[kind]
    features = [probes.custom(f"f{i}", "2:in", v) for i, v in enumerate(vectors)]
    features += [probes.custom("out0", "2:out", torch.eye(N_ACT)[0] + 0.5)]
    obs = torch.randn(32, D_IN, dtype=torch.float64)
    metric = chisel.metrics.logprob(obs, torch.zeros(32, dtype=torch.long))
    ledger = chisel.attribute(run, model, features, metric, families=("integrated", "credit"))
    rows = ledger[~ledger[L.FEATURE].isin([L.WHOLE, L.BIAS])]  # credit's bias rows are whole rows
    for quantity in (L.ATTRIBUTION, L.WRITE_ATTRIBUTION):
        part = rows[rows[L.QUANTITY] == quantity]
        keys = [L.STEP, L.PARAM, L.FEATURE]
        integrated = part[part[L.FAMILY] == L.INTEGRATED].groupby(keys)[L.VALUE].sum()
        credit = part[part[L.FAMILY] == L.CREDIT].groupby(keys)[L.VALUE].sum()
        assert len(integrated) > 0 and set(credit.index) == set(integrated.index)
        scale = integrated.abs().max()
        assert (credit[integrated.index] - integrated).abs().max() <= 1e-10 * scale, quantity
    labels = set(rows[rows[L.QUANTITY] == L.ATTRIBUTION][L.FEATURE])
    assert labels == {f"f{i}" for i in range(len(vectors))} | {L.MEAN, L.RESIDUAL}


def test_each_side_closes_to_the_layer_share(tmp_path):
    model = _policy()
    run = _record(tmp_path / "run", model, torch.optim.Adam(model.parameters(), lr=1e-2))
    features = [probes.custom(f"f{i}", "2:in", v) for i, v in enumerate(_feature_sets()["correlated"])]
    features += [probes.custom("o", "2:out", torch.tensor([1.0, -1.0, 0.0]))]
    metric = chisel.metrics.logprob(torch.randn(16, D_IN, dtype=torch.float64), torch.zeros(16, dtype=torch.long))
    ledger = chisel.attribute(run, model, features, metric, families=("integrated",))
    rows = ledger[ledger[L.FAMILY] == L.INTEGRATED]
    for t in range(len(run)):
        step = rows[rows[L.STEP] == t]
        whole = step[(step[L.FEATURE] == L.WHOLE) & (step[L.QUANTITY] == L.ATTRIBUTION)]
        layer = whole.set_index(L.PARAM)[L.VALUE]
        read = step[(step[L.QUANTITY] == L.ATTRIBUTION) & (step[L.PARAM] == "2.weight")
                    & (step[L.FEATURE] != L.WHOLE)]
        assert read[L.VALUE].sum() == pytest.approx(layer["2.weight"], rel=1e-12, abs=1e-15)
        for param in ("2.weight", "2.bias"):
            write = step[(step[L.QUANTITY] == L.WRITE_ATTRIBUTION) & (step[L.PARAM] == param)]
            assert write[L.VALUE].sum() == pytest.approx(layer[param], rel=1e-12, abs=1e-15)


def test_kernels_split_the_gradient_exactly_and_match_the_pathway_definition():
    gen = torch.Generator().manual_seed(0)
    gbar, update = torch.randn(4, 6, generator=gen, dtype=torch.float64), torch.randn(4, 6, generator=gen, dtype=torch.float64)
    d = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    d = d / d.norm(dim=1, keepdim=True)
    g_bias, xbar = torch.randn(4, generator=gen, dtype=torch.float64), torch.randn(6, generator=gen, dtype=torch.float64)
    mean = torch.outer(g_bias, xbar)
    k = read_kernels(("a", "b", "c"), ("s",) * 3, d, gbar, mean)
    torch.testing.assert_close(k.weight.sum(0), gbar, rtol=0, atol=1e-13)
    e = torch.linalg.pinv(d @ d.T) @ d  # rows e_jᵀ
    for j in range(3):  # feature j's share is ⟨ΔW d_j e_jᵀ, ḡ − M⟩
        want = float((torch.outer(update @ d[j], e[j]) * (gbar - mean)).sum())
        assert float(k.shares(update)[j]) == pytest.approx(want, rel=1e-12)
    assert float(k.shares(update)[3]) == pytest.approx(float(g_bias @ update @ xbar), rel=1e-12)
    u = torch.randn(2, 4, generator=gen, dtype=torch.float64)
    u = u / u.norm(dim=1, keepdim=True)
    w = write_kernels(("p", "q"), ("o",) * 2, u, gbar, g_bias)
    torch.testing.assert_close(w.weight.sum(0), gbar, rtol=0, atol=1e-13)
    torch.testing.assert_close(w.bias.sum(0), g_bias, rtol=0, atol=1e-13)


class _Scaled(nn.Module):
    """An elementwise map with a constant slope per unit: the transport is exact."""

    def __init__(self, slope: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("slope", slope)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.slope


def _detector_run(tmp_path, activation: nn.Module, u: torch.Tensor):
    """fc1 → activation → frozen reader along u; fc1 is trained, the reader is not."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), activation, nn.Linear(4, 1)).double()
    with torch.no_grad():
        model[2].weight.copy_(u[None])
    model[2].requires_grad_(False)
    opt = torch.optim.Adam(model[0].parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(2)
    with chisel.record(model, opt, tmp_path / "run", dtype="float64") as rec:
        for _ in range(5):
            x = torch.randn(32, 3, generator=gen, dtype=torch.float64)
            ((model(x)[:, 0] - x[:, 0]) ** 2).mean().backward()
            rec.tag()
            opt.step()
            opt.zero_grad()
    x = torch.randn(64, 3, generator=gen, dtype=torch.float64)
    metric = lambda m: -((m(chisel.metrics.as_input(x, m))[:, 0] - x[:, 0]) ** 2).mean()  # noqa: E731
    return chisel.load(tmp_path / "run"), model, metric


def test_a_planted_detector_is_found_on_the_write_side(tmp_path):
    """fc1 writes many directions, but the frozen reader only looks along u: the metric's gradient
    at fc1's output lies along u, so the write split gives u the whole share, v (⊥ u) none."""
    u = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64) / 2**0.5
    v = torch.tensor([1.0, -1.0, 0.0, 0.0], dtype=torch.float64) / 2**0.5
    w = torch.tensor([0.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    run, model, metric = _detector_run(tmp_path, nn.Identity(), u)
    features = [probes.custom(n, "0:out", vec) for n, vec in (("u", u), ("v", v), ("w", w))]
    ledger = chisel.attribute(run, model, features, metric, families=("integrated",))
    write = ledger[(ledger[L.QUANTITY] == L.WRITE_ATTRIBUTION) & (ledger[L.PARAM] == "0.weight")]
    shares = write.groupby(L.FEATURE)[L.VALUE].sum()
    whole = ledger[(ledger[L.QUANTITY] == L.ATTRIBUTION) & (ledger[L.FEATURE] == L.WHOLE)
                   & (ledger[L.PARAM] == "0.weight")][L.VALUE].sum()
    assert shares["u"] == pytest.approx(whole, rel=1e-10) and abs(whole) > 1e-3
    for other in ("v", "w", L.RESIDUAL):
        assert abs(shares[other]) <= 1e-12 * abs(whole)


def _bandit_shares(tmp_path, seed: int, centred: bool) -> dict[str, float]:
    """REINFORCE on a bandit whose cue decides the rewarded action; a bias-like input is on in
    ~90% of states whatever the cue. Metric: log π(rewarded action) over all states."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)

    def states(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        cue = torch.randint(0, 2, (n,), generator=gen).float()
        on = (torch.rand(n, generator=gen) < 0.9).float()
        noise = 0.5 * torch.randn(n, 2, generator=gen)
        return torch.cat([cue[:, None], on[:, None], noise], 1), cue.long()

    policy = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2))
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-2)
    path = tmp_path / f"bandit{seed}{centred}"
    with chisel.record(policy, optimizer, path) as rec:
        for _ in range(60):
            obs, cue = states(64)
            dist = torch.distributions.Categorical(logits=policy(obs))
            action = dist.sample()
            reward = (action == cue).float()
            (-(dist.log_prob(action) * (reward - reward.mean())).mean()).backward()
            rec.tag()
            optimizer.step()
            optimizer.zero_grad()
    obs, cue = states(512)
    metric = chisel.metrics.logprob(obs, cue)
    names = ("cue", "on", "noise0", "noise1")
    features = [probes.custom(n, "0:in", torch.eye(4)[i]) for i, n in enumerate(names)]
    ledger = chisel.attribute(path, policy, features, metric, families=("integrated",), centred=centred)
    final = chisel.timeline(ledger).iloc[-1]
    return {n: float(final[n]) for n in names}


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(3))
def test_a_bias_like_input_gets_no_centred_share(tmp_path, seed):
    shares = _bandit_shares(tmp_path, seed, centred=True)
    cue, on, noise = shares["cue"], shares["on"], max(abs(shares["noise0"]), abs(shares["noise1"]))
    assert cue > 0.1 and cue >= 10 * abs(on), shares  # measured 60-100x
    assert abs(on) <= 2 * noise, shares  # at the level of pure-noise inputs
    plain = _bandit_shares(tmp_path, seed, centred=False)
    assert abs(plain["on"]) > abs(on), (plain, shares)  # uncentred, the flag's mean is credited


def test_zero_norm_features_are_refused(tmp_path):
    model = _policy()
    run = _record(tmp_path / "run", model, torch.optim.SGD(model.parameters(), lr=0.1), steps=1)
    metric = chisel.metrics.logprob(torch.randn(8, D_IN, dtype=torch.float64), torch.zeros(8, dtype=torch.long))
    for vec in (torch.zeros(WIDTH), torch.full((WIDTH,), 1e-300, dtype=torch.float64)):
        bad = probes.Feature(name="z", site="2:in", read=vec)
        with pytest.raises(chisel.AttributionInputError, match=r"\['z'\].*near-zero"):
            chisel.attribute(run, model, [bad], metric, families=("integrated",))


def test_the_default_horizon_covers_heavy_momentum(tmp_path):
    """SGD momentum 0.99: the default horizon follows the buffer's mass (99%), not a fixed cap,
    and the share left unresolved is a ledger row per step."""
    model = _policy()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.99)
    run = _record(tmp_path / "run", model, opt, steps=80, batch=4)
    gbar = {n: torch.randn_like(v) for n, v in run.update(79).items()}
    from chisel.attribution import credit as C

    rows = C.credit_rows(run, 79, gbar, feature_rows="none")
    share = float(rows[rows[L.QUANTITY] == L.MOMENTUM_UNRESOLVED_SHARE][L.VALUE].iloc[0])
    assert set(rows["origin_step"].dropna()) == set(range(80))  # 0.99^79 > 1%: every step counts
    assert share <= 1e-10
    capped = C.credit_rows(run, 79, gbar, feature_rows="none", horizon=10)
    left = float(capped[capped[L.QUANTITY] == L.MOMENTUM_UNRESOLVED_SHARE][L.VALUE].iloc[0])
    assert left > 0.3  # with 10 steps most of a 0.99 buffer is left: said, not hidden


def test_a_detector_after_an_activation_is_carried_back_exactly_when_the_slope_is_constant(tmp_path):
    u = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64) / 2**0.5
    v = torch.tensor([1.0, -1.0, 0.0, 0.0], dtype=torch.float64) / 2**0.5
    run, model, metric = _detector_run(tmp_path, _Scaled(torch.tensor([2.0, 0.5, 3.0, 1.0])), u)
    features = [probes.custom("u", "1:out", u), probes.custom("v", "1:out", v)]
    ledger = chisel.attribute(run, model, features, metric, families=("integrated",))
    write = ledger[(ledger[L.QUANTITY] == L.WRITE_ATTRIBUTION) & (ledger[L.PARAM] == "0.weight")]
    shares = write.groupby(L.FEATURE)[L.VALUE].sum()
    whole = ledger[(ledger[L.QUANTITY] == L.ATTRIBUTION) & (ledger[L.FEATURE] == L.WHOLE)
                   & (ledger[L.PARAM] == "0.weight")][L.VALUE].sum()
    assert abs(whole) > 1e-3 and shares["u"] == pytest.approx(whole, rel=1e-10)
    assert abs(shares["v"]) <= 1e-12 * abs(whole) and abs(shares[L.RESIDUAL]) <= 1e-12 * abs(whole)


def test_a_detector_after_tanh_is_carried_back_to_first_order(tmp_path):
    u = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64) / 2**0.5
    run, model, metric = _detector_run(tmp_path, nn.Tanh(), u)
    ledger = chisel.attribute(run, model, [probes.custom("u", "1:out", u)], metric, families=("integrated",))
    write = ledger[(ledger[L.QUANTITY] == L.WRITE_ATTRIBUTION) & (ledger[L.PARAM] == "0.weight")]
    shares = write.groupby(L.FEATURE)[L.VALUE].sum()
    # the slope varies over states, so u's row is not the whole share, but it carries most of it
    assert shares["u"] + shares[L.RESIDUAL] == pytest.approx(
        ledger[(ledger[L.QUANTITY] == L.ATTRIBUTION) & (ledger[L.FEATURE] == L.WHOLE)
               & (ledger[L.PARAM] == "0.weight")][L.VALUE].sum(), rel=1e-10)
    assert abs(shares["u"]) > 5 * abs(shares[L.RESIDUAL]), shares


def test_a_site_that_mixes_units_is_not_carried_back():
    from chisel.attribution.transport import find_transports
    from chisel.attribution.weights import bind_sites, linear_weights

    model = nn.Sequential(nn.Linear(3, 4), nn.Softmax(-1), nn.Linear(4, 2)).double()
    x = torch.randn(8, 3, dtype=torch.float64)
    names = {n for n, _ in model.named_parameters()}
    weights = bind_sites(model, linear_weights(model, names), ["1:out"], lambda: model(x))
    assert find_transports(model, weights, ["1:out"], lambda: model(x)) == []
    tanh = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    weights = bind_sites(tanh, linear_weights(tanh, names), ["1:out"], lambda: tanh(x))
    (carried,) = find_transports(tanh, weights, ["1:out"], lambda: tanh(x))
    z = tanh[0](x)
    torch.testing.assert_close(carried.slope, (1 - torch.tanh(z) ** 2).mean(0))
    assert carried.param == "0.weight" and carried.site == "1:out"


def test_summed_feature_rows_equal_the_sum_of_per_sample_rows(tmp_path):
    from chisel.attribution import credit as C

    model = _policy()
    run = _record(tmp_path / "run", model, torch.optim.Adam(model.parameters(), lr=1e-2))
    gbar = {n: torch.randn_like(v) for n, v in run.update(3).items()}
    feats = {"2": ("2:in", ["a", "b"], torch.stack(_feature_sets()["non_unit"]).double())}
    per_sample = C.credit_rows(run, 3, gbar, features_by_module=feats, feature_rows="sample")
    summed = C.credit_rows(run, 3, gbar, features_by_module=feats, feature_rows="summed")
    keys = ["part", "param", "origin_step", "feature"]
    pick = lambda f: f[(f["feature"] != "") & (f["quantity"] == "attribution")]  # noqa: E731
    a = pick(per_sample).groupby(keys)["value"].sum()
    b = pick(summed).groupby(keys)["value"].sum()
    assert len(a) and set(a.index) == set(b.index)
    assert (a - b[a.index]).abs().max() <= 1e-12 * a.abs().max()
