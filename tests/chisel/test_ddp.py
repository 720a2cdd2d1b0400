"""DDP: `chisel.record` in every rank of a 2-process gloo job records one run that equals a
single-process run of the same global batch (update, factors, tags), names parameters as the
plain model does, and fails loudly when ranks disagree or a shard is missing.

Tolerance: the runs are float64. DDP sums each rank's gradient and then the two ranks' halves
(an all-reduce), one process sums the six samples in one pass: the same terms in another order,
so updates agree to 1e-12 relative (measured: ~1e-16), not bit for bit. Bit for bit is required
across the ranks of one job, and checked by the recorder at every step.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import chisel
from chisel.errors import MissingShardError
from chisel.store.verify import verify_run
from tests.chisel.helpers import assert_ledgers_match

WORLD = 2
RTOL, ATOL = 1e-12, 1e-14
# two spawned processes import torch and chisel: ~15-30 s for the whole module on a loaded machine
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """Spawns the 2-rank job once (every scenario of `ddp_workers.run_ranks`), and records the
    single-process references."""
    import torch.multiprocessing as mp

    here = str(Path(__file__).parent)
    sys.path.insert(0, here)  # the children import `ddp_workers` by name
    try:
        import ddp_workers

        root = tmp_path_factory.mktemp("ddp")
        mp.spawn(ddp_workers.run_ranks, args=(WORLD, f"file://{root / 'pg'}", str(root)), nprocs=WORLD)
        refs = {
            kind: ddp_workers.record_single(root, kind, WORLD, clip)
            for kind, clip in (("sgd", None), ("adam", 0.05))
        }
    finally:
        sys.path.remove(here)
    results = [json.loads((root / f"result-{r}.json").read_text()) for r in range(WORLD)]
    return root, refs, results, ddp_workers


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a.double(), b.double(), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_ddp_update_equals_single_process(job, kind):
    root, refs, _, w = job
    run, ref = chisel.load(root / f"ddp-{kind}"), chisel.load(refs[kind])
    assert len(run) == len(ref) == w.STEPS
    assert run.param_names == ref.param_names == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert run.manifest["distributed"]["world_size"] == WORLD
    for t in range(w.STEPS):
        for name, delta in ref.update(t).items():
            _close(run.update(t)[name], delta)
        for name, g in ref.grads(t).items():
            _close(run.grads(t)[name], g)
    for name, theta in ref.params(w.STEPS).items():
        _close(run.params(w.STEPS)[name], theta)
    assert list(run.steps["n_samples"]) == list(ref.steps["n_samples"]) == [w.PER_RANK * WORLD] * w.STEPS


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_ddp_factors_and_tags_cover_the_global_batch(job, kind):
    root, refs, _, w = job
    run, ref = chisel.load(root / f"ddp-{kind}"), chisel.load(refs[kind])
    for t in range(w.STEPS):
        mine, theirs = run.factors(t), ref.factors(t)
        assert set(mine) == set(theirs) == {"0", "2"}
        for module, (x, g) in theirs.items():
            assert mine[module][0].shape == x.shape == (w.PER_RANK * WORLD, x.shape[1])
            _close(mine[module][0], x)
            _close(mine[module][1], g)
        tags, want = run.tags(t), ref.tags(t)
        _close(tags["advantage"], want["advantage"])
        assert tags["epoch"] == 1  # a scalar every rank gave alike stays a scalar
        # a scalar that differs per rank becomes each rank's value over its samples
        assert tags["rank"].tolist() == want["rank"].tolist() == [0, 0, 0, 1, 1, 1]
        assert run.record(t).grad_coef == pytest.approx(ref.record(t).grad_coef, rel=1e-12)


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_ddp_factors_rebuild_the_stored_gradient(job, kind):
    """Σ over both ranks' samples of c · g_i x_iᵀ (c: the step's grad_coef, the clip
    coefficient for Adam here) is the gradient rank 0 stored, to float64 tolerance."""
    root, _, _, w = job
    run = chisel.load(root / f"ddp-{kind}")
    clipped = 0
    for t in range(w.STEPS):
        c = run.record(t).grad_coef
        grads = run.grads(t)
        clipped += c < 1 - 1e-9
        for module, (x, g) in run.factors(t).items():
            _close(c * g.T @ x, grads[f"{module}.weight"])
            _close(c * g.sum(0), grads[f"{module}.bias"])
    assert clipped == (w.STEPS if kind == "adam" else 0)


def test_unequal_batches_per_rank(job):
    root, _, _, _ = job
    run = chisel.load(root / "uneven")
    c, grads = run.record(0).grad_coef, run.grads(0)
    assert c == pytest.approx(1.0, abs=1e-12)
    for module, (x, g) in run.factors(0).items():
        assert x.shape[0] == 6
        _close(g.T @ x, grads[f"{module}.weight"])
    tags = run.tags(0)
    assert tags["rank"].tolist() == [0, 0, 1, 1, 1, 1] and tags["epoch"] == 1
    assert len(tags["advantage"]) == 6


def test_rank_disagreement_fails_loudly_on_every_rank(job):
    _, _, results, _ = job
    for rank in range(WORLD):
        message = results[rank]["mismatch"]
        assert "step 0" in message and "rank(s) [1]" in message
        assert "0.weight" in message and "DistributedDataParallel" in message


def test_refusal_on_rank_0_is_raised_on_every_rank(job):
    _, _, results, _ = job
    assert "already holds a run" in results[0]["exists"]
    assert "rank 0 could not open the run" in results[1]["exists"]
    assert "already holds a run" in results[1]["exists"]


def test_missing_shard_is_named(job, tmp_path):
    import shutil

    root, _, _, w = job
    copy = tmp_path / "run"
    shutil.copytree(root / "ddp-sgd", copy)
    (copy / "ranks" / "1" / "steps" / "000000001.safetensors").unlink()
    run = chisel.load(copy)
    assert len(run) == w.STEPS
    run.update(1)  # rank 0's file holds the update
    assert run.steps["n_samples"].isna().tolist() == [False, True, False]  # unknown, not wrong
    for read in (run.factors, run.tags):
        with pytest.raises(MissingShardError, match=r"Step 1: the shard of rank 1 .* is missing"):
            read(1)
    assert set(run.factors(2)) == {"0", "2"}
    problems = verify_run(copy).problems
    assert len(problems) == 1 and "ranks/1/steps/000000001.safetensors: missing" in problems[0]
    assert verify_run(root / "ddp-sgd").ok  # every rank's shards checked against their CRC32


def test_resume_continues_every_ranks_shards(job):
    root, _, _, w = job
    run = chisel.load(root / "resumed")
    assert len(run) == 2 and [s["resumed"] for s in run.manifest["starts"]] == [False, True]
    for t in range(2):
        c, grads = run.record(t).grad_coef, run.grads(t)
        for module, (x, g) in run.factors(t).items():
            assert x.shape[0] == w.PER_RANK * WORLD
            _close(c * g.T @ x, grads[f"{module}.weight"])
        assert run.tags(t)["rank"].tolist() == [0, 0, 0, 1, 1, 1]


def test_recording_on_rank_0_only_is_named(job):
    root, _, results, _ = job
    message = results[0]["alone"]
    assert "not every rank of the 2-rank job entered chisel.record within 2 s" in message
    assert "not under `if rank == 0`" in message
    assert not (root / "rank0-only").exists()


def test_credit_of_the_ddp_run_equals_the_single_process_run(job):
    """Credit (Adam, clipped: momentum carried back over steps) read from the DDP run's merged
    shards, per sample of the global batch, equals the single-process run's, row for row; by
    the per-rank tag, both ranks' samples are credited."""
    import pandas as pd

    from chisel.attribution import credit as C

    root, refs, _, w = job
    ledgers = {}
    for name, path in (("ddp", root / "ddp-adam"), ("single", refs["adam"])):
        run = chisel.load(path)
        gen = torch.Generator().manual_seed(7)
        session = C.CreditSession(run)
        rows = []
        for t in range(w.STEPS):
            gbar = {n: torch.randn(v.shape, generator=gen, dtype=torch.float64) for n, v in run.update(t).items()}
            rows.append(C.credit_rows(run, t, gbar, session=session))
        ledgers[name] = pd.concat(rows, ignore_index=True)
    key = ["step", "origin_step", "sample", "param", "part", "feature"]
    ddp, single = (ledgers[k].sort_values(key, na_position="first").reset_index(drop=True) for k in ledgers)
    assert len(ddp) == len(single) and ddp["sample"].nunique() == w.PER_RANK * WORLD
    pd.testing.assert_frame_equal(ddp[key], single[key])
    # to 1e-13 of the largest row (measured: 9e-15 on rows up to 2.8); rows near 0 differ in
    # relative terms, as the sums they come from were taken in another order
    scale = float(single["value"].abs().max())
    torch.testing.assert_close(torch.tensor(ddp["value"].to_numpy()), torch.tensor(single["value"].to_numpy()),
                               rtol=0, atol=1e-13 * scale)
    by_rank = C.credit_by(ddp, "rank").set_index("tag/rank")["value"]
    assert set(by_rank.index) == {0, 1}
    want = C.credit_by(single, "rank").set_index("tag/rank")["value"]
    torch.testing.assert_close(torch.tensor(by_rank.sort_index().to_numpy()),
                               torch.tensor(want.sort_index().to_numpy()), rtol=0, atol=1e-13 * scale)


