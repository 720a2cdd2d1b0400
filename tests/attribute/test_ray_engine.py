"""`attribute_ray` (and `chisel attribute --engine ray`): step ranges on Ray tasks give the serial ledger row for row.

One local Ray instance (2 CPUs) serves the whole module; starting it takes ~10 s on a loaded
2-core machine, each comparison a few seconds more.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pandas as pd
import pytest
import torch

import chisel
import probes
from chisel.attribution import distributed as D
from chisel.cli import main as cli_main
from tests.attribute.helpers import policy

ray = pytest.importorskip("ray")

ROOT = Path(__file__).resolve().parents[2]
D_IN, BATCH = 6, 16
_OBS = torch.randn(24, D_IN, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
_ACTIONS = torch.randint(0, 3, (24,), generator=torch.Generator().manual_seed(6))
METRIC = chisel.metrics.logprob(_OBS, _ACTIONS)  # module-level: "tests.attribute.test_ray_engine:METRIC"
SPEC = f"{__name__}:METRIC"
_SEEDS = itertools.count(100)


def make_model():
    """The policy whose parameter values the output-side ("attribution_write") rows through the
    Tanh depend on (see chisel/attribution/stream.py): the trained model, in real use."""
    return policy(seed=7)


def make_random_model():
    """A different init at every call."""
    return policy(seed=next(_SEEDS))


def failing_metric(model):
    raise ValueError("planted failure in a worker")


def features() -> probes.FeatureSet:
    gen = torch.Generator().manual_seed(3)
    return probes.FeatureSet(
        [probes.custom(f"h{i}", "3:out", torch.randn(16, generator=gen)) for i in range(2)]
        + [probes.custom("obs_dir", "0:in", torch.randn(D_IN, generator=gen))]
    )


def record(path: Path, make_opt, steps: int, **options) -> chisel.Run:
    """REINFORCE-shaped steps with factors and per-sample tags, stored in float64."""
    model = policy()
    opt = make_opt(model.parameters())
    gen = torch.Generator().manual_seed(1)
    with chisel.record(model, opt, path, factors=True, dtype="float64", **options) as rec:
        for k in range(steps):
            obs = torch.randn(BATCH, D_IN, generator=gen, dtype=torch.float64)
            logits = model(obs)
            actions = torch.distributions.Categorical(logits=logits.detach()).sample()
            adv = torch.randn(BATCH, generator=gen, dtype=torch.float64)
            (-(torch.log_softmax(logits, -1)[torch.arange(BATCH), actions] * adv).mean()).backward()
            rec.tag(advantage=adv, reward=(adv > 0).double(), group=torch.arange(BATCH) % 2, episode=k)
            opt.step()
            opt.zero_grad()
    return chisel.load(path)


@pytest.fixture(scope="module")
def local_ray():
    # workers import this module (the metric and the model factory) from the repository root
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    torch.manual_seed(0)
    return {
        # momentum: the back-flow reaches 2 steps (horizon) across range boundaries and keyframes
        "keyframes": record(root / "sgd", lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
                            steps=9, keyframe_every=3),
        # every_step: the serial replay never reloads between keyframes; tasks must replay alike
        "every_step": record(root / "adam", lambda p: torch.optim.Adam(p, lr=1e-2), steps=7,
                             keyframe_every=0, optim_state="every_step"),
    }


def serial(run, model, tmp_path, **kw):
    """The serial ledger as written to disk and read back (parquet gives `part` pandas' default
    string dtype, the in-memory frame a nullable one; the values are what is compared)."""
    path = tmp_path / "serial.parquet"
    chisel.attribute(run, model, features(), METRIC, out=path, return_ledger=False, **kw)
    return chisel.load_ledger(path)


@pytest.mark.parametrize(
    ("name", "kw", "tasks"),
    [
        ("keyframes", dict(horizon=2), 3),  # tasks start from the keyframe ≥ 2 steps back
        ("keyframes", dict(horizon=1, steps=[0, 1, 2, 5, 6, 7, 8]), 3),  # a jump: fresh seek
        # every_step: a fresh seek would load the stored state; tasks must replay from the
        # serial engine's origin instead (this case fails without that), grouped by a tag
        ("every_step", dict(credit_by=["group"], horizon=1), 2),
        # ranges [0, 1], [2, 5], [6]: 2 continues the serial start, 5 is a jump (the serial
        # engine seeks afresh there), 6 continues from the state loaded for 5
        ("every_step", dict(horizon=1, steps=[0, 1, 2, 5, 6]), 3),
    ],
)
def test_ray_ledger_equals_serial_row_for_row(local_ray, runs, tmp_path, name, kw, tasks):
    run = runs[name]
    model = policy(seed=7)  # the values matter to nothing but must match: shipped to workers
    expected = serial(run, model, tmp_path, **kw)
    got = D.attribute_ray(run, model, features(), SPEC, tasks=tasks, out=tmp_path / "ledger", **kw)
    parts = sorted(p.name for p in (tmp_path / "ledger").iterdir())
    assert len(parts) == tasks and all(p.startswith("part-") for p in parts)
    assert (expected[chisel.attribution.ledger.FAMILY] == "credit").any()
    assert expected[chisel.attribution.ledger.ORIGIN_STEP].dropna().nunique() > 1  # back-flow
    pd.testing.assert_frame_equal(got, expected, check_exact=True)
    # the same directory as one table through pandas and pyarrow
    as_pandas = pd.read_parquet(tmp_path / "ledger").sort_values("step", kind="stable", ignore_index=True)
    pd.testing.assert_frame_equal(as_pandas, expected, check_exact=True)
    import pyarrow.dataset as ds

    assert ds.dataset(tmp_path / "ledger", format="parquet").count_rows() == len(expected)


def test_model_factory_and_cli(local_ray, runs, tmp_path):
    run = runs["keyframes"]
    feature_dir = features().save(tmp_path / "features")
    code = cli_main([
        "attribute", str(run.path), "--features", str(feature_dir), "--metric", SPEC,
        "--model", f"{__name__}:make_model", "--engine", "ray", "--tasks", "2",
        "--out", str(tmp_path / "ledger"), "--horizon", "2",
    ])
    assert code == 0
    got = chisel.load_ledger(tmp_path / "ledger")
    expected = serial(run, make_model(), tmp_path, horizon=2)
    pd.testing.assert_frame_equal(got, expected, check_exact=True)


def test_cli_serial_engine_and_its_errors(runs, tmp_path, capsys):
    run = runs["keyframes"]
    args = ["attribute", str(run.path), "--metric", SPEC, "--model", f"{__name__}:make_model",
            "--families", "integrated", "--out", str(tmp_path / "serial.parquet")]
    assert cli_main(args) == 0
    expected = chisel.attribute(run, make_model(), None, METRIC, families=("integrated",))
    pd.testing.assert_frame_equal(chisel.load_ledger(tmp_path / "serial.parquet"), expected,
                                  check_exact=True, check_dtype=False)
    assert cli_main([*args, "--tasks", "2"]) == 2
    assert "--tasks and --address apply to --engine ray only" in capsys.readouterr().err
    assert cli_main([*args[:3], "tests.attribute.test_ray_engine:no_such_metric", *args[4:]]) == 2
    assert "has no 'no_such_metric'" in capsys.readouterr().err


def test_workers_get_the_drivers_parameter_values():
    """Rows read through a nonlinearity depend on the model's values, so a factory's random
    init must not reach the workers: they load the driver's state_dict."""
    model, recipe = D._model(f"{__name__}:make_random_model")
    for rebuilt in (recipe.build(), recipe.build()):
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), rebuilt.state_dict().values()))
    assert not torch.equal(make_random_model()[0].weight, make_random_model()[0].weight)


