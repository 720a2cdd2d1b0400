"""Credit: the exact split of recorded updates into weight decay, momentum, samples and residual."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd
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


# -- momentum back-flow against brute force -------------------------------------------------------
def per_sample_grads(run: chisel.Run, s: int) -> list[dict[str, torch.Tensor]]:
    """A loop over samples at θ_s: the reference the factors must reproduce."""
    model = mlp()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(run.params(s)[name])
    x, y = batches()[s]
    out = []
    for i in range(BATCH):
        loss = per_sample_loss(model, x, y)[i]
        grads = torch.autograd.grad(loss, list(model.parameters()))
        out.append(dict(zip(dict(model.named_parameters()), grads)))
    return out


def brute_force_adamw_credit(
    run: chisel.Run, t: int, lr=0.01, b1=0.9, b2=0.999, eps=1e-8, clip=0.3
):
    """{(s, i): {param: term}}: sample i of step s < t, through AdamW's momentum at step t."""
    per = [per_sample_grads(run, s) for s in range(t + 1)]
    m = v = None
    coefs = []
    for s in range(t + 1):
        G = {n: sum(pg[n] for pg in per[s]) for n in per[s][0]}
        norm = float(torch.sqrt(sum((g**2).sum() for g in G.values())))
        c = min(1.0, clip / (norm + 1e-6))
        coefs.append(c)
        g = {n: c * G[n] for n in G}
        m = {n: (b1 * m[n] if m else 0) + (1 - b1) * g[n] for n in g}
        v = {n: (b2 * v[n] if v else 0) + (1 - b2) * g[n] ** 2 for n in g}
    k = t + 1
    denom = {n: v[n].sqrt() / (1 - b2**k) ** 0.5 + eps for n in v}
    return {
        (s, i): {
            n: -(lr / (1 - b1**k)) * b1 ** (t - s) * (1 - b1) * coefs[s] * per[s][i][n] / denom[n]
            for n in denom
        }
        for s in range(t)
        for i in range(BATCH)
    }


def test_adam_momentum_credit_to_earlier_samples_matches_brute_force(runs):
    run, t = runs["adamw"], 6
    split = C.split_update(run, t)
    expected = brute_force_adamw_credit(run, t)
    seen = set()
    for b in split.blocks:
        if b.part != R.MOMENTUM:
            continue
        terms = b.terms(run.update(t)[b.param].shape)
        for i in range(b.n):
            want = expected[(b.origin_step, i)][b.param]
            assert torch.allclose(terms[i], want, rtol=1e-9, atol=1e-15 * float(want.abs().max()))
            seen.add((b.origin_step, i, b.param))
    assert len(seen) == t * BATCH * 4  # every earlier sample, every param
    # all of the momentum part is traced back to samples (decoupled decay never enters m)
    mom = flat(split.base.parts[R.MOMENTUM])
    assert float(flat(split.unresolved[C.MOMENTUM_UNRESOLVED]).norm()) <= 1e-10 * float(mom.norm())


def test_a_short_horizon_leaves_the_rest_unresolved_and_still_closes(runs):
    run = runs["momentum"]
    split = C.split_update(run, 7, horizon=2)
    assert {b.origin_step for b in split.blocks if b.part == R.MOMENTUM} == {5, 6}
    unresolved = flat(split.unresolved[C.MOMENTUM_UNRESOLVED])
    assert float(unresolved.norm()) > 1e-6 * float(flat(split.base.parts[R.MOMENTUM]).norm())
    update = flat(split.base.update)
    assert float((flat(total(split.leaves())) - update).norm()) <= 1e-13 * float(update.norm())


