"""The catalogue of bad attribution inputs (issue 13): one case per line, input → expected error.

Each case calls `chisel.attribute` (or a validation function) on a small recorded run with one
bad input and names the error class and words its message must contain. `OK` cases must run and
return a correct result (numpy steps are steps). See tests/chisel/test_bad_inputs.py for record,
load, the store, the CLI and probes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import chisel
import probes
from chisel.attribution.credit import CreditError
from chisel.attribution.functional import MetricError
from chisel.errors import StepTypeError

OK = "ok"


@dataclass(frozen=True)
class Case:
    name: str
    call: Callable[[Any], Any]
    error: Any
    words: str = ""


class Ctx:
    def __init__(self, root: Path) -> None:
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
        opt = torch.optim.Adam(self.model.parameters(), lr=1e-2)
        with chisel.record(self.model, opt, root / "run", factors=True) as rec:
            for _ in range(3):
                self.model(torch.randn(4, 6)).pow(2).mean().backward()
                rec.tag(advantage=torch.randn(4), source=["a", "b", "c", "d"])
                opt.step()
                opt.zero_grad()
        self.root = root
        self.run = chisel.load(root / "run")
        self.obs = torch.randn(8, 6)
        self.metric = chisel.metrics.logprob(self.obs, torch.zeros(8, dtype=torch.long))
        self.feature = probes.custom("f", "2:in", torch.randn(16))

    def attribute(self, features: Any = None, metric: Any = None, **options: Any) -> Any:
        options.setdefault("families", ("integrated",))
        return chisel.attribute(self.run, self.model, features, metric or self.metric, **options)


def _numpy_steps(ctx: Ctx) -> None:
    ledger = ctx.attribute(steps=np.arange(2))
    assert sorted(set(ledger.step)) == [0, 1]
    assert sorted(set(ctx.attribute(steps=torch.tensor(2)).step)) == [2]


def _detached(ctx: Ctx) -> Any:
    return ctx.attribute(metric=lambda m: m(chisel.metrics.as_input(ctx.obs, m)).sum().detach())


A = chisel.AttributionInputError
CASES = [
    Case("steps as numpy ints and a 0-d tensor", _numpy_steps, OK),
    Case("steps=[True]", lambda c: c.attribute(steps=[True]), StepTypeError, "not an integer"),
    Case("steps=['1']", lambda c: c.attribute(steps=["1"]), StepTypeError, "not an integer"),
    Case("steps=[1.0]", lambda c: c.attribute(steps=[1.0]), StepTypeError, "not an integer"),
    Case("steps=[3] beyond the run", lambda c: c.attribute(steps=[3]), chisel.StepOutOfRangeError, r"outside the run.*0\.\.2"),
    Case("steps=[-1]", lambda c: c.attribute(steps=[-1]), chisel.StepOutOfRangeError, "outside the run"),
    Case("families='geometry' (a string)", lambda c: c.attribute(families="geometry"), A, r"is a string.*\('geometry',\)"),
    Case("families=('vibes',)", lambda c: c.attribute(families=("vibes",)), A, "unknown families"),
    Case("points=0", lambda c: c.attribute(points=0), A, "points=0.*int >= 1"),
    Case("points=2.5", lambda c: c.attribute(points=2.5), A, "int >= 1"),
    Case("points=True", lambda c: c.attribute(points=True), A, "int >= 1"),
    Case("split='bogus'", lambda c: c.attribute(split="bogus"), A, "split='bogus'.*auto"),
    Case("dtype=torch.int64", lambda c: c.attribute(dtype=torch.int64), A, "floating dtype"),
    Case("dtype='float64' (a string)", lambda c: c.attribute(dtype="float64"), A, "floating dtype"),
    Case("device='bogus'", lambda c: c.attribute(device="bogus"), A, "not a torch device"),
    Case("out=<a directory>", lambda c: c.attribute(out=c.root), A, "is a directory.*ledger.parquet"),
    Case("credit_by='advantage' (a string)", lambda c: c.attribute(families=("credit",), credit_by="advantage"), A, r"is a string.*\['advantage'\]"),
    Case("credit_by a tag of strings", lambda c: c.attribute(families=("credit",), credit_by=["source"]), CreditError, "numeric tag.*map strings to codes"),
    Case("credit_by an unknown tag", lambda c: c.attribute(families=("credit",), credit_by=["nope"]), CreditError, "numeric tag"),
    Case("horizon=-1", lambda c: c.attribute(families=("credit",), horizon=-1), CreditError, "horizon=-1 must be >= 0"),
    Case("a detached metric", _detached, MetricError, "no gradient.*detached"),
    Case("a constant metric", lambda c: c.attribute(metric=lambda m: torch.tensor(1.0, dtype=torch.float64)), MetricError, "no gradient"),
    Case("a metric returning a float", lambda c: c.attribute(metric=lambda m: 1.0), MetricError, "scalar tensor"),
    Case("a metric returning a vector", lambda c: c.attribute(metric=lambda m: m(chisel.metrics.as_input(c.obs, m))), MetricError, r"returned \(8, 3\)"),
    Case("a metric returning NaN", lambda c: c.attribute(metric=lambda m: m(chisel.metrics.as_input(c.obs, m)).sum() * float("nan")), MetricError, "finite"),
    Case("float32 data in a float64 metric", lambda c: c.attribute(metric=lambda m: m(c.obs).sum()), MetricError, "as_input"),
    Case("a feature at an unknown site", lambda c: c.attribute(features=[probes.custom("f", "2:inn", torch.randn(16))]), probes.UnknownSiteError, "Closest valid sites"),
    Case("a feature of the wrong width", lambda c: c.attribute(features=[probes.custom("f", "2:in", torch.randn(5))]), probes.FeatureDimensionError, "dimension 5"),
    Case("a zero read vector", lambda c: c.attribute(features=[probes.Feature(name="z", site="2:in", read=torch.zeros(16))]), A, "near-zero"),
    Case("a 1e-300 read vector", lambda c: c.attribute(features=[probes.Feature(name="z", site="2:in", read=torch.full((16,), 1e-300, dtype=torch.float64))]), A, "near-zero"),
    Case("a feature at a weight's output (write side only)", lambda c: c.attribute(features=[probes.custom("f", "2:out", torch.randn(3))], metric=lambda m: nn.functional.log_softmax(m(chisel.metrics.as_input(c.obs, m)), -1)[:, 0].mean()), OK),
    Case("a model of another architecture", lambda c: chisel.attribute(c.run, nn.Sequential(nn.Linear(6, 2)), None, c.metric), A, "does not match"),
    Case("pathway_effects with no features", lambda c: chisel.pathway_effects(c.run, c.model, [], c.metric), chisel.ValidationError, "feature"),
    Case("pathway_shapley permutations=0", lambda c: chisel.pathway_shapley(c.run, c.model, [c.feature], c.metric, permutations=0), chisel.ValidationError, "permutations=0"),
    Case("pathway_shapley players='some'", lambda c: chisel.pathway_shapley(c.run, c.model, [c.feature], c.metric, players="some"), chisel.ValidationError, "players='some'"),
    Case("ablation at an unknown site", lambda c: chisel.ablation_effects(c.model, [probes.custom("f", "9:in", torch.randn(16))], {"m": c.metric}, c.obs), Exception, "9:in"),
]


@pytest.fixture(scope="module")
def ctx(tmp_path_factory) -> Ctx:
    return Ctx(tmp_path_factory.mktemp("bad_attribution"))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_attribution_input(ctx, case):
    if case.error is OK:
        case.call(ctx)
        return
    with pytest.raises(case.error, match=case.words) as info:
        case.call(ctx)
    assert isinstance(info.value, (chisel.ChiselError, probes.ProbesError)), type(info.value)


def test_a_failed_output_path_leaves_no_temporary_file(ctx, tmp_path):
    with pytest.raises(chisel.AttributionInputError):
        ctx.attribute(out=tmp_path)
    assert not list(tmp_path.glob(".tmp-*")) and not list(ctx.root.glob(".tmp-*"))
