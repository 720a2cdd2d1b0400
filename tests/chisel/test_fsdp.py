"""FSDP2: reassembling full parameters from the ranks' local shards (`store.shards.reassemble`).

`chisel.record` inside every rank of a 2-process `fully_shard` job on gloo (CPU, torch 2.13)
records each rank's shards; `chisel.load` joins them. Tested: the reassembly on hand-written
shards (uneven and empty chunks); the real local shards equal `full_tensor()` when joined; the
recorded run's θ, updates, gradients, Adam state, norms and tags equal an unsharded recorded run
of the same global batch to float64 tolerance (rtol 1e-12: the reduce-scatter sums in another
order), and so do the per-sample factors of every rank in rank order, which rebuild the joined
gradient; resume=True is refused by name.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import chisel
from chisel.errors import CorruptStepError
from chisel.store.reader import ShardedRun
from chisel.store.shards import reassemble
from chisel.store.verify import verify_run
from tests.chisel.helpers import assert_ledgers_match

WORLD = 2


@pytest.mark.parametrize("shape,dim,world", [((5, 3), 0, 4), ((8,), 0, 2), ((2, 6), 1, 3), ((1, 4), 0, 3)])
def test_reassemble_hand_written_chunks(shape, dim, world):
    full = torch.arange(torch.Size(shape).numel(), dtype=torch.float64).reshape(shape)
    chunks = list(torch.chunk(full, world, dim=dim))  # FSDP2's cut; trailing ranks empty
    empty_shape = list(shape)
    empty_shape[dim] = 0
    chunks += [full.new_empty(empty_shape)] * (world - len(chunks))
    spec = {"dim": dim, "shape": list(shape), "world_size": world}
    assert torch.equal(reassemble(chunks, spec), full)


def test_reassemble_replicated_and_errors():
    full = torch.randn(4, 2, dtype=torch.float64)
    assert torch.equal(reassemble([full, full], {"dim": None, "shape": [4, 2], "world_size": 2}), full)
    spec = {"dim": 0, "shape": [4, 2], "world_size": 2}
    with pytest.raises(CorruptStepError, match="1 shards for a parameter cut over 2 ranks"):
        reassemble([full[:2]], spec, "0.weight")
    with pytest.raises(CorruptStepError, match="join to shape \\[3, 2\\]"):
        reassemble([full[:2], full[:1]], spec, "0.weight")
    with pytest.raises(CorruptStepError, match="does not fit the full shape"):
        reassemble([full[:2], torch.zeros(2, 3, dtype=torch.float64)], spec, "0.weight")


@pytest.fixture(scope="module")
def fsdp_job(tmp_path_factory):
    import torch.multiprocessing as mp

    here = str(Path(__file__).parent)
    sys.path.insert(0, here)
    try:
        import ddp_workers

        root = tmp_path_factory.mktemp("fsdp")
        mp.spawn(ddp_workers.fsdp_ranks, args=(WORLD, f"file://{root / 'pg'}", str(root)), nprocs=WORLD)
        plain = ddp_workers.train_plain("adam", WORLD, root / "plain-run")
    finally:
        sys.path.remove(here)
    return root, plain


@pytest.mark.slow  # two spawned processes
def test_fsdp2_shards_reassemble_to_the_unsharded_training(fsdp_job):
    root, (plain_before, plain_after) = fsdp_job
    specs = json.loads((root / "specs.json").read_text())
    assert {s["dim"] for s in specs.values()} == {0}  # FSDP2 cuts dim 0
    theta = {}
    for tag in ("before", "after"):
        ranks = [load_file(str(root / f"{tag}-rank{r}.safetensors")) for r in range(WORLD)]
        full = load_file(str(root / f"{tag}-full.safetensors"))
        theta[tag] = {n: reassemble([s[n] for s in ranks], spec, n) for n, spec in specs.items()}
        for n in specs:
            assert torch.equal(theta[tag][n], full[n])  # exactly what full_tensor() gathers
    # the last layer's bias (3 values over 2 ranks) and weight are cut unevenly
    assert load_file(str(root / "after-rank1.safetensors"))["2.bias"].shape == (1,)
    for n in specs:
        torch.testing.assert_close(theta["before"][n], plain_before[n], rtol=0, atol=0)
        torch.testing.assert_close(theta["after"][n], plain_after[n], rtol=1e-12, atol=1e-14)
        update = theta["after"][n] - theta["before"][n]
        torch.testing.assert_close(update, plain_after[n] - plain_before[n], rtol=1e-12, atol=1e-14)


@pytest.mark.slow  # two spawned processes
def test_record_refuses_fsdp2_resume_by_name(fsdp_job):
    root, _ = fsdp_job
    for rank in range(WORLD):
        message = (root / f"refused-{rank}.txt").read_text()
        assert "DTensor parameters" in message and "with resume=True" in message
        assert "docs/distributed.md" in message
    assert not (root / "refused").exists()


@pytest.mark.slow  # two spawned processes
def test_fsdp2_recording_reassembles_to_the_unsharded_run(fsdp_job):
    """Each rank recorded its shards (ranks/<r>/); the loaded run joins them: θ, every update,
    every gradient and Adam's state equal an unsharded recorded run of the same global batch."""
    root, _ = fsdp_job
    run, plain = chisel.load(root / "fsdp-run"), chisel.load(root / "plain-run")
    assert isinstance(run, ShardedRun) and run.world_size == WORLD
    assert len(run) == len(plain) == 3 and run.param_names == plain.param_names
    assert [r.manifest["params"][-1]["shape"] for r in run.ranks] == [[2], [1]]  # 2.bias: 3 = 2 + 1
    for t in range(len(plain) + 1):
        _close_all(run.params(t), plain.params(t))
    for t in range(len(plain)):
        _close_all(run.update(t), plain.update(t))
        _close_all(run.grads(t), plain.grads(t))
        assert run.record(t).update_norm == pytest.approx(plain.record(t).update_norm, rel=1e-12)
        assert run.record(t).batch_sizes == plain.record(t).batch_sizes == (6,)
        assert run.tags(t)["rank"].tolist() == plain.tags(t)["rank"].tolist() == [0, 0, 0, 1, 1, 1]
        _close_all(run.tags(t), plain.tags(t), ["advantage"])
        # per-sample factors: every rank's samples in rank order, as the unsharded run's
        mine, theirs = run.factors(t), plain.factors(t)
        assert set(mine) == set(theirs) == {"0", "2"}
        for module, (x, g) in theirs.items():
            _close_all(dict(zip("xg", mine[module])), {"x": x, "g": g})
        c = run.record(t).grad_coef
        assert c == pytest.approx(plain.record(t).grad_coef, rel=1e-12)
        assert c == pytest.approx(1.0, abs=1e-12)
        grads = run.grads(t)
        for module, (x, g) in mine.items():  # Σ over both ranks' samples rebuilds the gradient
            _close_all({"w": c * g.T @ x, "b": c * g.sum(0)},
                       {"w": grads[f"{module}.weight"], "b": grads[f"{module}.bias"]})
    end = len(plain)
    for name, state in plain.optimizer_state(end).items():
        _close_all(run.optimizer_state(end)[name], state)
    assert list(run.steps["update_norm"]) == pytest.approx(list(plain.steps["update_norm"]), rel=1e-12)
    check = verify_run(root / "fsdp-run")
    assert check.ok and check.steps == 3 * WORLD, check.problems  # every rank's sub-run


