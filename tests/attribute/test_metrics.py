"""The built-in metrics against direct computations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import chisel


def test_metrics_match_direct_computation():
    torch.manual_seed(0)
    model = nn.Linear(3, 4).double()
    obs = torch.randn(10, 3)
    where = torch.arange(10) % 2 == 0
    actions = torch.randint(0, 4, (10,))
    out = model(obs.double())
    m = chisel.metrics
    assert m.action_logit(obs, 2, where=where)(model).item() == pytest.approx(out[where][:, 2].mean().item())
    assert m.action_prob(obs, 1)(model).item() == pytest.approx(out.softmax(-1)[:, 1].mean().item())
    logp = out.log_softmax(-1)[torch.arange(10), actions].mean()
    assert m.logprob(obs, actions)(model).item() == pytest.approx(logp.item())
    ref = torch.randn(10, 4)
    kl = (ref.log_softmax(-1).exp() * (ref.double().log_softmax(-1) - out.log_softmax(-1))).sum(-1).mean()
    assert m.kl_to(ref, obs)(model).item() == pytest.approx(kl.item())
    assert m.value(obs, value_fn=lambda mod, o: mod(o)[:, 0])(model).item() == pytest.approx(out[:, 0].mean().item())
    with pytest.raises(ValueError, match="selects no state"):
        m.action_prob(obs, 1, where=torch.zeros(10, dtype=torch.bool))
