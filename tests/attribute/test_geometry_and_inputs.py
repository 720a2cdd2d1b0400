"""Geometry known answers, feature binding, bad input, the parquet ledger and the timeline."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import chisel
import probes
from chisel.attribution import ledger as L
from chisel.attribution.geometry import FeatureBlock, geometry_rows
from tests.attribute.helpers import policy, record_policy_gradient


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm()


def test_hand_made_rank_one_update_is_reported_as_that_circuit():
    gen = torch.Generator().manual_seed(0)
    q_in = torch.linalg.qr(torch.randn(5, 5, generator=gen, dtype=torch.float64))[0].T
    q_out = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=torch.float64))[0].T
    weight = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    update = -0.7 * torch.outer(q_out[0], q_in[1])  # weakens the connection q_in[1] → q_out[0]
    ins = FeatureBlock(("a", "b", "c"), ("x:in",) * 3, q_in[:3])
    outs = FeatureBlock(("left", "right"), ("x:out",) * 2, q_out[:2])
    rows = geometry_rows(7, "x.weight", weight, update, ins, outs)
    get = {(r["feature"], r["quantity"]): r["value"] for r in rows}
    assert get[("b→left", L.CIRCUIT)] == pytest.approx(-0.7, abs=1e-12)
    for other in ("a→left", "c→left", "a→right", "b→right", "c→right"):
        assert abs(get[(other, L.CIRCUIT)]) < 1e-12
    assert get[("b", L.READ)] == pytest.approx(0.7) and get[("a", L.READ)] < 1e-12
    assert get[("left", L.WRITE)] == pytest.approx(0.7) and get[("right", L.WRITE)] < 1e-12
    base = float(q_out[0] @ weight @ q_in[1])
    assert get[("b→left", L.CIRCUIT_REL)] == pytest.approx(-0.7 / abs(base))
    spans = [r for r in rows if r["quantity"] == L.SPAN_SHARE]
    assert [s["value"] for s in spans] == pytest.approx([1.0, 1.0])  # ΔW lies in both spans
    assert all(r["step"] == 7 for r in rows)


def test_single_sample_sgd_step_is_a_rank_one_circuit_through_the_engine(tmp_path):
    torch.manual_seed(1)
    head = nn.Sequential(nn.Linear(4, 3)).double()
    optimizer = torch.optim.SGD(head.parameters(), lr=0.5)
    x = torch.randn(1, 4, dtype=torch.float64)
    with chisel.record(head, optimizer, tmp_path / "run", dtype="float64", factors=True):
        out = head(x)
        out[0, 2].backward()  # g = e_2: ΔW = −0.5 · e_2 xᵀ
        optimizer.step()
    run = chisel.load(tmp_path / "run")
    features = probes.FeatureSet(
        [probes.custom("x_dir", "0:in", x[0]), probes.custom("other", "0:in", torch.tensor([1.0, 0, 0, 0]))]
        + list(probes.neurons("0:out", range(3), dim=3, prefix="action"))
    )
    ledger = chisel.attribute(run, head, features, lambda m: m(chisel.metrics.as_input(x, m)).sum(),
                              families=("geometry",))
    circuits = ledger[ledger.quantity == L.CIRCUIT].set_index("feature").value
    assert circuits["x_dir→action[2]"] == pytest.approx(-0.5 * float(x.norm()), rel=1e-12)
    assert abs(circuits["x_dir→action[0]"]) < 1e-12 and abs(circuits["x_dir→action[1]"]) < 1e-12


def test_features_bind_to_every_site_carrying_the_same_tensor(tmp_path):
    from transformer_lens import HookedRootModule
    from transformer_lens.hook_points import HookPoint

    class Policy(HookedRootModule):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(4, 8)
            self.hook_hidden = HookPoint()
            self.head = nn.Linear(8, 2)
            self.setup()

        def forward(self, x):
            return self.head(self.hook_hidden(torch.tanh(self.fc1(x))))

    torch.manual_seed(2)
    model = Policy().double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    obs = torch.randn(16, 4, dtype=torch.float64)
    with chisel.record(model, optimizer, tmp_path / "run", dtype="float64"):
        model(obs).logsumexp(-1).mean().backward()
        optimizer.step()
    run = chisel.load(tmp_path / "run")
    d = torch.randn(8)
    metric = chisel.metrics.action_logit(obs, 1)
    by_hook = chisel.attribute(run, model, [probes.custom("f", "hook_hidden", d)], metric, families=("integrated",))
    by_module = chisel.attribute(run, model, [probes.custom("f", "head:in", d)], metric, families=("integrated",))
    rows = lambda led, q: led[(led.feature == "f") & (led.quantity == q)]  # noqa: E731
    assert rows(by_hook, "attribution").value.item() == rows(by_module, "attribution").value.item()
    assert rows(by_hook, "attribution").param.item() == "head.weight"
    # after tanh, f is also carried back to fc1's output: the write split of fc1 (weight, bias)
    writes = rows(by_hook, "attribution_write")
    assert list(writes.param) == ["fc1.weight", "fc1.bias"]
    assert list(writes.value) == list(rows(by_module, "attribution_write").value)


def test_bad_input_gets_clear_errors(tmp_path):
    model = policy()
    run = record_policy_gradient(tmp_path / "run", model, torch.optim.SGD(model.parameters(), lr=0.1), steps=2)
    obs = torch.randn(8, 6)
    metric = chisel.metrics.logprob(obs, torch.zeros(8, dtype=torch.long))
    # a site no weight reads or writes: the log-softmax output after the last Linear
    scorer = nn.Sequential(nn.Linear(6, 3), nn.LogSoftmax(-1))
    opt = torch.optim.SGD(scorer.parameters(), lr=0.1)
    with chisel.record(scorer, opt, tmp_path / "scorer"):
        scorer(obs).sum().backward()
        opt.step()
    with pytest.raises(chisel.ChiselError, match=r"float64.*chisel.metrics.as_input"):
        chisel.attribute(tmp_path / "scorer", scorer, None, lambda m: m(obs).sum())
    with pytest.raises(chisel.ChiselError, match=r"No Linear weight reads or writes.*'1:out'.*closest.*'0:out'"):
        chisel.attribute(tmp_path / "scorer", scorer, [probes.custom("f", "1:out", torch.randn(3))],
                         lambda m: m(chisel.metrics.as_input(obs, m)).sum())
    with pytest.raises(probes.FeatureDimensionError, match=r"dimension 5.*reads 16-dimensional"):
        chisel.attribute(run, model, [probes.custom("f", "3:out", torch.randn(5))], metric)
    with pytest.raises(probes.UnknownSiteError, match="Closest valid sites: .3:out."):
        chisel.attribute(run, model, [probes.custom("f", "3:outt", torch.randn(16))], metric)
    with pytest.raises(chisel.ChiselError, match=r"returned \(8, 3\).*scalar"):
        chisel.attribute(run, model, None, lambda m: m(chisel.metrics.as_input(obs, m)), families=("integrated",))
    with pytest.raises(chisel.ChiselError, match="must be finite"):
        chisel.attribute(run, model, None, lambda m: m(chisel.metrics.as_input(obs, m)).sum() / 0.0,
                         families=("integrated",))
    with pytest.raises(chisel.StepOutOfRangeError, match=r"steps \[5\].*0\.\.1"):
        chisel.attribute(run, model, None, metric, steps=[0, 5])
    with pytest.raises(chisel.AttributionInputError, match="unknown families"):
        chisel.attribute(run, model, None, metric, families=("vibes",))
    with pytest.raises(chisel.AttributionInputError, match="does not match"):
        chisel.attribute(run, nn.Sequential(nn.Linear(6, 2)), None, metric)


def test_ledger_streams_to_parquet_and_feeds_the_timeline(tmp_path):
    model = policy()
    run = record_policy_gradient(tmp_path / "run", model, torch.optim.Adam(model.parameters(), lr=1e-2), steps=5)
    features = probes.FeatureSet([probes.custom("a", "3:out", torch.randn(16)), probes.custom("b", "3:out", torch.randn(16))])
    metric = chisel.metrics.logprob(torch.randn(8, 6), torch.zeros(8, dtype=torch.long))
    ledger = chisel.attribute(run, model, features, metric, families=("geometry", "integrated"), out=True)
    stored = chisel.load_ledger(run.path / "ledger.parquet")
    assert len(stored) == len(ledger) and list(stored.columns[:7]) == L.COLUMNS
    assert stored.value.equals(ledger.value)
    tl = chisel.timeline(ledger)
    assert list(tl.columns) == ["a", "b"] and list(tl.index) == list(range(5))
    per_step = chisel.timeline(ledger, cumulative=False)
    torch.testing.assert_close(torch.tensor(tl.values), torch.tensor(per_step.cumsum().values))
    reads = (ledger.family == L.INTEGRATED) & (ledger.quantity == L.ATTRIBUTION)
    expected = ledger[(ledger.feature == "a") & reads].value.sum()
    assert tl["a"].iloc[-1] == pytest.approx(expected)


def test_credit_rows_through_the_engine_sum_to_the_integrated_total(tmp_path):
    model = policy()
    run = record_policy_gradient(tmp_path / "run", model, torch.optim.AdamW(model.parameters(), lr=1e-2), steps=4)
    features = probes.FeatureSet([probes.custom("a", "3:out", torch.randn(16))])
    metric = chisel.metrics.logprob(torch.randn(8, 6), torch.zeros(8, dtype=torch.long))
    for by in (None, ["reward"]):
        ledger = chisel.attribute(run, model, features, metric, credit_by=by, out=tmp_path / f"l{by}.parquet")
        assert set(ledger.family) == {L.GEOMETRY, L.INTEGRATED, L.CREDIT}
        for t in range(4):
            rows = ledger[ledger.step == t]
            total = rows[rows.quantity == L.TOTAL].value.item()
            credit = rows[(rows.family == L.CREDIT) & (rows.feature == L.WHOLE)]
            assert credit.value.sum() == pytest.approx(total, rel=1e-10, abs=1e-14)
            parts = {"gradient", "weight_decay"} | ({"momentum"} if t else set())  # no carry at step 0
            assert parts <= set(credit.part.dropna())
            if by is None:
                assert credit["sample"].notna().any()
            else:
                assert credit["sample"].isna().all() and set(credit["tag/reward"].dropna()) <= {0.0, 1.0}
        stored = chisel.load_ledger(tmp_path / f"l{by}.parquet")
        assert len(stored) == len(ledger) and "part" in stored.columns
    assert (chisel.timeline(ledger, family=L.CREDIT).columns == ["a"]).all()


def test_a_failed_attribution_leaves_no_ledger_file(tmp_path):
    model = policy()
    run = record_policy_gradient(tmp_path / "run", model, torch.optim.SGD(model.parameters(), lr=0.1), steps=3)
    obs = torch.randn(8, 6)
    calls = {"n": 0}

    def flaky(m):  # finite for the first calls (vmap calls it once per batch of points), then NaN
        calls["n"] += 1
        value = m(chisel.metrics.as_input(obs, m)).sum()
        return value if calls["n"] < 7 else value * float("nan")

    with pytest.raises(chisel.ChiselError, match="finite"):
        chisel.attribute(run, model, None, flaky, families=("integrated",), out=tmp_path / "ledger.parquet")
    assert not (tmp_path / "ledger.parquet").exists()
    assert not list(tmp_path.glob(".tmp-*"))
