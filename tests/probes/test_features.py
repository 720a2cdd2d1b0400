"""Feature / FeatureSet: validation, lookup, save/load bit for bit, bad files, model check."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import probes
from probes import Feature, FeatureDimensionError, FeatureFileError, FeatureSet, ProbesError


def _same(a: Feature, b: Feature) -> bool:
    same_write = (a.write is None and b.write is None) or (
        a.write is not None
        and b.write is not None
        and torch.equal(a.write, b.write)
        and a.write.dtype == b.write.dtype
    )
    return (
        (a.name, a.site, a.bias, a.source, a.metadata)
        == (b.name, b.site, b.bias, b.source, b.metadata)
        and torch.equal(a.read, b.read)
        and a.read.dtype == b.read.dtype
        and same_write
    )


@pytest.fixture
def fs() -> FeatureSet:
    g = torch.Generator().manual_seed(0)
    return FeatureSet(
        [
            Feature(
                "trash",
                "torso.2:out",
                torch.randn(8, generator=g),
                bias=0.1 + 0.2,
                source="probe",
                metadata={"accuracy": 0.93, "concept": "trash", "nan": None},
            ),
            Feature(
                "latent/3",
                "blocks.0.hook_resid_post",
                torch.randn(16, generator=g, dtype=torch.float64),
                write=torch.randn(16, generator=g, dtype=torch.float64),
                source="sae",
            ),
            Feature(
                "n[1]",
                "torso.2:out",
                torch.eye(8)[1],
                write=torch.eye(8)[1],
                source="neuron",
                bias=-1e-300,
            ),
        ]
    )


def test_lookup_by_name_position_and_site(fs):
    assert fs.names == ["trash", "latent/3", "n[1]"]
    assert fs["trash"] is fs[0] and "n[1]" in fs and "nope" not in fs
    assert fs.sites == ["torso.2:out", "blocks.0.hook_resid_post"]
    assert fs.at("torso.2:out").names == ["trash", "n[1]"]
    assert fs.read_matrix("torso.2:out").shape == (2, 8)
    with pytest.raises(ProbesError, match="no write"):
        fs.write_matrix("torso.2:out")
    assert torch.equal(fs.write_matrix("blocks.0.hook_resid_post")[0], fs["latent/3"].write)
    with pytest.raises(KeyError, match="nope"):
        fs["nope"]
    assert (fs[:1] + fs[1:]).names == fs.names


def test_validation_errors():
    with pytest.raises(ProbesError, match="duplicate feature name 'a'"):
        FeatureSet([Feature("a", "s:out", torch.ones(2)), Feature("a", "s:out", torch.ones(2))])
    with pytest.raises(ProbesError, match="source must be one of"):
        Feature("a", "s:out", torch.ones(2), source="magic")
    with pytest.raises(ProbesError, match="1-D float"):
        Feature("a", "s:out", torch.ones(2, 2))
    with pytest.raises(FeatureDimensionError, match="write has dimension 3 but read has 2"):
        Feature("a", "s:out", torch.ones(2), write=torch.ones(3))
    with pytest.raises(ProbesError, match="JSON-serialisable"):
        Feature("a", "s:out", torch.ones(2), metadata={"t": torch.ones(1)})
    with pytest.raises(ProbesError, match="NaN or inf"):
        Feature("a", "s:out", torch.tensor([1.0, float("nan")]))


def test_feature_does_not_alias_its_input():
    v = torch.ones(3)
    f = Feature("a", "s:out", v, bias=1.0)
    v[0] = 5.0
    assert f.read[0] == 1.0
    assert torch.equal(f.score(torch.eye(3)), torch.full((3,), 2.0))


def test_save_load_round_trips_bit_for_bit(fs, tmp_path):
    fs.save(tmp_path / "feats")
    back = FeatureSet.load(tmp_path / "feats")
    assert back.names == fs.names
    assert all(_same(a, b) for a, b in zip(fs, back))
    assert back["trash"].bias == 0.1 + 0.2  # 0.30000000000000004 survives JSON
    assert sorted(p.name for p in (tmp_path / "feats").iterdir()) == [
        "features.json",
        "features.safetensors",
    ]


def test_corrupted_tensor_file_is_refused(fs, tmp_path):
    path = fs.save(tmp_path / "f")
    blob = bytearray((path / "features.safetensors").read_bytes())
    blob[-3] ^= 0xFF
    (path / "features.safetensors").write_bytes(bytes(blob))
    with pytest.raises(FeatureFileError, match="corrupted"):
        FeatureSet.load(path)


def test_truncated_json_is_refused(fs, tmp_path):
    path = fs.save(tmp_path / "f")
    text = (path / "features.json").read_text()
    (path / "features.json").write_text(text[: len(text) // 2])
    with pytest.raises(FeatureFileError, match="not valid JSON"):
        FeatureSet.load(path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda h: h["features"][0].update(dim=9), "json says dim 9"),
        (lambda h: h["features"][1].pop("site"), "expected keys"),
        (lambda h: h["features"][2].update(source="magic"), "source 'magic'"),
        (lambda h: h["features"][2].update(name="trash"), "duplicate feature name 'trash'"),
        (lambda h: h["features"][0].update(bias="x"), "feature #0"),
        (lambda h: h["features"].pop(), "not listed in json"),
        (lambda h: h.update(version=99), "format version 99"),
        (lambda h: h["features"][0].update(has_write=True), "vectors are missing"),
    ],
)
def test_hand_edited_json_gives_clear_error(fs, tmp_path, edit, message):
    path = fs.save(tmp_path / "f")
    header = json.loads((path / "features.json").read_text())
    edit(header)
    (path / "features.json").write_text(json.dumps(header))
    with pytest.raises(FeatureFileError, match=message):
        FeatureSet.load(path)


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FeatureFileError, match="not found"):
        FeatureSet.load(tmp_path / "nothing")


def test_check_against_model(seq):
    good = FeatureSet([Feature("a", "2:out", torch.ones(8)), Feature("b", "0:in", torch.ones(4))])
    good.check(seq)
    bad = FeatureSet([Feature("a", "2:out", torch.ones(16))])
    with pytest.raises(FeatureDimensionError) as err:
        bad.check(seq)
    assert "dimension 16" in str(err.value) and "has dimension 8" in str(err.value)
    with pytest.raises(probes.UnknownSiteError, match="Closest valid sites: '2:out'"):
        FeatureSet([Feature("a", "2:outt", torch.ones(8))]).check(seq)


def test_check_needs_inputs_where_the_module_does_not_fix_the_dim(seq):
    relu = FeatureSet([Feature("a", "1:out", torch.ones(8))])
    with pytest.raises(ProbesError, match="Pass inputs"):
        relu.check(seq)
    relu.check(seq, torch.randn(1, 4))
    with pytest.raises(FeatureDimensionError, match="has dimension 5 but site '3:out'"):
        FeatureSet([Feature("a", "3:out", torch.ones(5))]).check(seq, torch.randn(1, 4))


def test_check_on_bridge_hook_site(bridge):
    fs = FeatureSet([Feature("r", "blocks.0.hook_resid_post", torch.ones(16))])
    fs.check(bridge, torch.zeros(1, 4, dtype=torch.long))
    wrong = FeatureSet([Feature("r", "blocks.0.hook_resid_post", torch.ones(32))])
    with pytest.raises(FeatureDimensionError, match=r"dimension 32 .* dimension 16"):
        wrong.check(bridge, torch.zeros(1, 4, dtype=torch.long))


def test_embedding_and_layernorm_dims_are_static():
    net = nn.Sequential(nn.Embedding(10, 6), nn.LayerNorm(6))
    FeatureSet([Feature("e", "0:out", torch.ones(6)), Feature("l", "1:in", torch.ones(6))]).check(
        net
    )
    with pytest.raises(FeatureDimensionError, match="site '1:out'"):
        FeatureSet([Feature("l", "1:out", torch.ones(7))]).check(net)
