"""Feature ablation: centred projection at module and HookPoint sites, against hand values."""

from __future__ import annotations

import pytest
import torch

import chisel
import probes
from chisel.agents.ppo import TrashAgent
from tests.validation.helpers import direction, logprob_metric, states, tanh_net


def _hooks_empty(model) -> bool:
    return all(
        not m._forward_hooks and not m._forward_pre_hooks and not getattr(m, "fwd_hooks", [])
        for m in model.modules()
    )


def test_a_direction_the_score_does_not_read_changes_nothing():
    model = tanh_net()
    with torch.no_grad():
        model[2].weight[:, 0] = 0.0  # hidden unit 0 is read by nobody
    obs = states()
    metric = logprob_metric(obs)
    unused = [direction([1, 0, 0, 0, 0, 0.0], f"u@{s}", s, "u") for s in ("1:out", "2:in")]
    table = chisel.ablation_effects(model, unused, {"metric": metric}, obs)
    assert table.effect.abs().max() < 1e-12
    assert (table.baseline != 0).all()


def test_centring_keeps_a_constant_direction_and_plain_projection_does_not():
    model = tanh_net()
    obs = states()
    obs[:, 4] = 2.0  # constant input: centred ablation of it removes nothing
    metric = logprob_metric(obs)
    const = direction([0, 0, 0, 0, 1.0], "c", "0:in", "c")
    centred = chisel.ablation_effects(model, const, {"m": metric}, obs)
    plain = chisel.ablation_effects(model, const, {"m": metric}, obs, centred=False)
    assert abs(centred.effect.iloc[0]) < 1e-12
    assert abs(plain.effect.iloc[0]) > 1e-3


def test_effect_matches_the_hand_projection():
    model = tanh_net()
    obs = states()
    metric = logprob_metric(obs)
    f = probes.custom("f", "0:in", torch.tensor([2.0, -1, 0.5, 0, 1], dtype=torch.float64), normalize=False)
    d = f.read / f.read.norm()
    mu = obs.mean(0)
    ablated = obs - ((obs - mu) @ d)[:, None] * d
    with torch.no_grad():
        want = float(metric(model)) - float(logprob_metric(ablated)(model))
    table = chisel.ablation_effects(model, f, {"m": metric, "twice": lambda m: 2 * metric(m)}, obs)
    assert list(table.score) == ["m", "twice"] and list(table.feature) == ["f", "f"]
    assert table.effect.iloc[0] == pytest.approx(want, abs=1e-12)
    assert table.effect.iloc[1] == pytest.approx(2 * want, abs=1e-12)


def test_a_hook_point_site_equals_the_module_input_it_feeds():
    agent = TrashAgent(8, 3, hidden=5, generator=torch.Generator().manual_seed(0))
    obs = torch.randn(40, 8, generator=torch.Generator().manual_seed(1))
    metric = chisel.metrics.logprob(obs, torch.arange(40) % 3)
    read = torch.tensor([1.0, -2, 0.5, 0, 1])
    feats = [probes.custom(f"f@{s}", s, read) for s in ("hook_pi_hidden1", "pi_fc2:in")]
    table = chisel.ablation_effects(agent, feats, {"m": metric}, obs, dtype=torch.float64)
    assert abs(table.effect.iloc[0]) > 1e-7  # small: pi_out starts at gain 0.01
    assert table.effect.iloc[0] == pytest.approx(table.effect.iloc[1], abs=1e-12)
    assert _hooks_empty(agent) and next(agent.parameters()).dtype == torch.float32


def test_the_users_model_is_untouched_even_when_a_score_fails():
    model = tanh_net().train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    obs = states()
    feats = [direction([1, 0, 0, 0, 0.0], "x", "0:in", "x")]
    chisel.ablation_effects(model, feats, {"m": logprob_metric(obs)}, obs)
    calls = []

    def failing(m):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("boom")
        return 0.0

    with pytest.raises(RuntimeError, match="boom"):
        chisel.ablation_effects(model, feats, {"bad": failing}, obs)
    assert model.training and _hooks_empty(model)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
