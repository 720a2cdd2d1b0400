"""SAEs: SAELens directories and plain matrices are read; codes and features are exact."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import probes
from probes import SAE, FeatureFileError, ProbesError, load_sae

SITE = "blocks.0.hook_resid_post"


def _weights(d_in=16, d_sae=32, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {
        "W_enc": torch.randn(d_in, d_sae, generator=g, dtype=dtype),
        "b_enc": torch.randn(d_sae, generator=g, dtype=dtype) * 0.1,
        "W_dec": torch.randn(d_sae, d_in, generator=g, dtype=dtype),  # rows not unit norm
        "b_dec": torch.randn(d_in, generator=g, dtype=dtype) * 0.1,
    }


def _write_saelens(path, weights, cfg):
    path.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(path / "sae_weights.safetensors"))
    (path / "cfg.json").write_text(json.dumps(cfg))
    return path


def _cfg_v6(**extra):  # SAELens 6 layout: hook name under "metadata"
    return {
        "architecture": "standard",
        "d_in": 16,
        "d_sae": 32,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {"hook_name": SITE, "model_name": "tiny"},
        **extra,
    }


def _reference_codes(w, x):
    return torch.relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"])


def test_saelens_directory_codes_match_reference_on_bridge_activations(tmp_path, bridge):
    w = _weights()
    sae = load_sae(_write_saelens(tmp_path / "sae", w, _cfg_v6()))
    assert sae.site == SITE and (sae.d_in, sae.d_sae) == (16, 32)
    tokens = torch.randint(0, 20, (3, 8))
    _, cache = bridge.run_with_cache(tokens)
    acts = probes.capture(bridge, tokens, sae.site)[SITE]  # [batch, pos, d_model]
    assert torch.equal(acts, cache[SITE])
    codes = sae.encode(acts)
    assert codes.shape == (3, 8, 32)
    torch.testing.assert_close(codes, _reference_codes(w, acts), rtol=0, atol=1e-6)
    assert (codes == 0).any() and (codes > 0).any()
    torch.testing.assert_close(sae.decode(codes), codes @ w["W_dec"] + w["b_dec"])


def test_decoder_rows_become_unit_features_at_the_hook_site(tmp_path, bridge):
    w = _weights()
    sae = load_sae(_write_saelens(tmp_path / "sae", w, _cfg_v6()), name="res0")
    fs = sae.features()
    assert len(fs) == 32 and fs.names[:2] == ["res0/0", "res0/1"] and fs.sites == [SITE]
    f = fs["res0/5"]
    assert f.source == "sae" and f.metadata["latent"] == 5
    torch.testing.assert_close(f.write, w["W_dec"][5] / w["W_dec"][5].norm())
    torch.testing.assert_close(f.read, w["W_enc"][:, 5] / w["W_enc"][:, 5].norm())
    assert f.metadata["decoder_norm"] == pytest.approx(w["W_dec"][5].norm().item())
    x = torch.randn(10, 16)
    torch.testing.assert_close(
        f.score(x) * f.metadata["encoder_norm"], sae.pre_activations(x)[:, 5], rtol=1e-5, atol=1e-5
    )
    fs.check(bridge, torch.zeros(1, 4, dtype=torch.long))  # dims match the bridge's d_model
    assert sae.features([3, 7], prefix="s").names == ["s/3", "s/7"]


def test_older_cfg_with_top_level_hook_name(tmp_path):
    w = _weights()
    cfg = {
        "d_in": 16,
        "d_sae": 32,
        "hook_name": "blocks.1.hook_resid_pre",
        "activation_fn_str": "relu",
        "apply_b_dec_to_input": False,
    }
    sae = load_sae(_write_saelens(tmp_path / "old", w, cfg))
    assert sae.site == "blocks.1.hook_resid_pre" and not sae.apply_b_dec_to_input
    x = torch.randn(5, 16)
    torch.testing.assert_close(sae.encode(x), torch.relu(x @ w["W_enc"] + w["b_enc"]))
    assert load_sae(tmp_path / "old", site="other:out").site == "other:out"


def test_jumprelu_and_topk(tmp_path):
    w = _weights()
    thr = torch.rand(32, generator=torch.Generator().manual_seed(1))
    jump = load_sae(
        _write_saelens(tmp_path / "j", {**w, "threshold": thr}, _cfg_v6(architecture="jumprelu"))
    )
    x = torch.randn(6, 16)
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    torch.testing.assert_close(jump.encode(x), torch.relu(pre) * (pre > thr))
    assert jump.features([0])[0].metadata["threshold"] == pytest.approx(thr[0].item())
    topk = load_sae(_write_saelens(tmp_path / "t", w, _cfg_v6(architecture="topk", k=4)))
    codes = topk.encode(x)
    assert ((codes != 0).sum(-1) <= 4).all()
    for row in range(6):  # brute force: the 4 largest pre-activations, through relu
        keep = pre[row].argsort(descending=True)[:4]
        ref = torch.zeros(32)
        ref[keep] = torch.relu(pre[row][keep])
        torch.testing.assert_close(codes[row], ref)


def test_plain_matrices_file_and_from_matrices(tmp_path):
    w = _weights(dtype=torch.float64)
    save_file({"W_dec": w["W_dec"]}, str(tmp_path / "dict.safetensors"))
    sae = load_sae(tmp_path / "dict.safetensors", site="torso.2:out")
    assert sae.name == "dict" and torch.equal(sae.W_enc, w["W_dec"].T)
    x = torch.randn(3, 16, dtype=torch.float64)
    torch.testing.assert_close(sae.encode(x), torch.relu(x @ w["W_dec"].T))
    norms = torch.stack([f.write.norm() for f in sae.features()])
    torch.testing.assert_close(norms, torch.ones(32, dtype=torch.float64))
    with pytest.raises(ProbesError, match="looks transposed"):
        SAE.from_matrices(w["W_dec"].T, W_enc=w["W_enc"], site="s")
    with pytest.raises(ProbesError, match="no site"):
        SAE.from_matrices(w["W_dec"]).features()


def test_bad_sae_files(tmp_path):
    w = _weights()
    with pytest.raises(FeatureFileError, match=r"cfg\.json not found"):
        load_sae(tmp_path)
    d = _write_saelens(tmp_path / "a", w, _cfg_v6(d_sae=64))
    with pytest.raises(FeatureFileError, match="d_sae = 64 but W_enc has shape"):
        load_sae(d)
    d = _write_saelens(tmp_path / "b", {k: v for k, v in w.items() if k != "b_dec"}, _cfg_v6())
    with pytest.raises(FeatureFileError, match=r"lacks tensors \['b_dec'\]"):
        load_sae(d)
    d = _write_saelens(tmp_path / "c", w, _cfg_v6(architecture="gated"))
    with pytest.raises(FeatureFileError, match="'gated' is not supported"):
        load_sae(d)
    d = _write_saelens(tmp_path / "e", w, _cfg_v6(normalize_activations="layer_norm"))
    with pytest.raises(FeatureFileError, match="normalize_activations='layer_norm'"):
        load_sae(d)
    (d / "sae_weights.safetensors").write_bytes(b"garbage")
    (d / "cfg.json").write_text(json.dumps(_cfg_v6()))
    with pytest.raises(FeatureFileError, match="not a readable safetensors"):
        load_sae(d)
