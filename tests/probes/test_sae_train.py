"""train_sae recovers a planted sparse dictionary; label_latents names latents by concept.

Planted data: 8 random unit atoms in 32-d, each on in 15% of 4,096 states with a magnitude in
[0.5, 1.5], plus an offset and isotropic noise (std 0.02). Training runs in float32; stats are
checked against a float64 brute-force recomputation to 1e-5.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import probes
from probes import SAE, ProbeFitError, ProbesError, label_latents, train_sae

N, D, K, P_ON = 4096, 32, 8, 0.15


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def planted(seed: int = 0, noise: float = 0.02) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """acts [N, D], atoms [K, D] (unit rows), on [N, K] bool."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(K, D, generator=g, dtype=torch.float64)
    atoms /= atoms.norm(dim=1, keepdim=True)
    on = torch.rand(N, K, generator=g, dtype=torch.float64) < P_ON
    mag = 0.5 + torch.rand(N, K, generator=g, dtype=torch.float64)
    offset = 0.3 * torch.randn(D, generator=g, dtype=torch.float64)
    acts = (on * mag) @ atoms + offset + noise * torch.randn(N, D, generator=g, dtype=torch.float64)
    return acts, atoms, on


@pytest.fixture(scope="module")
def data():
    return planted()


@pytest.fixture(scope="module")
def sae(data):
    torch.set_num_threads(1)
    return train_sae(data[0], 16, site="s", name="d", seed=0)


def test_recovers_every_planted_atom(data, sae):
    atoms = data[1]
    cos = atoms.float() @ sae.W_dec.T  # [K, d_sae], decoder rows are unit
    assert cos.max(1).values.min() >= 0.9
    assert sae.stats.variance_explained >= 0.9
    assert 0.8 * K * P_ON <= sae.stats.l0 <= 2.5 * K * P_ON  # planted L0 = 1.2
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(16), atol=1e-5)
    assert isinstance(sae, SAE) and sae.architecture == "standard" and sae.site == "s"


def test_stats_match_a_brute_force_recomputation(data, sae):
    acts = data[0]
    x = acts.float()
    codes = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc).double()  # SAELens standard
    recon = codes @ sae.W_dec.double() + sae.b_dec.double()
    fvu = (recon - acts).pow(2).sum() / (acts - acts.mean(0)).pow(2).sum()
    s = sae.stats
    assert math.isclose(s.variance_explained, 1 - fvu.item(), abs_tol=1e-5)
    assert math.isclose(s.l0, (codes > 0).sum(1).double().mean().item(), abs_tol=1e-5)
    freq = (codes > 0).double().mean(0)
    assert np.allclose(s.frequency, freq.numpy(), atol=1e-5)
    assert s.dead == tuple(i for i in range(16) if freq[i] == 0)
    assert (s.n_states, s.steps, s.seed, s.l1) == (N, 2000, 0, 0.1)


def test_features_read_the_encoder_and_write_the_decoder(data, sae):
    acts = data[0]
    feats = sae.features()
    assert feats.names == [f"d/{i}" for i in range(16)]
    for i, f in enumerate(feats):
        assert f.source == "sae" and f.site == "s"
        assert torch.allclose(f.read, sae.W_enc[:, i] / sae.W_enc[:, i].norm())
        assert torch.allclose(f.write, sae.W_dec[i])
        assert f.metadata["frequency"] == sae.stats.frequency[i]
        assert f.metadata["variance_explained"] == sae.stats.variance_explained
        assert f.metadata["l0"] == sae.stats.l0
        assert f.metadata["dead_latents"] == list(sae.stats.dead)
        pre = f.score(acts.float()[:64]) * f.metadata["encoder_norm"]
        assert torch.allclose(pre, sae.pre_activations(acts[:64])[:, i], atol=1e-4)
    assert sae.stats.to_json()["frequency"] == list(sae.stats.frequency)


def test_a_seed_gives_the_same_sae_and_another_seed_another(data, sae):
    again = train_sae(data[0], 16, site="s", name="d", seed=0)
    for key in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(again, key), getattr(sae, key)), key
    assert again.stats == sae.stats
    other = train_sae(data[0], 16, site="s", name="d", seed=1, steps=50)
    assert not torch.equal(other.W_dec, sae.W_dec)


