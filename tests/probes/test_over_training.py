"""probe_over_training: a concept absent then present in a checkpoint shows in the table."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from torch import nn

import probes
from probes import ProbeFitError
from tests.probes.helpers import n_hooks


def _checkpoints(net: nn.Sequential):
    g = torch.Generator().manual_seed(0)
    blind = {k: v.clone() for k, v in net.state_dict().items()}
    blind["0.weight"] = torch.randn(6, 4, generator=g)
    blind["0.weight"][:, 0] = 0.0  # step 0: layer 0 ignores x0
    sees = {k: v.clone() for k, v in blind.items()}
    sees["0.weight"] = torch.randn(6, 4, generator=g)  # step 100: full rank, x0 visible
    return [(0, blind), (100, sees)]


def test_concept_becomes_decodable():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3000, 4, generator=g)
    labels = {"x0_positive": x[:, 0] > 0, "x1": x[:, 1].clone()}
    table = probes.probe_over_training(
        net, _checkpoints(net), x, labels, ["0:out", "1:out"], batch_size=1000
    )
    assert list(table.columns) == ["step", "site", "concept", "metric", "score"]
    assert len(table) == 2 * 2 * 2
    score = table.set_index(["step", "site", "concept"])["score"]
    assert abs(score[0, "0:out", "x0_positive"] - 0.5) < 0.06  # chance: x0 is not there
    assert score[100, "0:out", "x0_positive"] > 0.97  # linear layer: exactly decodable
    assert score[100, "1:out", "x0_positive"] > 0.9
    assert score[0, "0:out", "x1"] > 0.999  # R² of a linear read-out of a linear layer
    assert set(table.loc[table.concept == "x1", "metric"]) == {"r2"}
    assert set(table.loc[table.concept == "x0_positive", "metric"]) == {"accuracy"}
    for k, v in net.state_dict().items():  # the model's own weights are back
        assert torch.equal(v, before[k])
    assert n_hooks(net) == 0


def test_mapping_checkpoints_and_restore_on_error():
    net = nn.Sequential(nn.Linear(4, 6))
    before = net[0].weight.clone()
    ckpts = dict(_checkpoints(net))
    x = torch.randn(200, 4)
    table = probes.probe_over_training(net, ckpts, x, {"a": x[:, 0] > 0}, "0:out")
    assert isinstance(table, pd.DataFrame) and table.step.tolist() == [0, 100]
    with pytest.raises(ProbeFitError, match="labels of concept 'a'"):
        probes.probe_over_training(net, ckpts, x, {"a": (x[:, 0] > 0)[:100]}, "0:out")
    assert torch.equal(net[0].weight, before)


def test_sequence_site_with_per_token_labels(bridge):
    tokens = torch.randint(0, 20, (60, 8), generator=torch.Generator().manual_seed(2))
    state = {k: v.clone() for k, v in bridge.state_dict().items()}
    labels = {"is_token_3": tokens == 3}
    table = probes.probe_over_training(bridge, [(7, state)], tokens, labels, "hook_embed")
    # the token embedding identifies the token: a linear probe separates it
    assert table.score.item() > 0.97 and table.step.item() == 7
