"""The writer's per-parameter norms (chisel.store.norms): float64-accurate against an exactly
rounded reference (math.fsum), for parameters that span chunks, share a chunk or are empty."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from chisel.store.norms import CHUNK, SegmentNorms, total


def _bounds(sizes: list[int]) -> list[tuple[int, int]]:
    return list(itertools.pairwise(np.cumsum([0, *sizes]).tolist()))


def _exact(x: torch.Tensor, bounds) -> list[float]:
    """Σ x² per segment rounded once (fsum of exact float64 squares of float32 values)."""
    v = x.double().numpy()
    return [math.sqrt(math.fsum((v[a:b] ** 2).tolist())) for a, b in bounds]


SIZES = [
    [7, 0, 3 * CHUNK + 5, 1, CHUNK - 1, 0, CHUNK, 2, 9],  # spans, exact fits, empty, tiny
    [5],
    [CHUNK],
    [1] * 40 + [2 * CHUNK],
]


@pytest.mark.parametrize("sizes", SIZES)
def test_segment_norms_match_an_exactly_rounded_reference(sizes):
    bounds = _bounds(sizes)
    x = torch.randn(bounds[-1][1], generator=torch.Generator().manual_seed(0)) * 1e-3
    x[::97] *= 1e4  # a wide dynamic range
    got, want = SegmentNorms(bounds)(x), _exact(x, bounds)
    assert len(got) == len(sizes)
    for g, w in zip(got, want):
        assert g == w == 0.0 or abs(g - w) <= 1e-13 * w
    assert total(got) == pytest.approx(math.sqrt(math.fsum(w * w for w in want)), rel=1e-14)


@pytest.mark.parametrize("sizes", SIZES)
@pytest.mark.parametrize("keep", [False, True])
def test_diff_norms_advance_prev_and_fill_out(sizes, keep):
    bounds = _bounds(sizes)
    n = bounds[-1][1]
    gen = torch.Generator().manual_seed(1)
    after = torch.randn(n, generator=gen)
    prev = after + torch.randn(n, generator=gen) * 1e-3
    want_diff = after - prev  # float32 subtraction, as stored
    out = torch.full((n,), float("nan")) if keep else None
    norms = SegmentNorms(bounds).diff(after, prev, out)
    assert torch.equal(prev, after)  # prev ← after
    if keep:
        assert torch.equal(out, want_diff)
    for g, w in zip(norms, _exact(want_diff, bounds)):
        assert g == w == 0.0 or abs(g - w) <= 1e-13 * w


def test_float64_and_bfloat16_vectors():
    bounds = _bounds([3, CHUNK + 3, 4])
    x = torch.randn(bounds[-1][1], dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for g, w in zip(SegmentNorms(bounds)(x), [float(torch.linalg.vector_norm(x[a:b])) for a, b in bounds]):
        assert g == pytest.approx(w, rel=1e-13)
    b16 = x.to(torch.bfloat16)
    got = SegmentNorms(bounds)(b16)
    assert got == pytest.approx(_exact(b16.float(), bounds), rel=1e-13)
    prev = b16 + 1
    want = _exact((b16 - prev).float(), bounds)  # the bfloat16 difference, as stored
    d = SegmentNorms(bounds).diff(b16, prev, None)
    assert torch.equal(prev, b16) and d == pytest.approx(want, rel=1e-13)
