"""TensorBoard: the live view of `chisel.record(..., tensorboard=...)` and `chisel tensorboard
RUN_DIR [--ledger]`, read back from the event files with TensorBoard's EventAccumulator."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

pytest.importorskip("tensorboard")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import chisel
import probes
from chisel.cli import main
from chisel.integrations import tensorboard as tb
from tests.chisel.helpers import mlp

STEPS = 5


def _events(folder) -> dict[str, dict[int, float]]:
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def _train(run_dir, **options):
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    losses = []
    with chisel.record(model, opt, run_dir, factors=True, **options) as rec:
        for _ in range(STEPS):
            x = torch.randn(8, 6, generator=gen)
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            rec.tag(loss=loss.item(), weight=torch.arange(8.0))
            opt.step()
            losses.append(loss.item())
    return model, losses


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("tb") / "run"
    model, losses = _train(run_dir, tensorboard=True)
    return run_dir, model, losses


def test_live_view_streams_every_step(live):
    run_dir, _, losses = live
    events, steps = _events(run_dir / "tensorboard"), chisel.load(run_dir).steps
    modules = {"0", "2"}
    assert set(events) == {"update/norm", "grad/norm", "optim/lr", "tag/loss", "tag/weight",
                           *(f"update/norm/{m}" for m in modules)}
    assert all(set(v) == set(range(STEPS)) for v in events.values())
    for t in range(STEPS):
        row = steps.iloc[t]
        assert events["update/norm"][t] == pytest.approx(row["update_norm"], rel=1e-6)
        for m in modules:  # a module's norm is the norm over its weight and bias
            expected = math.hypot(row[f"update_norm/{m}.weight"], row[f"update_norm/{m}.bias"])
            assert events[f"update/norm/{m}"][t] == pytest.approx(expected, rel=1e-6)
        assert events["grad/norm"][t] == pytest.approx(row["grad_norm"], rel=1e-6)
        assert events["optim/lr"][t] == pytest.approx(1e-2)
        assert events["tag/loss"][t] == pytest.approx(losses[t], rel=1e-6)
        assert events["tag/weight"][t] == pytest.approx(3.5)  # a per-sample tag: its mean


def test_export_matches_the_live_view_and_adds_the_ledger_timeline(live, tmp_path):
    run_dir, model, _ = live
    features = probes.neurons("1:out", [0, 1], dim=16, prefix="h")
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(1))
    chisel.attribute(run_dir, model, features, lambda m: m(x.double())[:, 0].mean(), out=True,
                     families=("integrated",), progress=False)
    assert main(["tensorboard", str(run_dir), "--ledger", "--out", str(tmp_path / "tb")]) == 0
    exported, streamed = _events(tmp_path / "tb"), _events(run_dir / "tensorboard")
    assert {k: v for k, v in exported.items() if k in streamed} == streamed
    timeline = chisel.timeline(chisel.load_ledger(run_dir / "ledger.parquet"))
    for name in ("h[0]", "h[1]"):
        assert exported[f"timeline/{name}"] == pytest.approx(timeline[name].to_dict(), rel=1e-6)
    assert set(exported["metric/delta"]) == set(range(STEPS))


def test_custom_log_dir_resume_and_no_view_by_default(tmp_path):
    _train(tmp_path / "plain")
    assert not (tmp_path / "plain" / "tensorboard").exists()
    _train(tmp_path / "run", tensorboard=tmp_path / "logs")
    assert set(_events(tmp_path / "logs")["update/norm"]) == set(range(STEPS))
    _train(tmp_path / "run", tensorboard=tmp_path / "logs", resume=True)  # steps go on
    assert set(_events(tmp_path / "logs")["update/norm"]) == set(range(2 * STEPS))
    with pytest.raises(TypeError, match="tensorboard must be True or a log directory"):
        _train(tmp_path / "bad", tensorboard=3)
    assert not (tmp_path / "bad").exists()


def test_a_failing_view_warns_and_recording_goes_on(tmp_path, monkeypatch):
    import torch.utils.tensorboard as tub

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(tub, "SummaryWriter", broken)
    with pytest.warns(RuntimeWarning, match="TensorBoard view .* stopped at step 0 .*disk full"):
        _train(tmp_path / "run", tensorboard=True)
    assert len(chisel.load(tmp_path / "run")) == STEPS


def test_without_tensorboard_installed_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(ImportError, match=r"pip install 'chisel-rl\[tensorboard\]'"):
        _train(tmp_path / "run", tensorboard=True)
    assert not (tmp_path / "run").exists()
    assert main(["tensorboard", str(tmp_path / "run")]) == 2


def test_export_without_ledger_and_import_cost(live, tmp_path, capsys):
    run_dir, *_ = live
    (tmp_path / "run").mkdir()
    assert main(["tensorboard", str(run_dir), "--out", str(tmp_path / "a")]) == 0
    assert "timeline/h[0]" not in _events(tmp_path / "a")
    import shutil

    shutil.copytree(run_dir, tmp_path / "copy", ignore=shutil.ignore_patterns("ledger.parquet"))
    assert main(["tensorboard", str(tmp_path / "copy"), "--ledger"]) == 2
    assert "Attribute the run first" in capsys.readouterr().err
    assert tb.step_scalars(None, float("nan"), None, {"s": ["a", "b"]}) == {}
    code = ("import sys, chisel; bad = [m for m in ('tensorboard', 'torch.utils.tensorboard') "
            "if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_live_view_streams_each_features_geometry(tmp_path):
    """features=: ‖ΔW d‖ for the weight reading a feature's site, ‖uᵀΔW‖ for the one writing it,
    every step, equal to the recorded updates; hooks gone after close."""
    gen = torch.Generator().manual_seed(3)
    width = mlp()[2].in_features
    read = probes.custom("r", "2:in", torch.randn(width, generator=gen))
    write = probes.custom("w", "0:out", torch.randn(width, generator=gen))
    run_dir = tmp_path / "run"
    model, _ = _train(run_dir, tensorboard=True, features=[read, write])
    events, run = _events(run_dir / "tensorboard"), chisel.load(run_dir)
    assert {"geometry/read/r@2.weight", "geometry/write/w@0.weight"} <= set(events)
    d = read.read.double() / read.read.double().norm()
    u = write.read.double() / write.read.double().norm()
    for t in range(STEPS):
        update = run.update(t)
        want_read = float((update["2.weight"] @ d).norm())
        want_write = float((u @ update["0.weight"]).norm())
        assert events["geometry/read/r@2.weight"][t] == pytest.approx(want_read, rel=1e-5)
        assert events["geometry/write/w@0.weight"][t] == pytest.approx(want_write, rel=1e-5)
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_live_geometry_bad_input(tmp_path):
    f = probes.custom("r", "2:inn", torch.randn(3))
    with pytest.raises(probes.UnknownSiteError, match="2:inn"):
        _train(tmp_path / "a", tensorboard=True, features=[f])
    assert not (tmp_path / "a").exists()  # nothing made
    with pytest.raises(chisel.RecordConfigError, match="tensorboard=True"):
        _train(tmp_path / "b", features=[probes.custom("r", "2:in", torch.randn(3))])
    # a site after the last Linear's activation: no weight reads or writes it; training goes on
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    unread = probes.custom("s", "1:out", torch.randn(3))
    with pytest.warns(RuntimeWarning, match=r"no geometry for the features at \['1:out'\]"):
        with chisel.record(model, opt, tmp_path / "c", tensorboard=True, features=[unread]):
            for _ in range(2):
                model(torch.randn(5, 4)).sum().backward()
                opt.step()
                opt.zero_grad()
    assert len(chisel.load(tmp_path / "c")) == 2
