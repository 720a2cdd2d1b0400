"""Traps found by trying chisel on ordinary models: in-place activations and train mode.

All sums in float64; completeness must close to 1e-10 relative (it closes to ~1e-14).
"""

from __future__ import annotations

import warnings

import pandas as pd
import pytest
import torch
from torch import nn

import chisel
import probes
from chisel.attribution import ledger as L
from chisel.attribution.functional import TrainModeWarning, _mode_dependent_modules
from chisel.attribution.weights import bind_sites, linear_weights
from tests.attribute.helpers import record_policy_gradient

KEY = ["step", "family", "param", "site", "feature", "quantity"]

# piecewise-linear activations with an in-place option; Hardtanh(-0.5, 0.5) crosses both breakpoints
ACTIVATIONS = {
    "relu": lambda inplace: nn.ReLU(inplace=inplace),
    "leaky_relu": lambda inplace: nn.LeakyReLU(0.1, inplace=inplace),
    "relu6": lambda inplace: nn.ReLU6(inplace=inplace),
    "hardtanh": lambda inplace: nn.Hardtanh(-0.5, 0.5, inplace=inplace),
}


def _mlp(act, width: int = 32, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, width), act(), nn.Linear(width, width), act(), nn.Linear(width, 3)
    ).double()


def _metric(seed: int = 5):
    gen = torch.Generator().manual_seed(seed)
    obs = torch.randn(40, 6, generator=gen)
    return chisel.metrics.logprob(obs, torch.randint(0, 3, (40,), generator=gen))


def _features(width: int = 32) -> probes.FeatureSet:
    gen = torch.Generator().manual_seed(3)
    return probes.FeatureSet(
        [probes.custom(f"h{i}", "3:out", torch.randn(width, generator=gen)) for i in range(2)]
        + [probes.custom("pre", "2:out", torch.randn(width, generator=gen))]  # written by 2.weight
        + [probes.custom("obs_dir", "0:in", torch.randn(6, generator=gen))]
    )


def _rows(ledger: pd.DataFrame) -> pd.Series:
    return ledger.set_index(KEY).value.sort_index()


def _bindings(model: nn.Module, sites: list[str], run_forward=None) -> dict[str, tuple]:
    weights = linear_weights(model, {n for n, _ in model.named_parameters()})
    obs = torch.randn(5, 6, dtype=torch.float64)
    bound = bind_sites(model, weights, sites, run_forward or (lambda: model(obs)))
    return {w.param: (w.in_sites, w.out_sites) for w in bound}


# --- in-place activations ------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_inplace_activation_closes_and_matches_the_out_of_place_model(tmp_path, name):
    make = ACTIVATIONS[name]
    inplace, plain = _mlp(lambda: make(True)), _mlp(lambda: make(False))
    optimizer = torch.optim.Adam(inplace.parameters(), lr=3e-2)
    run = record_policy_gradient(tmp_path / "run", inplace, optimizer, steps=3)
    metric = _metric()
    ours, reference = (
        chisel.attribute(run, m, _features(), metric, families=("integrated",)) for m in (inplace, plain)
    )
    completeness = ours[ours.quantity == L.COMPLETENESS_REL].value
    assert len(completeness) == len(run)
    # before the fix: 3e-2 for ReLU/ReLU6, 8e-3 for Hardtanh (the kinks were not found)
    assert (completeness <= 1e-10).all(), completeness
    a, b = _rows(ours), _rows(reference)
    assert list(a.index) == list(b.index)  # same rows: the features bind to the same weights
    assert ((a - b).abs() <= 1e-10 * b.abs().clip(lower=1.0)).all()


def test_inplace_relu_keeps_pre_and_post_activation_sites_apart():
    bound = _bindings(_mlp(lambda: nn.ReLU(inplace=True)), ["0:out", "1:out", "2:in"])
    assert bound["0.weight"] == ((), ("0:out",))  # the pre-activation is what 0.weight writes
    # the rectified tensor is what 2.weight reads: the activation's :out and 2:in are one site
    assert bound["2.weight"] == (("1:out", "2:in"), ())


def test_out_of_place_bindings_are_unchanged():
    bound = _bindings(_mlp(nn.ReLU), ["0:out", "1:in", "1:out", "2:in"])
    assert bound["0.weight"] == ((), ("0:out", "1:in"))
    assert bound["2.weight"] == (("1:out", "2:in"), ())