# -- attribution rows ----------------------------------------------------------------------------
def unit_rows(k: int, d: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randn(k, d, generator=gen, dtype=torch.float64)
    return rows / rows.norm(dim=1, keepdim=True)


FEATURES = {
    "0": ("0:in", ["a", "b"], unit_rows(2, D_IN, 1)),
    "2": ("2:in", ["p", "q", "r"], unit_rows(3, WIDTH, 2)),
}


@pytest.mark.parametrize("name", ["nesterov", "adam", "adamw"])
def test_attributions_of_the_parts_sum_to_the_update_attribution(runs, name):
    run = runs[name]
    session = C.CreditSession(run)
    for t in (0, 4, 7):
        gbar = random_like(run.update(t), seed=t)
        rows = C.credit_rows(run, t, gbar, features_by_module=FEATURES, session=session)
        shares = rows[rows["quantity"] == "momentum_unresolved_share"]
        rows = rows[rows["quantity"] == "attribution"]
        whole = rows[rows["feature"] == ""]
        want = sum(float((d * gbar[n]).sum()) for n, d in run.update(t).items())
        assert abs(whole["value"].sum() - want) <= 1e-12 * max(abs(want), 1.0)
        assert set(rows["family"]) == {"credit"} and len(shares) == 1
        assert 0.0 <= float(shares["value"].iloc[0]) <= 1.0


def test_each_modules_feature_basis_is_computed_once_per_session(runs, monkeypatch):
    """Read directions are fixed across steps: the session keeps each module's FeatureBlock, so
    Dᵀ(DDᵀ)⁺ is computed once per module, not once per step (directions changed in place are
    seen); the rows are those of features given afresh at every step, to the last bit."""
    from chisel.attribution import geometry

    calls: list[torch.Size] = []
    real = geometry.dual
    monkeypatch.setattr(geometry, "dual", lambda d: calls.append(d.shape) or real(d))
    run = runs["adam"]
    features = {m: (site, names, d.clone()) for m, (site, names, d) in FEATURES.items()}
    kept, fresh = C.CreditSession(run), C.CreditSession(run)

    def both(t: int) -> tuple[pd.DataFrame, pd.DataFrame]:
        gbar = random_like(run.update(t), seed=t)
        again = {m: (site, list(names), d.clone()) for m, (site, names, d) in features.items()}
        return (C.credit_rows(run, t, gbar, features_by_module=features, session=kept),
                C.credit_rows(run, t, gbar, features_by_module=again, session=fresh))

    for t in range(len(run)):
        before = len(calls)
        rows, want = both(t)
        assert len(calls) - before == (2 if t == 0 else 0) + 2  # kept: step 0 only; fresh: each
        pd.testing.assert_frame_equal(rows, want, check_exact=True)
    features["2"][2][0] = unit_rows(1, WIDTH, 9)[0]  # in place: the kept basis is made again
    before = len(calls)
    rows, want = both(len(run) - 1)
    assert len(calls) - before == 1 + 2
    pd.testing.assert_frame_equal(rows, want, check_exact=True)


def test_sample_attribution_is_the_inner_product_with_gbar(runs):
    run, t = runs["adam"], 5
    split = C.split_update(run, t)
    gbar = random_like(run.update(t))
    for b in split.blocks:
        terms = b.terms(gbar[b.param].shape)
        brute = (terms * gbar[b.param]).flatten(1).sum(1)
        assert torch.allclose(b.attribution(gbar[b.param]), brute, rtol=1e-12, atol=1e-18)


def test_feature_shares_and_residual_sum_to_each_sample(runs):
    run, t = runs["adamw"], 5
    gbar = random_like(run.update(t))
    rows = C.credit_rows(run, t, gbar, features_by_module=FEATURES, horizon=3)
    samples = rows[rows["sample"].notna()]
    keys = ["part", "param", "origin_step", "sample"]
    whole = samples[samples["feature"] == ""].set_index(keys)["value"]
    split = samples[samples["feature"] != ""].groupby(keys)["value"].sum()
    weights = whole[whole.index.get_level_values("param").str.endswith("weight")]
    assert len(split) == len(weights) == (1 + 3) * BATCH * 2
    assert (split - weights.loc[split.index]).abs().max() <= 1e-10 * weights.abs().max()
    assert set(samples["feature"]) == {"", "a", "b", "p", "q", "r", "<residual>"}
    sites = samples[samples["feature"].isin(["p", "q", "r"])]["site"]
    assert set(sites) == {"2:in"}


def test_sample_rows_carry_their_origin_steps_tags(runs):
    run, t = runs["momentum"], 4
    rows = C.credit_rows(run, t, random_like(run.update(t)), horizon=2)
    samples = rows[rows["sample"].notna()]
    assert set(samples["origin_step"]) == {2, 3, 4}
    assert set(samples["part"]) == {"gradient", "momentum"}
    for s, group in samples.groupby("origin_step"):
        assert (group["tag/episode"] == s).all()
        assert (group["tag/reward"] == group["sample"].astype(float) % 2).all()
    others = rows[rows["sample"].isna()]
    assert set(others["part"]) == {
        "weight_decay",
        "gradient (unresolved)",
        "momentum (unresolved)",
        "residual",
    }
    assert others["origin_step"].isna().all()


def test_credit_by_tag_and_by_advantage_sign(runs):
    run = runs["adam"]
    session = C.CreditSession(run)
    ledger = pd.concat(
        [C.credit_rows(run, t, random_like(run.update(t), t), session=session) for t in range(4)]
    )
    by_reward = C.credit_by(ledger, "reward")
    samples = ledger[ledger["sample"].notna() & (ledger["feature"] == "")]
    assert set(by_reward["tag/reward"]) == {0.0, 1.0}
    assert abs(by_reward["value"].sum() - samples["value"].sum()) < 1e-14
    rewarded = samples[samples["tag/reward"] == 1.0]["value"].sum()
    assert by_reward.set_index("tag/reward").loc[1.0, "value"] == pytest.approx(rewarded, rel=1e-12)
    by_sign = C.credit_by(ledger, C.sign_of("advantage"), also=("part",))
    assert {-1.0, 1.0} <= set(by_sign["sign(advantage)"])
    assert abs(by_sign["value"].sum() - samples["value"].sum()) < 1e-14
    with pytest.raises(C.CreditError, match="no tag 'nope'.*tag/reward"):
        C.credit_by(ledger, "nope")


# -- precision, groups, errors -------------------------------------------------------------------
def test_float32_training_closes_to_float32_precision(tmp_path):
    model = mlp().float()
    opt = torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=0.01)
    with chisel.record(model, opt, tmp_path / "f32", factors=True, keyframe_every=3) as rec:
        for x, y in batches():
            per_sample_loss(model, x.float(), y.float()).sum().backward()
            rec.tag(reward=torch.ones(BATCH))
            opt.step()
            opt.zero_grad()
    run = chisel.load(tmp_path / "f32")
    session = C.CreditSession(run)
    for t in range(len(run)):
        split = session.split(t)
        update = flat(split.base.update)
        assert float(flat(split.base.parts[R.RESIDUAL]).norm()) <= 1e-5 * float(update.norm())
        assert float((flat(total(split.leaves())) - update).norm()) <= 1e-12 * float(update.norm())


