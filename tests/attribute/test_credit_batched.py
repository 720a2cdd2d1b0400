"""Credit computed per group of blocks (all origins of a param in one matmul, each origin's
Σ g xᵀ cached, rows grouped by tag before any frame is built) gives the per-block answers."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from chisel.attribution import credit as C
from chisel.attribution import ledger as L
from chisel.attribution import optim_replay as R
from chisel.attribution.credit_tags import aggregate_samples
from chisel.attribution.splits import read_kernels

from .test_credit import D_IN, WIDTH, random_like, record

STEPS = 8


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return record(tmp_path_factory.mktemp("batched") / "run",
                  lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.05))


def _kernels(gbar, seed=0):
    gen = torch.Generator().manual_seed(seed)
    d = torch.randn(2, D_IN, generator=gen, dtype=torch.float64)
    k0 = read_kernels(("a", "b"), ("0:in", "0:in"), d, gbar["0.weight"])
    d2 = torch.randn(3, WIDTH, generator=gen, dtype=torch.float64)
    k2 = read_kernels(("p", "q", "r"), ("2:in",) * 3, d2, gbar["2.weight"])
    return {"0": [k0], "2": [k2]}


def test_whole_and_summed_rows_equal_the_per_block_values(run):
    session = C.CreditSession(run)
    for t in range(STEPS):
        gbar = random_like(run.update(t), t)
        kernels = _kernels(gbar, t)
        rows = C.credit_rows(run, t, gbar, kernels_by_module=kernels, session=session,
                             feature_rows="summed")
        split = session.split(t)
        assert len({b.origin_step for b in split.blocks}) == t + 1  # back-flow to every step
        for b in split.blocks:
            mine = rows[(rows[L.PARAM] == b.param) & (rows[C.PART] == b.part)
                        & (rows[L.ORIGIN_STEP] == b.origin_step)]
            whole = mine[mine[L.FEATURE] == L.WHOLE].sort_values(L.SAMPLE)
            want = b.attribution(gbar[b.param])  # the block's own, coef applied directly
            np.testing.assert_allclose(whole[L.VALUE].to_numpy(), want.numpy(), rtol=1e-12, atol=1e-18)
            if b.is_bias:
                continue
            shares = b.summed_kernel_shares(gbar[b.param], kernels[b.module][0])
            got = mine[mine[L.FEATURE] != L.WHOLE][L.VALUE].to_numpy()
            np.testing.assert_allclose(got, shares.numpy(), rtol=1e-12, atol=1e-18)
            assert (mine[mine[L.FEATURE] != L.WHOLE][L.COUNT] == b.n).all()


def test_cached_sums_are_the_blocks_own_and_a_reweighted_block_sums_its_own_g(run):
    session = C.CreditSession(run)
    for t in range(STEPS):
        split = session.split(t)
        for b in split.blocks:
            shape = split.base.update[b.param].shape
            assert b.unscaled is not None
            fresh = dataclasses.replace(b)  # no cached sum: computed from g and x
            assert fresh.unscaled is None
            torch.testing.assert_close(b.raw_total(shape), fresh.raw_total(shape), rtol=0, atol=0)
            w = torch.linspace(0.0, 2.0, b.n, dtype=torch.float64)
            weighted = dataclasses.replace(b, g=b.g * w[:, None, None])
            want = (b.terms(shape) * w.reshape(-1, *[1] * len(shape))).sum(0)
            torch.testing.assert_close(weighted.total(shape), want, rtol=1e-12, atol=1e-18)
            if b.part == R.MOMENTUM:  # its coef is the shared carry times ω_s
                shared, scale = split.shared_coef(b)
                torch.testing.assert_close(torch.as_tensor(b.coef), torch.as_tensor(shared * scale))


def test_rows_summed_by_tags_equal_the_per_sample_rows_grouped(run):
    session, plain = C.CreditSession(run), C.CreditSession(run)
    for t in range(STEPS):
        gbar = random_like(run.update(t), t)
        kernels = _kernels(gbar, t)
        by = C.credit_rows(run, t, gbar, kernels_by_module=kernels, session=session,
                           feature_rows="summed", by=["reward", "episode"])
        per_sample = C.credit_rows(run, t, gbar, kernels_by_module=kernels, session=plain,
                                   feature_rows="summed")
        # the frame-level aggregation of the per-sample rows gives the same rows, to rounding
        # (by= sums each origin's per-group sums of terms, kept across updates)
        tags = ["tag/reward", "tag/episode"]
        same = aggregate_samples(per_sample, ["reward", "episode"])
        pd.testing.assert_frame_equal(L.to_frame(by, tags), L.to_frame(same, tags), rtol=1e-12, atol=1e-18)
        # and a plain pandas groupby of the per-sample rows, to rounding
        samples = per_sample[per_sample[L.SAMPLE].notna()]
        keys = [C.PART, L.PARAM, L.ORIGIN_STEP, *tags]
        want = samples.groupby(keys)[L.VALUE].agg(["sum", "size"])
        got = by[by[L.SAMPLE].isna() & (by[L.FEATURE] == L.WHOLE) & by[L.ORIGIN_STEP].notna()]
        got = got.set_index(keys).sort_index()
        assert len(got) == len(want) == 2 * len(samples.groupby(keys[:3]))  # reward 0 / 1
        np.testing.assert_allclose(got[L.VALUE].to_numpy(), want["sum"].to_numpy(), rtol=1e-12, atol=1e-18)
        assert (got[L.COUNT].to_numpy() == want["size"].to_numpy()).all()
        # the rows without samples (feature rows, sample-less parts) are the same rows
        cols = [L.STEP, C.PART, L.PARAM, L.SITE, L.FEATURE, L.QUANTITY, L.VALUE, L.ORIGIN_STEP, L.COUNT]
        pd.testing.assert_frame_equal(_rest(by)[cols], _rest(per_sample)[cols], check_exact=True)


def _rest(frame):
    whole_sample = frame[L.FEATURE].eq(L.WHOLE) & frame[L.ORIGIN_STEP].notna()
    return frame[frame[L.SAMPLE].isna() & ~whole_sample].reset_index(drop=True)


def test_rows_come_in_block_order(run):
    session = C.CreditSession(run)
    t = STEPS - 1
    gbar = random_like(run.update(t), t)
    rows = C.credit_rows(run, t, gbar, kernels_by_module=_kernels(gbar), session=session,
                         feature_rows="summed")
    split = session.split(t)
    blocks = rows[rows[L.ORIGIN_STEP].notna()]
    # each block's rows are contiguous: its whole rows (samples 0..n-1), then its feature rows
    runs_of = (blocks[[C.PART, L.PARAM, L.ORIGIN_STEP]].astype(str).agg("|".join, axis=1))
    starts = runs_of.ne(runs_of.shift()).cumsum()
    assert starts.nunique() == len(split.blocks)
    order = [f"{b.part}|{b.param}|{float(b.origin_step)}" for b in split.blocks]
    assert list(runs_of[starts.ne(starts.shift())].str.replace(r"\|(\d+)$", r"|\1.0", regex=True)) == order


def test_without_caches_the_rows_are_the_same(run, monkeypatch):
    """Blocks whose caches would outweigh their factors (wide layers, few samples) are summed
    from their samples each update instead; the rows are the same to rounding."""
    t = STEPS - 1
    gbar = random_like(run.update(t), t)
    kernels = _kernels(gbar, t)

    def rows(session):
        return C.credit_rows(run, t, gbar, kernels_by_module=kernels, session=session,
                             feature_rows="summed", by=["reward"])

    cached = rows(C.CreditSession(run))
    monkeypatch.setattr("chisel.attribution.credit_values._fits", lambda b, numel: False)
    monkeypatch.setattr("chisel.attribution.credit_split._fits", lambda b, numel: False)
    session = C.CreditSession(run)
    fresh = rows(session)
    assert all(b.unscaled is None for b in session.split(t).blocks)
    tags = ["tag/reward"]
    pd.testing.assert_frame_equal(L.to_frame(fresh, tags), L.to_frame(cached, tags), rtol=1e-12, atol=1e-18)