def test_shards_hold_only_samples(job):
    """Rank 1 writes its samples' factors and tags, never θ, gradients or keyframes."""
    from safetensors import safe_open

    root, _, _, w = job
    shard_root = root / "ddp-adam" / "ranks" / "1"
    files = sorted((shard_root / "steps").iterdir())
    assert [f.name for f in files] == [f"{t:09d}.safetensors" for t in range(w.STEPS)]
    assert not (shard_root / "keyframes").exists() or not any((shard_root / "keyframes").iterdir())
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            assert {k.split("/")[0] for k in handle.keys()} == {"factors", "tag"}  # noqa: SIM118


def test_distributed_false_records_each_rank_alone(job):
    root, _, _, w = job
    for rank in range(WORLD):
        run = chisel.load(root / f"alone-{rank}")
        assert "distributed" not in run.manifest and not (root / f"alone-{rank}" / "ranks").exists()
        c, grads = run.record(0).grad_coef, run.grads(0)
        for module, (x, g) in run.factors(0).items():
            assert x.shape[0] == w.PER_RANK  # this rank's samples, its own gradient
            _close(c * g.T @ x, grads[f"{module}.weight"])
        assert run.tags(0)["rank"] == rank


def test_distributed_true_needs_a_process_group(tmp_path):
    with pytest.raises(chisel.RecordConfigError, match="distributed=True, but torch.distributed"):
        model = torch.nn.Linear(2, 2)
        chisel.record(model, torch.optim.SGD(model.parameters(), lr=0.1), tmp_path / "r", distributed=True)
    assert not (tmp_path / "r").exists()


def test_attribute_the_ddp_run_with_the_plain_model(job):
    """`chisel.attribute` reads the DDP run with the plain (unwrapped) model: every family's
    ledger equals the single-process run's."""

    import probes

    root, refs, _, w = job
    x, _, _ = w.global_batch(99, WORLD)

    def metric(model):
        return model(x).logsumexp(-1).mean()

    ledgers = [
        chisel.attribute(chisel.load(path), w.model(), probes.FeatureSet([]), metric, points=4)
        for path in (root / "ddp-adam", refs["adam"])
    ]
    assert set(ledgers[0]["quantity"]) == set(ledgers[1]["quantity"]) and len(ledgers[0]) > 0
    assert {"integrated", "credit"} <= set(ledgers[0]["family"])
    assert set(ledgers[0]["tag/rank"].dropna()) == {0, 1}  # credit covers both ranks' samples
    assert_ledgers_match(ledgers[0], ledgers[1])