def test_no_steps_give_an_empty_ledger_with_the_serial_columns(local_ray, runs, tmp_path):
    run = runs["keyframes"]
    got = D.attribute_ray(run, policy(), features(), SPEC, out=tmp_path / "ledger", steps=[])
    expected = serial(run, policy(), tmp_path, steps=[])
    assert got.empty and list(got.columns) == list(expected.columns)


def test_worker_error_is_raised_and_leaves_no_parts(local_ray, runs, tmp_path):
    with pytest.raises(ValueError, match="planted failure in a worker"):
        D.attribute_ray(runs["keyframes"], policy(), features(), f"{__name__}:failing_metric",
                        tasks=2, out=tmp_path / "ledger", families=("integrated",))
    assert not list((tmp_path / "ledger").glob("*"))


def test_unshippable_metric_and_bad_out_are_refused(runs, tmp_path):
    run = runs["keyframes"]
    for metric in (METRIC, lambda m: m(_OBS).sum()):  # a closure, a lambda
        with pytest.raises(D.NotShippableError, match="cannot be rebuilt by a worker.*module level"):
            D.attribute_ray(run, policy(), features(), metric, out=tmp_path / "a")
    with pytest.raises(D.NotShippableError, match="cannot import 'no_such_module'"):
        D.attribute_ray(run, policy(), features(), "no_such_module:m", out=tmp_path / "a")
    with pytest.raises(chisel.AttributionInputError, match="directory of parquet parts"):
        D.attribute_ray(run, policy(), features(), SPEC, out=None)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "part-000000000-000000003.parquet").write_bytes(b"")
    with pytest.raises(chisel.AttributionInputError, match="already holds ledger parts"):
        D.attribute_ray(run, policy(), features(), SPEC, out=tmp_path / "old")
    with pytest.raises(chisel.AttributionInputError, match="tasks=0"):
        D.attribute_ray(run, policy(), features(), SPEC, out=tmp_path / "b", tasks=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(chisel.ChiselError, match="holds no ledger parts"):
        chisel.load_ledger(tmp_path / "empty")


def test_ranges_are_contiguous_and_cover_the_steps():
    steps = [0, 1, 2, 5, 6, 7, 8]
    for tasks in range(1, 10):
        parts = D.ranges(steps, tasks)
        assert [t for part in parts for t in part] == steps
        assert len(parts) == min(tasks, len(steps))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