def _close_all(a: dict, b: dict, keys=None) -> None:
    for k in keys or b:
        torch.testing.assert_close(a[k].double(), b[k].double(), rtol=1e-12, atol=1e-14)


@pytest.mark.slow  # two spawned processes
def test_credit_of_the_fsdp2_run_equals_the_unsharded_run(fsdp_job):
    """Credit (Adam: momentum carried back over steps, its state replayed from the joined
    keyframes) from the FSDP2 run equals the unsharded run's, row for row."""
    import pandas as pd

    from chisel.attribution import credit as C

    root, _ = fsdp_job
    ledgers = {}
    for name in ("fsdp-run", "plain-run"):
        run = chisel.load(root / name)
        gen = torch.Generator().manual_seed(7)
        session = C.CreditSession(run)
        rows = []
        for t in range(len(run)):
            gbar = {n: torch.randn(v.shape, generator=gen, dtype=torch.float64) for n, v in run.update(t).items()}
            rows.append(C.credit_rows(run, t, gbar, session=session))
        ledgers[name] = pd.concat(rows, ignore_index=True)
    key = ["step", "origin_step", "sample", "param", "part", "feature"]
    fsdp, plain = (ledgers[k].sort_values(key, na_position="first").reset_index(drop=True) for k in ledgers)
    pd.testing.assert_frame_equal(fsdp[key], plain[key])
    assert fsdp["sample"].nunique() == 6
    scale = float(plain["value"].abs().max())
    torch.testing.assert_close(torch.tensor(fsdp["value"].to_numpy()), torch.tensor(plain["value"].to_numpy()),
                               rtol=0, atol=1e-13 * scale)


@pytest.mark.slow  # two spawned processes
def test_attribute_the_fsdp2_run_with_the_plain_model(fsdp_job):
    """`chisel.attribute` reads the FSDP2 run (joined) with the plain model; every family's
    ledger equals the unsharded run's."""

    import probes
    from tests.chisel import ddp_workers as w

    root, _ = fsdp_job
    x, _, _ = w.global_batch(99, WORLD)

    def metric(model):
        return model(x).logsumexp(-1).mean()

    ledgers = [
        chisel.attribute(chisel.load(root / name), w.model(), probes.FeatureSet([]), metric, points=4)
        for name in ("fsdp-run", "plain-run")
    ]
    assert {"integrated", "credit"} <= set(ledgers[0]["family"])
    assert_ledgers_match(ledgers[0], ledgers[1])
