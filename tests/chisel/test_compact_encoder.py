"""The compact encoder on its own: its layout, its low-rank factors, error feedback (the error of
θ̂ stays at one step's truncation instead of growing), and the errors it states being the true ones."""

from __future__ import annotations

import math

import pytest
import torch

from chisel import Compact, RecordConfigError
from chisel.store import compact as C


def _decode(entries, tensors):
    return C.unpack(entries, {k.removeprefix(C.PREFIX): v for k, v in tensors.items()})


def _setup(rank=2, factor_dtype="float32"):
    names, shapes, dtypes = ["w", "b", "small", "e"], [(40, 30), (30,), (3, 2), (50, 8, 2)], ["float32"] * 4
    opts = Compact(rank=rank, factor_dtype=factor_dtype, feedback=True)
    return C.plan(names, shapes, dtypes, opts), opts, dict(zip(names, shapes))


def test_plan_factorises_only_matrices_it_shrinks():
    entries, _, _ = _setup()
    kinds = {e.name: (e.lowrank, e.rows, e.cols, e.rank) for e in entries}
    assert kinds["w"] == (True, 40, 30, 2)
    assert kinds["e"] == (True, 50, 16, 2)  # [shape[0], rest]
    assert not kinds["b"][0] and not kinds["small"][0]  # 1-D; 4·r·(m+n) > m·n
    w, e = (x for x in entries if x.lowrank)
    assert (w.offset, e.offset, e.scale_offset) == (0, 70 * 2, 2)


def test_lowrank_recovers_a_low_rank_matrix():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(60, 3, dtype=torch.float64, generator=g) @ torch.randn(3, 45, dtype=torch.float64, generator=g)
    u, s, v = C.lowrank(a, 3, oversample=4, power_iters=2, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(C.product(u, s, v), a, atol=1e-10 * a.abs().max())
    assert torch.allclose(u.T @ u, torch.eye(3, dtype=torch.float64), atol=1e-12)


def test_encoder_states_its_true_errors_and_feeds_them_back():
    """A full-rank noisy walk: the stated errors are ‖true − decoded‖ computed independently, and
    ‖θ_t − θ̂_t‖ stays bounded while Σ‖Δθ‖ grows (error feedback), for float32 and float16 factors."""
    for factor_dtype in ("float32", "float16"):
        entries, opts, shapes = _setup(factor_dtype=factor_dtype)
        enc = C.CompactEncoder(entries, opts)
        g = torch.Generator().manual_seed(3)
        theta = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
        assert enc.reset(theta, None) is False
        recon = {n: v.double().clone() for n, v in theta.items()}
        errors_after, path = [], 0.0
        for t in range(12):
            direction = torch.randn(40, 1, generator=g) @ torch.randn(1, 30, generator=g)
            step = {n: 1e-2 * torch.randn(s, generator=g) for n, s in shapes.items()}
            step["w"] += 1e-1 * direction  # a dominant rank-1 part plus full-rank noise
            after = {n: theta[n] + step[n] for n in shapes}
            tensors, field = enc.encode(t, theta, after)
            parts = _decode(entries, tensors)
            err_b = sum(((theta[n].double() - recon[n]).norm() ** 2).item() for n in ("w", "e"))
            upd2 = 0.0
            for e in entries:
                if e.lowrank:
                    stored = C.product(*parts[e.name]).reshape(e.shape)
                    true = after[e.name].double() - theta[e.name].double()
                    assert field["update_errors"][e.name] == pytest.approx((true - stored).norm().item(), rel=1e-9)
                    upd2 += (true - stored).norm().item() ** 2
                    recon[e.name] += stored
                else:
                    assert torch.equal(parts[e.name], after[e.name])
            err_a = sum(((after[n].double() - recon[n]).norm() ** 2).item() for n in ("w", "e"))
            assert field["update_error"] == pytest.approx(math.sqrt(upd2), rel=1e-9)
            assert field["error_before"] == pytest.approx(math.sqrt(err_b), rel=1e-9, abs=1e-300)
            assert field["error_after"] == pytest.approx(math.sqrt(err_a), rel=1e-9)
            errors_after.append(field["error_after"])
            path += math.sqrt(sum(v.double().norm() ** 2 for v in step.values()))
            theta = after
        # bounded by the noise of a few steps (the residual's spectrum), far below the path length
        assert max(errors_after) < 0.15 * path
        assert errors_after[-1] < 3 * errors_after[3]


def test_reset_says_whether_the_keyframe_continues_the_last_step():
    entries, opts, shapes = _setup()
    enc = C.CompactEncoder(entries, opts)
    theta = {n: torch.ones(s) for n, s in shapes.items()}
    assert enc.reset(theta, {n: v.clone() for n, v in theta.items()}) is True
    edited = {n: v.clone() for n, v in theta.items()}
    edited["b"][0] += 1
    assert enc.reset(edited, theta) is False


@pytest.mark.parametrize(
    "kwargs",
    [{"rank": 0}, {"rank": 2.5}, {"rank": True}, {"oversample": -1}, {"factor_dtype": "int8"}, {"feedback": 1}],
)
def test_bad_options_are_chisel_errors(kwargs):
    with pytest.raises(RecordConfigError, match="Compact"):
        Compact(**kwargs)
