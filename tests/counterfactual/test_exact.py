"""Known answers: removing nothing gives θ_T, removing everything gives θ_0 plus the parts no
sample made, and for SGD on a loss linear in θ with the data fixed the prediction is exact."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import chisel
from chisel.attribution.credit import (
    GRADIENT_UNRESOLVED,
    MOMENTUM_UNRESOLVED,
    CreditSession,
    split_update,
)
from chisel.attribution.optim_replay import RESIDUAL, WEIGHT_DECAY
from chisel.counterfactual import CounterfactualError, counterfactual, samples, tag_in

D_IN, D_OUT, BATCH, STEPS = 4, 3, 5, 6


def _data(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    xs = torch.randn(STEPS, BATCH, D_IN, generator=gen, dtype=torch.float64)
    cs = torch.randn(STEPS, BATCH, D_OUT, generator=gen, dtype=torch.float64)
    return xs, cs


def _linear_loss(model: nn.Module, x: torch.Tensor, c: torch.Tensor, keep: torch.Tensor):
    """Σ_i keep_i · c_iᵀ(W x_i + b) / n: linear in θ, so its gradient does not depend on θ."""
    return ((model(x) * c).sum(-1) * keep).sum() / x.shape[0]


def _train(path, make_opt, removed: set[tuple[int, int]] = frozenset(), record=True):
    torch.manual_seed(0)
    model = nn.Linear(D_IN, D_OUT).double()
    opt = make_opt(model.parameters())
    xs, cs = _data()
    ctx = chisel.record(model, opt, path, factors=True, dtype="float64", keyframe_every=4) if record else None
    rec = ctx.__enter__() if ctx else None
    for t in range(STEPS):
        keep = torch.tensor([0.0 if (t, i) in removed else 1.0 for i in range(BATCH)], dtype=torch.float64)
        _linear_loss(model, xs[t], cs[t], keep).backward()
        if rec is not None:
            rec.tag(reward=(torch.arange(BATCH) % 2).double(), episode_id=torch.arange(BATCH) + t)
        opt.step()
        opt.zero_grad()
    if ctx:
        ctx.__exit__(None, None, None)
    return model


def _metric_states():
    gen = torch.Generator().manual_seed(7)
    return torch.randn(11, D_IN, generator=gen, dtype=torch.float64), torch.randn(11, D_OUT, generator=gen, dtype=torch.float64)


def _linear_metric(model):
    x, c = _metric_states()
    return (model(chisel.metrics.as_input(x, model)) * c.to(next(model.parameters()).dtype)).sum()


SGDS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1),
    "momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.3),
    "nesterov": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.8, nesterov=True),
}


@pytest.mark.parametrize("name", SGDS)
def test_linear_loss_sgd_prediction_equals_retraining(tmp_path, name):
    removed = {(0, 1), (0, 4), (2, 0), (3, 3), (5, 2), (5, 4)}
    model = _train(tmp_path / "run", SGDS[name])
    run = chisel.load(tmp_path / "run")
    cf = counterfactual(run, model, remove=samples(removed), metric=_linear_metric, horizon=STEPS)
    actual = _train(None, SGDS[name], removed, record=False)
    for n, p in actual.named_parameters():
        torch.testing.assert_close(cf.predicted[n], p.detach(), rtol=0, atol=1e-13)
    assert cf.metric_predicted == pytest.approx(float(_linear_metric(actual).detach()), abs=1e-12)
    assert abs(cf.delta_metric) > 1e-3  # the removal mattered: the test could fail
    assert cf.removed_weight == len(removed) and cf.samples == STEPS * BATCH


def test_tag_predicate_and_sample_set_agree(tmp_path):
    _train(tmp_path / "run", SGDS["momentum"])
    run = chisel.load(tmp_path / "run")
    odd = {(t, i) for t in range(STEPS) for i in range(BATCH) if i % 2}
    by_tag = counterfactual(run, remove=tag_in("reward", 1), horizon=STEPS)
    by_fn = counterfactual(run, remove=lambda tags: tags["reward"] == 1, horizon=STEPS)
    by_set = counterfactual(run, remove=odd, horizon=STEPS)
    for n in by_set.predicted:
        torch.testing.assert_close(by_tag.predicted[n], by_set.predicted[n], rtol=0, atol=0)
        torch.testing.assert_close(by_fn.predicted[n], by_set.predicted[n], rtol=0, atol=0)


def _bandit(path, opt_name: str):
    """REINFORCE on a 2-armed contextual bandit (as tests/attribute/test_planted_bandit.py)."""
    torch.manual_seed(3)
    gen = torch.Generator().manual_seed(3)
    policy = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    opt = {
        "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
        "adam_l2": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=0.05),
    }[opt_name](policy.parameters())
    with chisel.record(policy, opt, path, factors=True, dtype="float64", keyframe_every=5) as rec:
        for _ in range(12):
            cue = torch.randint(0, 2, (16,), generator=gen)
            obs = torch.cat([cue[:, None].double(), torch.randn(16, 3, generator=gen, dtype=torch.float64)], 1)
            dist = torch.distributions.Categorical(logits=policy(obs))
            action = dist.sample()
            reward = (action == cue).double()
            (-(dist.log_prob(action) * (reward - reward.mean())).mean()).backward()
            nn.utils.clip_grad_norm_(policy.parameters(), 0.5)
            rec.tag(reward=reward)
            opt.step()
            opt.zero_grad()
    return policy, chisel.load(path)


def _non_sample_sum(run, horizon):
    session = CreditSession(run, horizon=horizon)
    total = {n: v.double().clone() for n, v in run.params(0).items()}
    for t in range(len(run)):
        leaves = split_update(run, t, session).leaves()
        for leaf in (WEIGHT_DECAY, GRADIENT_UNRESOLVED, MOMENTUM_UNRESOLVED, RESIDUAL):
            for n, v in leaves[leaf].items():
                total[n] += v
    return total


@pytest.mark.parametrize("opt_name,horizon", [("adamw", None), ("adam_l2", 2)])
def test_bandit_all_and_nothing(tmp_path, opt_name, horizon):
    _, run = _bandit(tmp_path / "run", opt_name)
    final = run.params(len(run))
    none = counterfactual(run, remove=None, horizon=horizon)
    for n, v in final.items():
        assert torch.equal(none.predicted[n], v.double())
    every = counterfactual(run, remove="all", horizon=horizon)
    expected = _non_sample_sum(run, horizon)
    for n in expected:
        torch.testing.assert_close(every.predicted[n], expected[n], rtol=0, atol=1e-13)
        torch.testing.assert_close(every.predicted[n], every.initial[n] + every.non_sample[n], rtol=0, atol=1e-13)
    # weight decay is a real part here: θ_0 alone would be a different answer
    assert max(float((every.predicted[n] - every.initial[n]).abs().max()) for n in expected) > 1e-4
    # removals add up: rewarded + unrewarded samples = every sample
    hit = counterfactual(run, remove=tag_in("reward", 1), horizon=horizon)
    miss = counterfactual(run, remove=tag_in("reward", 0), horizon=horizon)
    for n in expected:
        torch.testing.assert_close(hit.removed[n] + miss.removed[n], every.removed[n], rtol=0, atol=1e-13)
    assert every.samples == every.removed_weight == 12 * 16
    assert hit.removed_weight + miss.removed_weight == 12 * 16 and 0 < hit.removed_weight < 12 * 16


def test_until_predicts_the_prefix(tmp_path):
    _train(tmp_path / "run", SGDS["sgd"])
    run = chisel.load(tmp_path / "run")
    cf = counterfactual(run, remove="all", until=3)
    for n, v in run.params(0).items():  # plain SGD on a linear loss: no non-sample part at all
        torch.testing.assert_close(cf.predicted[n], v.double(), rtol=0, atol=1e-14)
    assert cf.step == 3 and cf.steps == 3


def test_bad_inputs_say_what_to_do(tmp_path):
    model = _train(tmp_path / "run", SGDS["sgd"])
    run = chisel.load(tmp_path / "run")
    with pytest.raises(CounterfactualError, match="no tag 'colour'"):
        counterfactual(run, remove=tag_in("colour", 1))
    with pytest.raises(CounterfactualError, match="one bool"):
        counterfactual(run, remove=lambda tags: torch.ones(BATCH + 1, dtype=torch.bool))
    with pytest.raises(CounterfactualError, match="until=99"):
        counterfactual(run, remove="all", until=99)
    with pytest.raises(CounterfactualError, match="needs the model"):
        counterfactual(run, remove="all", metric=_linear_metric)
    with pytest.raises(CounterfactualError, match="'some'"):
        counterfactual(run, model, remove="some")
    with pytest.raises(CounterfactualError, match="does not exist"):
        counterfactual(run, remove={0: [BATCH]})
    torch.manual_seed(0)
    bare = nn.Linear(D_IN, D_OUT).double()
    opt = torch.optim.SGD(bare.parameters(), lr=0.1)
    with chisel.record(bare, opt, tmp_path / "bare", dtype="float64") as rec:
        _linear_loss(bare, *_data()[0][:1], _data()[1][0], torch.ones(BATCH)).backward()
        rec.tag(reward=torch.ones(BATCH))
        opt.step()
    with pytest.raises(CounterfactualError, match="no per-sample factors"):
        counterfactual(chisel.load(tmp_path / "bare"), remove="all")


def test_default_horizon_is_credits_one_percent_rule(tmp_path):
    """horizon=None resolves to the steps whose momentum weight is >= 1% (credit's default), so
    the prediction equals the one with credit's own default session."""
    _, run = _bandit(tmp_path / "run", "adamw")
    from chisel.counterfactual.predict import default_horizon

    assert default_horizon(run) == 44  # 0.9**43 >= 0.01 > 0.9**44
    cf = counterfactual(run, remove="all")
    assert cf.horizon == 44
    session = CreditSession(run)  # credit's default: min_weight 1e-2, reach 500
    expected = {n: v.double().clone() for n, v in run.params(0).items()}
    for t in range(len(run)):
        split = split_update(run, t, session)
        for leaf in (WEIGHT_DECAY, RESIDUAL):
            for n, v in split.base.parts[leaf].items():
                expected[n] += v
        for leaf in (GRADIENT_UNRESOLVED, MOMENTUM_UNRESOLVED):
            for n, v in split.unresolved[leaf].items():
                expected[n] += v
    for n in expected:
        torch.testing.assert_close(cf.predicted[n], expected[n], rtol=0, atol=1e-13)


def test_a_tied_weight_removes_the_samples_of_both_its_modules(tmp_path):
    """GPT-2's wte is read by the embedding and written by the LM head: two sample blocks per step
    for one param. Removing every sample must leave θ_0 + the non-sample parts for it too."""
    pytest.importorskip("transformers")
    from tests.attribute.test_credit_transformer import TIED, record

    run = record(tmp_path / "gpt2", True)
    every = counterfactual(run, remove="all", horizon=2)
    expected = _non_sample_sum(run, 2)
    scale = float(run.update(0)[TIED].abs().max())
    for n in (TIED, "transformer.wpe.weight", "transformer.h.0.ln_1.weight"):
        torch.testing.assert_close(every.predicted[n], expected[n], rtol=0, atol=1e-12 * scale)
    nothing = counterfactual(run, remove=None, horizon=2)
    assert torch.equal(nothing.predicted[TIED], run.params(len(run))[TIED].double())