def test_silent_latents_are_resampled_during_training():
    # 4 atoms, 12 latents, a large l1: some latents fall silent early and are re-initialised
    # (the path runs, and the atoms are still found; here they are found without it as well)
    g = torch.Generator().manual_seed(3)
    atoms = torch.linalg.qr(torch.randn(16, 4, generator=g, dtype=torch.float64))[0].T
    on = torch.rand(2048, 4, generator=g, dtype=torch.float64) < 0.2
    sae = train_sae(on.double() @ atoms, 12, site="s", l1=0.3, steps=1000)
    assert sae.stats.resampled > 0
    assert (atoms.float() @ sae.W_dec.T).max(1).values.min() >= 0.9


@pytest.mark.parametrize(
    ("acts", "match"),
    [
        (torch.zeros(10), r"float tensor \[n, d\], got shape \(10,\)"),
        (torch.zeros(4, 3, 2), r"got shape \(4, 3, 2\)"),
        (torch.zeros(8, 3, dtype=torch.int64), r"float tensor"),
        (torch.zeros(1, 3), "at least 2 rows"),
        (torch.tensor([[0.0, 1.0], [float("nan"), 2.0]]), "NaN or inf"),
        (torch.tensor([[0.0, float("inf")], [1.0, 2.0]]), "NaN or inf"),
        (torch.ones(6, 3), "same in every row"),
    ],
)
def test_bad_activations_raise_a_fit_error(acts, match):
    with pytest.raises(ProbeFitError, match=match):
        train_sae(acts, 4, site="s")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_latents": 0}, "n_latents must be an integer >= 1, got 0"),
        ({"n_latents": 2.5}, "n_latents must be an integer >= 1"),
        ({"steps": 0}, "steps must be"),
        ({"batch_size": -1}, "batch_size must be"),
        ({"l1": -0.1}, "l1 must be finite and >= 0"),
        ({"l1": float("nan")}, "l1 must be finite"),
        ({"lr": 0.0}, "lr must be finite and > 0"),
    ],
)
def test_bad_settings_raise(kwargs, match):
    args = {"n_latents": 4, **kwargs}
    with pytest.raises(ProbesError, match=match):
        train_sae(torch.randn(16, 3), args.pop("n_latents"), site="s", **args)


# --- label_latents ------------------------------------------------------------------------


def _toy_sae() -> tuple[SAE, torch.Tensor, dict[str, torch.Tensor]]:
    """Latent 0 fires exactly on concept "a", latent 1 exactly where "b" is off, latent 2 on
    random states, latent 3 never. acts [400, 4] = one-hot-ish codes."""
    g = torch.Generator().manual_seed(0)
    n = 400
    a = torch.rand(n, generator=g) < 0.3
    b = torch.rand(n, generator=g) < 0.6
    noise_on = torch.rand(n, generator=g) < 0.5
    acts = torch.stack(
        [
            a * (1.0 + torch.rand(n, generator=g) * 0.01),  # ~constant magnitude where a
            (~b) * 2.0,
            noise_on * torch.rand(n, generator=g),
            torch.zeros(n),
        ],
        1,
    )
    w_enc = torch.eye(4) * torch.tensor([1.0, 3.0, 1.0, 1.0])  # non-unit encoder norm
    b_enc = torch.tensor([0.0, 0.0, 0.0, -1.0])  # latent 3 never crosses zero
    sae = SAE.from_matrices(torch.eye(4), W_enc=w_enc, b_enc=b_enc, site="s", name="toy")
    labels = {"a": a, "b": b, "flat": torch.ones(n, dtype=torch.bool)}
    return sae, acts, labels


