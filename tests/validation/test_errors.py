"""Errors of our own type, with text that says what is wrong and what to do."""

from __future__ import annotations

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


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return record_run(tmp_path_factory.mktemp("e") / "run", tanh_net(), steps=2)


def _calls(run):
    obs = states()
    metric = logprob_metric(obs)
    model = tanh_net()
    return [
        lambda feats, m=metric: chisel.pathway_effects(run, model, feats, m),
        lambda feats, m=metric: chisel.pathway_shapley(run, model, feats, m, permutations=2),
        lambda feats, m=metric: chisel.ablation_effects(model, feats, {"m": m}, obs),
    ]


def test_unknown_site(run):
    bad = direction([1, 0, 0, 0, 0.0], "x", "O:in", "x")  # letter O, not zero
    for call in _calls(run):
        with pytest.raises(chisel.ValidationError, match=r"Unknown site 'O:in'.*'0:in'"):
            call(bad)


def test_empty_feature_set(run):
    for call in _calls(run):
        with pytest.raises(chisel.ValidationError, match="feature set is empty"):
            call(probes.FeatureSet([]))


@pytest.mark.parametrize("scale", [0.0, 1e-300])
def test_zero_norm_feature(run, scale):
    vec = torch.ones(5, dtype=torch.float64) * scale
    bad = probes.custom("dead", "0:in", vec, normalize=False)
    for call in _calls(run):
        with pytest.raises(chisel.ValidationError, match=r"'dead'.*norm.*refit"):
            call(bad)


def test_non_scalar_metric_and_score(run):
    obs = states()
    per_state = lambda m: m(obs).sum(-1)  # noqa: E731  [N], forgot .mean()
    feats = features_at_input()
    with pytest.raises(chisel.ValidationError, match=r"shape \(64,\).*scalar.*\.mean\(\)"):
        chisel.pathway_effects(run, tanh_net(), feats, per_state)
    with pytest.raises(chisel.ValidationError, match=r"score 'v'.*scalar"):
        chisel.ablation_effects(tanh_net(), feats, {"v": per_state}, obs)


def test_other_misuses(run):
    obs = states()
    metric = logprob_metric(obs)
    feats = features_at_input()
    with pytest.raises(chisel.ValidationError, match=r"params \['2.wieght'\].*choose among"):
        chisel.pathway_effects(run, tanh_net(), feats, metric, params=["2.wieght"])
    with pytest.raises(chisel.ValidationError, match="groups"):
        chisel.pathway_effects(run, tanh_net(), feats, metric, groups=("layer",))
    with pytest.raises(chisel.ValidationError, match="does not match the run"):
        chisel.pathway_effects(run, tanh_net(width=7), feats, metric)
    with pytest.raises(chisel.ValidationError, match="non-empty mapping"):
        chisel.ablation_effects(tanh_net(), feats, metric, obs)
    with pytest.raises(chisel.ValidationError, match="permutations"):
        chisel.pathway_shapley(run, tanh_net(), feats, metric, permutations=0)
    with pytest.raises(chisel.StepOutOfRangeError):
        chisel.pathway_effects(run, tanh_net(), feats, metric, steps=range(5, 9))
    assert issubclass(chisel.ValidationError, chisel.ChiselError)


def test_a_metric_that_keeps_float32_data_is_explained(run):
    obs = states().float()
    raw = lambda m: m(obs).mean()  # noqa: E731  float32 data into a float64 copy
    with pytest.raises(chisel.ValidationError, match=r"float64.*chisel.metrics.as_input"):
        chisel.pathway_effects(run, tanh_net(), features_at_input(), raw)
