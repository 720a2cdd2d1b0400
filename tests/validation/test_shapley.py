"""Shapley values of the pathway-reversion game: exact efficiency, the additive game, brute force."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

import chisel
import probes
from chisel.metrics import as_input
from chisel.validation import cumulative_attribution
from chisel.validation.game import ReversionGame
from tests.validation.helpers import (
    direction,
    features_at_input,
    logprob_metric,
    record_run,
    states,
    tanh_net,
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    run = record_run(tmp_path_factory.mktemp("s") / "run", tanh_net())
    obs = states()
    feats = probes.FeatureSet([features_at_input(), direction([1, 0, 0, 0, 0, 1.0], "h", "1:out", "h")])
    return run, obs, logprob_metric(obs), feats


def test_efficiency_holds_exactly_on_a_nonlinear_net(setup):
    run, _obs, metric, feats = setup
    table = chisel.pathway_shapley(run, tanh_net(seed=3), feats, metric, permutations=9, seed=4)
    effects = chisel.pathway_effects(run, tanh_net(seed=3), feats, metric)
    total = effects.metric_final.iloc[0] - effects.metric_all_reverted.iloc[0]
    assert abs(total) > 1e-3  # a real game, not a trivial one
    assert table.shapley.sum() == pytest.approx(total, abs=1e-13)
    assert table.attrs["total"] == pytest.approx(total, abs=1e-13)
    players = len(table)
    assert players == 9 and table.attrs["permutations"] == 10  # 9 → 5 antithetic pairs
    # 3 set-up runs of the metric, the 2 end points, then every interior coalition of each walk
    assert table.attrs["evaluations"] == 3 + 2 + 10 * (players - 1)
    assert (table.shapley_se > 0).all()
    again = chisel.pathway_shapley(run, tanh_net(seed=3), feats, metric, permutations=9, seed=4)
    np.testing.assert_array_equal(again.shapley, table.shapley)


def test_each_permutation_telescopes_to_the_total(setup):
    run, _obs, metric, feats = setup
    one = chisel.pathway_shapley(run, tanh_net(), feats, metric, permutations=2, seed=1)
    assert one.shapley.sum() == pytest.approx(one.attrs["total"], abs=1e-13)
    assert one.shapley_se.isna().all()  # a single antithetic pair has no spread to measure


def test_the_estimate_brackets_the_exact_shapley_values(setup):
    """Brute force over all 2^P coalitions of one weight's 5 pathways."""
    run, _obs, metric, feats = setup
    game = ReversionGame(run, tanh_net(), feats, metric, params=["0.weight"])
    players = len(game)
    coalitions = torch.tensor(list(itertools.product([0.0, 1.0], repeat=players)))
    value = dict(zip(map(tuple, coalitions.tolist()), game.values(coalitions).tolist(), strict=True))
    final = value[(0.0,) * players]
    exact = np.zeros(players)
    for s, v in value.items():
        size = int(sum(s))
        for p in range(players):
            if s[p] == 0.0:
                with_p = tuple(1.0 if i == p else x for i, x in enumerate(s))
                weight = math.factorial(size) * math.factorial(players - size - 1) / math.factorial(players)
                exact[p] += weight * ((final - value[with_p]) - (final - v))
    table = chisel.pathway_shapley(run, tanh_net(), feats, metric, permutations=400, params=["0.weight"])
    assert exact.sum() == pytest.approx(table.shapley.sum(), abs=1e-13)
    z = np.abs(table.shapley.to_numpy() - exact) / table.shapley_se.to_numpy()
    assert z.max() < 4.0, (exact, table.shapley.to_numpy(), z)


def test_an_additive_game_gives_shapley_equal_to_removal_equal_to_attribution(tmp_path):
    """A linear model and a metric linear in θ (mean logit of each state's action): the game is
    additive, so every marginal equals the single removal, and the path integral is exact."""
    model = nn.Sequential(nn.Linear(5, 3)).double()
    torch.manual_seed(0)
    run = record_run(tmp_path / "run", model, steps=5)
    obs = states()
    actions = torch.randint(0, 3, (len(obs),), generator=torch.Generator().manual_seed(2))

    def metric(m):
        return m(as_input(obs, m))[torch.arange(len(obs)), actions].mean()

    feats = features_at_input()
    ledger = chisel.attribute(run, nn.Sequential(nn.Linear(5, 3)), feats, metric, families=("integrated",))
    centred = bool((ledger.feature == "<mean>").any())  # the join follows the ledger's split
    removal = chisel.pathway_effects(run, model, feats, metric, centred=centred, groups=())
    removal = removal.set_index("pathway")
    shapley = chisel.pathway_shapley(run, model, feats, metric, centred=centred, permutations=6)
    shapley = shapley.set_index("pathway")
    np.testing.assert_allclose(shapley.shapley, removal.effect.loc[shapley.index], rtol=0, atol=1e-10)
    np.testing.assert_allclose(shapley.shapley_se, 0.0, atol=1e-10)
    totals = cumulative_attribution(ledger)
    for pathway, row in removal.iterrows():
        assert totals[(row.param, row.feature)] == pytest.approx(row.effect, abs=1e-10), pathway
    assert {"feature", "<residual>", "<bias>"} <= set(removal.kind)


def test_a_metric_vmap_cannot_trace_falls_back_to_a_loop(setup):
    run, _obs, metric, feats = setup

    def eager(model):  # .item() has no batching rule: vmap fails, the loop gives the same values
        value = metric(model)
        return value if value.item() < 0 else value.abs()  # the branch needs a Python number

    plain = chisel.pathway_shapley(run, tanh_net(), feats, metric, permutations=4)
    with pytest.warns(UserWarning, match="falling back to one evaluation per coalition"):
        looped = chisel.pathway_shapley(run, tanh_net(), feats, eager, permutations=4)
    np.testing.assert_allclose(looped.shapley, plain.shapley, rtol=0, atol=1e-13)


def test_features_only_players_share_out_the_feature_pathways_reverted_together(setup):
    run, _obs, metric, feats = setup
    table = chisel.pathway_shapley(run, tanh_net(), feats, metric, permutations=6, players="features")
    assert set(table.kind) == {"feature"} and len(table) == 3
    groups = {"all features": list(feats.names)}
    effects = chisel.pathway_effects(run, tanh_net(), feats, metric, groups=groups).set_index("pathway")
    assert table.shapley.sum() == pytest.approx(effects.effect["all features"], abs=1e-13)
    with pytest.raises(chisel.ValidationError, match="players"):
        chisel.pathway_shapley(run, tanh_net(), feats, metric, players="some")