def test_hook_point_after_an_inplace_relu_binds_to_the_next_linear():
    from transformer_lens import HookedRootModule
    from transformer_lens.hook_points import HookPoint

    class Policy(HookedRootModule):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.act, self.hook_hidden = nn.Linear(6, 8), nn.ReLU(inplace=True), HookPoint()
            self.head = nn.Linear(8, 3)
            self.setup()

        def forward(self, x):
            return self.head(self.hook_hidden(self.act(self.fc1(x))))

    torch.manual_seed(0)
    model = Policy().double()
    bound = _bindings(model, ["fc1:out", "act:out", "hook_hidden", "head:in"])
    assert bound["fc1.weight"] == ((), ("fc1:out",))
    assert bound["head.weight"] == (("act:out", "hook_hidden", "head:in"), ())


def test_binding_works_when_the_metric_runs_in_inference_mode():
    model = _mlp(nn.ReLU)
    obs = torch.randn(5, 6, dtype=torch.float64)

    def forward():
        with torch.inference_mode():  # inference tensors carry no version counter
            return model(obs)

    bound = _bindings(model, ["1:out", "2:in"], forward)
    assert bound["2.weight"] == (("1:out", "2:in"), ())


# --- train mode ----------------------------------------------------------------------------


def _dropout_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Dropout(0.2), nn.Linear(32, 3)).double()


def test_train_mode_dropout_is_evaluated_in_eval_mode_with_a_warning(tmp_path):
    model = _dropout_model()
    run = record_policy_gradient(tmp_path / "run", model, torch.optim.Adam(model.parameters(), lr=1e-2), steps=3)
    model.train()  # as the Hugging Face Trainer leaves it
    with pytest.warns(TrainModeWarning, match=r"train mode.*2 \(Dropout\).*eval-mode copy") as caught:
        ledger = chisel.attribute(run, model, None, _metric(), families=("integrated",))
    assert "model.eval()" in str(caught[0].message)
    assert chisel.TrainModeWarning is TrainModeWarning and issubclass(TrainModeWarning, UserWarning)
    assert caught[0].filename == __file__  # points at the caller of chisel.attribute
    completeness = ledger[ledger.quantity == L.COMPLETENESS_REL].value
    # before the fix: 0.25 (every evaluation drew a new dropout mask)
    assert len(completeness) == len(run) and (completeness <= 1e-10).all(), completeness
    assert all(m.training for m in model.modules())  # the user's model keeps its mode
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", TrainModeWarning)
        in_eval = chisel.attribute(run, model, None, _metric(), families=("integrated",))
    assert not any(m.training for m in model.modules())
    assert ((_rows(ledger) - _rows(in_eval)).abs() <= 1e-12).all()


def test_train_mode_without_mode_dependent_modules_warns_nothing(tmp_path):
    model = _mlp(nn.Tanh)
    run = record_policy_gradient(tmp_path / "run", model, torch.optim.Adam(model.parameters(), lr=1e-2), steps=1)
    assert model.training
    with warnings.catch_warnings():
        warnings.simplefilter("error", TrainModeWarning)
        chisel.attribute(run, model, None, _metric(), families=("integrated",))
    assert model.training


class _NoisyLinear(nn.Linear):
    """A user module with a different forward in training (NoisyNet-style exploration)."""

    def forward(self, x):
        if self.training:
            return super().forward(x) + torch.randn_like(super().forward(x))
        return super().forward(x)


class _Checkpointed(nn.Module):
    """Reads self.training only to gate gradient checkpointing, as every HF model does."""

    def __init__(self) -> None:
        super().__init__()
        self.gradient_checkpointing = False

    def forward(self, x):
        if self.gradient_checkpointing and self.training:
            return x
        return x