def test_param_groups_with_different_hyper_parameters_go_to_the_residual(tmp_path):
    def make(params):
        return torch.optim.SGD([{"params": params[:2]}, {"params": params[2:], "lr": 0.01}], lr=0.1)

    run = record(tmp_path / "groups", make)
    split = R.split_update(run, 2)
    assert "param groups differ" in split.note
    assert torch.equal(flat(split.parts[R.RESIDUAL]), flat(run.update(2)))


def test_same_hyper_parameters_in_several_groups_are_modelled(tmp_path):
    def make(params):
        return torch.optim.Adam([{"params": params[:2]}, {"params": params[2:]}], lr=0.01)

    run = record(tmp_path / "groups", make)
    split = R.split_update(run, 4)
    assert split.modelled
    assert float(flat(split.parts[R.RESIDUAL]).norm()) <= 1e-10 * float(flat(split.update).norm())


def test_bad_inputs_raise_clear_errors(runs):
    run = runs["adam"]
    gbar = random_like(run.update(1))
    with pytest.raises(C.CreditError, match=r"gbar lacks \['0.bias'\]"):
        C.credit_rows(run, 1, {n: v for n, v in gbar.items() if n != "0.bias"})
    wrong = {"2": ("2:in", ["p"], unit_rows(1, D_IN, 0))}
    with pytest.raises(C.CreditError, match="width 5 do not fit 2.weight.*width 6"):
        C.credit_rows(run, 1, gbar, features_by_module=wrong)
    with pytest.raises(C.CreditError, match="2 names but directions of shape"):
        C.credit_rows(
            run, 1, gbar, features_by_module={"2": ("2:in", ["p", "q"], unit_rows(3, WIDTH, 0))}
        )
    with pytest.raises(C.CreditError, match="horizon=-1 must be >= 0"):
        C.CreditSession(run, horizon=-1)
    with pytest.raises(C.CreditError, match="feature_rows='all'"):
        C.credit_rows(run, 1, gbar, feature_rows="all")
    with pytest.raises(chisel.errors.StepOutOfRangeError):
        C.split_update(run, len(run))
    with pytest.raises(R.ReplayError, match="another run"):
        R.split_update(runs["sgd"], 1, R.OptimizerReplay(run))
