"""neurons, pca and custom features."""

from __future__ import annotations

import pytest
import torch

import probes
from probes import FeatureSet, ProbesError


def test_neurons_are_one_hot_and_read_their_unit(seq):
    fs = probes.neurons("2:out", [0, 5], dim=8)
    assert fs.names == ["2:out[0]", "2:out[5]"] and all(f.source == "neuron" for f in fs)
    x = torch.randn(6, 4)
    acts = probes.capture(seq, x, "2:out")["2:out"]
    assert torch.equal(fs["2:out[5]"].score(acts), acts[:, 5])
    assert torch.equal(fs.write_matrix("2:out"), torch.eye(8)[[0, 5]])
    fs.check(seq)
    assert probes.neurons("2:out", 3, dim=8, prefix="h").names == ["h[3]"]
    with pytest.raises(ProbesError, match=r"\[8\] are outside \[0, 8\)"):
        probes.neurons("2:out", [8], dim=8)


def test_pca_recovers_a_planted_subspace():
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(10, 10, generator=g))[0][:, :2]  # orthonormal [10, 2]
    z = torch.randn(4000, 2, generator=g) * torch.tensor([5.0, 2.0])
    x = z @ basis.T + 0.05 * torch.randn(4000, 10, generator=g) + 3.0
    fs = probes.pca(x, 2, "s:out")
    assert fs.names == ["pc0", "pc1"] and fs[0].source == "pca"
    assert abs(torch.dot(fs[0].read, basis[:, 0])) > 0.999
    assert abs(torch.dot(fs[1].read, basis[:, 1])) > 0.999
    assert fs[0].metadata["explained_variance"] == pytest.approx(25.0, rel=0.1)
    assert fs[0].metadata["explained_variance_ratio"] > 0.8
    # centred coordinate: mean zero, variance = explained variance
    proj = fs[0].score(x)
    assert abs(proj.mean().item()) < 1e-3
    assert proj.var().item() == pytest.approx(fs[0].metadata["explained_variance"], rel=1e-3)
    again = probes.pca(x.flip(0), 2, "s:out")  # sign convention does not depend on row order
    assert torch.allclose(again[0].read, fs[0].read, atol=1e-5)
    with pytest.raises(ProbesError, match="1 <= k <= d"):
        probes.pca(x, 11, "s:out")


def test_custom_normalises_unless_asked_not_to():
    f = probes.custom("up", "s:out", torch.tensor([3.0, 4.0]), metadata={"why": "test"})
    assert torch.allclose(f.read, torch.tensor([0.6, 0.8])) and f.source == "custom"
    raw = probes.custom("raw", "s:out", torch.tensor([3.0, 4.0]), normalize=False, bias=1.5)
    assert torch.equal(raw.read, torch.tensor([3.0, 4.0])) and raw.bias == 1.5
    w = probes.custom("w", "s:out", torch.ones(2), write=torch.tensor([0.0, 2.0]))
    assert torch.equal(w.write, torch.tensor([0.0, 1.0]))
    with pytest.raises(ProbesError, match="non-zero"):
        probes.custom("z", "s:out", torch.zeros(2))
    assert len(FeatureSet([f, raw, w])) == 3