@pytest.mark.parametrize(
    ("module", "flagged"),
    [
        (nn.Dropout(0.1), True),
        (nn.Dropout(0.0), False),
        (nn.AlphaDropout(0.1), True),
        (nn.Dropout2d(0.1), True),
        (nn.BatchNorm1d(4), True),
        (nn.BatchNorm1d(4, track_running_stats=False), False),  # batch statistics in both modes
        (nn.InstanceNorm1d(4), False),
        (nn.InstanceNorm1d(4, track_running_stats=True), True),
        (nn.MultiheadAttention(4, 2, dropout=0.1), True),
        (nn.MultiheadAttention(4, 2), False),
        (nn.RReLU(), True),
        (nn.Linear(4, 4), False),
        (nn.LayerNorm(4), False),
        (_NoisyLinear(4, 4), True),
        (_Checkpointed(), False),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else str(v),
)
def test_which_modules_count_as_mode_dependent(module, flagged):
    model = nn.Sequential(nn.Linear(4, 4), module)
    assert bool(_mode_dependent_modules(model.train())) is flagged
    assert _mode_dependent_modules(model.eval()) == []


def test_the_demo_path_evaluates_the_metric_in_eval_mode(tmp_path):
    from chisel.agents.ppo import TrashAgent

    agent = TrashAgent(5, 3, hidden=8, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.Adam(agent.parameters(), lr=1e-2)
    obs = torch.randn(16, 5, generator=torch.Generator().manual_seed(1))
    with chisel.record(agent, optimizer, tmp_path / "run", dtype="float64"):
        for _ in range(2):
            logits, value = agent(obs)
            (logits.logsumexp(-1).mean() + value.pow(2).mean()).backward()
            optimizer.step()
            optimizer.zero_grad()
    run = chisel.load(tmp_path / "run")
    logprob = chisel.metrics.logprob(obs, torch.zeros(16, dtype=torch.long))
    modes: set[bool] = set()

    def metric(model):
        modes.update(m.training for m in model.modules())
        return logprob(model)

    assert agent.training  # the demo trains the agent and attributes it as it is
    features = [probes.custom("d", "hook_pi_hidden1", torch.randn(8))]
    chisel.attribute(run, agent, features, metric, families=("integrated",))
    assert modes == {False}
    assert all(m.training for m in agent.modules())


def test_probes_capture_still_runs_the_model_in_its_own_mode():
    model = _dropout_model().train()
    obs = torch.randn(64, 6, dtype=torch.float64)
    first, second = (probes.capture(model, obs, "2:out")["2:out"] for _ in range(2))
    assert not torch.equal(first, second)  # dropout active: capture leaves the mode as it is
    assert model.training
    model.eval()
    first, second = (probes.capture(model, obs, "2:out")["2:out"] for _ in range(2))
    assert torch.equal(first, second)


class _CachingPolicy(nn.Module):
    """Keeps the last forward's output (with its graph) and a distribution over it, like
    Stable-Baselines3's policy.action_dist after training."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
        self.last = None
        self.dist = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        self.last = out
        self.dist = torch.distributions.Categorical(logits=out)
        return out


def test_a_model_holding_tensors_with_history_can_be_attributed(tmp_path):
    import copy

    torch.manual_seed(0)
    model = _CachingPolicy().double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with chisel.record(model, opt, tmp_path / "run", dtype="float64"):
        for _ in range(2):
            model(torch.randn(4, 6, dtype=torch.float64)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    with pytest.raises(RuntimeError, match="deepcopy"):
        copy.deepcopy(model)  # the trap: plain deepcopy refuses the cached non-leaf tensors
    obs = torch.randn(8, 6, dtype=torch.float64)
    metric = chisel.metrics.logprob(obs, torch.zeros(8, dtype=torch.long))
    ledger = chisel.attribute(tmp_path / "run", model, None, metric, families=("integrated",))
    comp = ledger[ledger.quantity == "completeness_rel"].value
    assert len(comp) == 2 and comp.max() < 1e-10
    assert model.last.grad_fn is not None  # the user's model is untouched
    effects = chisel.pathway_effects(
        tmp_path / "run", model, [probes.custom("f", "net.2:in", torch.randn(8))], metric
    )
    assert len(effects) and effects["effect"].notna().all()


def test_a_forward_patched_on_the_instance_does_not_run_the_original(recwarn):
    """TRL/accelerate wrap `model.forward` in a closure over the original model: the private copy
    must run its own modules (else its hooks never fire and the metric reads the wrong θ)."""
    from chisel.attribution.copying import ForwardPatchWarning, private_copy

    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    original = model.forward
    model.forward = lambda *a, **k: original(*a, **k)  # a closure over the original model
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        copied = private_copy(model)
    assert any(issubclass(w.category, ForwardPatchWarning) for w in seen)
    with torch.no_grad():
        copied[0].weight.zero_()
        copied[0].bias.fill_(1.0)
    x = torch.randn(4, 3)
    assert torch.equal(copied(x), torch.ones(4, 2))  # the copy's own parameters
    assert "forward" in model.__dict__  # the user's model is left as it was
    # a plain bound method of the module itself is kept, silently
    plain = torch.nn.Linear(3, 2)
    plain.forward = plain.forward
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kept = private_copy(plain)
    assert kept.forward.__self__ is kept