def test_label_latents_names_planted_concepts_and_drops_dead_ones():
    sae, acts, labels = _toy_sae()
    out = label_latents(sae.features(), acts, labels, min_score=0.5)
    assert out.names == ["toy0@s", "toy1@s", "toy2@s"]  # toy3 never fires: dropped
    m0, m1, m2 = (f.metadata for f in out)
    assert m0["concept"] == "a" and m0["concept_score"] > 0.999
    assert m1["concept"] == "b" and m1["concept_correlation"] == pytest.approx(-1.0)
    assert m2["concept"] == "unlabelled" and m2["concept_score"] < 0.5
    assert m2["best_concept"] in ("a", "b")
    assert m1["active_fraction"] == pytest.approx(float((~labels["b"]).double().mean()))
    assert all(f.source == "sae" and f.metadata["sae"] == "toy" for f in out)


def test_label_scores_are_pearson_correlations():
    sae, acts, labels = _toy_sae()
    out = label_latents(sae.features(), acts, labels, min_score=0.0)
    codes = sae.encode(acts).double().numpy()
    for f in out:
        i = f.metadata["latent"]
        r = {c: np.corrcoef(codes[:, i], labels[c].double().numpy())[0, 1] for c in ("a", "b")}
        best = max(r, key=lambda c: abs(r[c]))
        assert f.metadata["best_concept"] == best
        assert f.metadata["concept_correlation"] == pytest.approx(r[best], abs=1e-12)
        assert f.metadata["concept"] == best  # min_score 0: every live latent is labelled


def test_label_latents_of_a_trained_sae_on_planted_data(data, sae):
    acts, atoms, on = data
    labels = {f"atom{k}": on[:, k] for k in range(K)}
    out = label_latents(sae.features(), acts, labels)
    for k in range(K):
        best = int((atoms[k].float() @ sae.W_dec.T).argmax())
        assert out[f"d{best}@s"].metadata["concept"] == f"atom{k}"
        assert out[f"d{best}@s"].metadata["concept_score"] > 0.9
    assert len(out) == 16 - len(sae.stats.dead)


def test_label_latents_honours_jumprelu_thresholds():
    sae, acts, labels = _toy_sae()
    jump = SAE(
        W_enc=sae.W_enc,
        b_enc=sae.b_enc,
        W_dec=sae.W_dec,
        b_dec=sae.b_dec,
        site="s",
        architecture="jumprelu",
        threshold=torch.tensor([0.0, 10.0, 0.0, 0.0]),  # latent 1 can never reach 10
        name="j",
    )
    out = label_latents(jump.features(), acts, labels)
    assert out.names == ["j0@s", "j2@s"]


def test_label_latents_accepts_acts_per_site():
    sae, acts, labels = _toy_sae()
    other = SAE.from_matrices(torch.eye(4), site="t", name="u")
    feats = sae.features() + other.features()
    out = label_latents(feats, {"s": acts, "t": acts}, labels)
    assert "toy0@s" in out and "u0@t" in out
    with pytest.raises(ProbesError, match=r"span sites \['s', 't'\]"):
        label_latents(feats, acts, labels)
    with pytest.raises(ProbesError, match="acts has no site"):
        label_latents(feats, {"s": acts}, labels)


def test_label_latents_rejects_bad_input():
    sae, acts, labels = _toy_sae()
    feats = sae.features()
    with pytest.raises(ProbesError, match="min_score must be in"):
        label_latents(feats, acts, labels, min_score=1.5)
    with pytest.raises(ProbeFitError, match=r"labels\['a'\] must be \[n\] = \[400\]"):
        label_latents(feats, acts, {"a": labels["a"][:10]})
    with pytest.raises(ProbeFitError, match="must be binary"):
        label_latents(feats, acts, {"a": torch.rand(400)})
    with pytest.raises(ProbeFitError, match="NaN or inf"):
        label_latents(feats, acts.masked_fill(acts > 1.5, float("nan")), labels)
    with pytest.raises(probes.FeatureDimensionError, match="dimension 4"):
        label_latents(feats, acts[:, :3], labels)
    probe = probes.custom("p", "s", torch.ones(4))
    with pytest.raises(ProbesError, match="not a standard or jumprelu SAE latent"):
        label_latents(probes.FeatureSet([probe]), acts, labels)
    topk = SAE.from_matrices(torch.eye(4), site="s", architecture="topk", k=1)
    with pytest.raises(ProbesError, match="topk"):
        label_latents(topk.features(), acts, labels)
