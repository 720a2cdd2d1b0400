"""The pieces of DDP recording that need no processes: θ fingerprints, the disagreement message,
unwrapping, tag and factor merging over ranks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from chisel.capture.distributed import RankInfo, disagreement, fingerprint, unwrap_model
from chisel.errors import ManifestError, PartialFactorsError, TagError
from chisel.store.shards import merge_factors, merge_tags, samples, world_size
from tests.chisel.helpers import mlp


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_fingerprint_sees_one_flipped_bit(dtype):
    params = [p.detach().to(dtype) for p in mlp().parameters()]
    ref = fingerprint(params)
    assert ref.dtype == torch.int64 and ref.shape == (len(params),)
    assert torch.equal(fingerprint([p.clone() for p in params]), ref)
    for bit in (0, 7):  # the lowest mantissa bit and another: each shows in its parameter only
        flipped = [p.clone() for p in params]
        bits = flipped[2].view(-1).view({8: torch.int64, 4: torch.int32, 2: torch.int16}[flipped[2].element_size()])
        bits[3] ^= 1 << bit
        diff = (fingerprint(flipped) != ref).nonzero().flatten().tolist()
        assert diff == [2]


def test_disagreement_names_ranks_and_parameters():
    names = ["0.weight", "0.bias", "2.weight", "2.bias"]
    same = torch.tensor([1, 2, 3, 4])
    assert disagreement(5, [same, same.clone(), same.clone()], names) is None
    message = disagreement(5, [same, same.clone(), torch.tensor([1, 9, 3, 8])], names)
    assert message is not None
    assert message.startswith("step 5: after optimizer.step() the parameters of rank(s) [2] differ")
    assert "(0.bias, 2.bias)" in message and "DistributedDataParallel" in message


def test_unwrap_model_gives_the_plain_names():
    model = mlp()
    assert unwrap_model(model) is model
    wrapped = nn.DataParallel(model)  # DistributedDataParallel needs a process group: see test_ddp
    assert next(n for n, _ in wrapped.named_parameters()) == "module.0.weight"
    assert unwrap_model(wrapped) is model


def test_rank_info_and_world_size():
    info = RankInfo(1, 4, "gloo")
    assert not info.writes_run and info.factor_scale == 0.25
    assert info.to_json() == {"world_size": 4, "backend": "gloo", "factor_scale": 0.25}
    with pytest.raises(ValueError, match="rank 4 is outside a world of 4"):
        RankInfo(4, 4, "gloo")
    assert world_size({}) == 1 and world_size({"distributed": info.to_json()}) == 4
    with pytest.raises(ManifestError, match="has no world size"):
        world_size({"distributed": {"world_size": 0}})


def test_merge_tags_over_ranks():
    a = {"adv": torch.tensor([1.0, 2.0]), "epoch": 3, "rank": 0, "word": ["x", "y"]}
    b = {"adv": torch.tensor([3.0, 4.0, 5.0]), "epoch": 3, "rank": 1, "word": ["z", "w", "v"]}
    out = merge_tags([(a, 2), (b, 3)], t=0)
    assert out["adv"].tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert out["epoch"] == 3  # alike on every rank: still a scalar
    assert out["rank"].tolist() == [0, 0, 1, 1, 1]  # differs: each rank's value over its samples
    assert out["word"] == ["x", "y", "z", "w", "v"]
    with pytest.raises(TagError, match="tag 'adv' was given on some ranks but not on rank\\(s\\) \\[1\\]"):
        merge_tags([(a, 2), ({"epoch": 3}, 3)], t=4)
    with pytest.raises(TagError, match="strings on some ranks and numbers on others"):
        merge_tags([({"w": ["x"]}, 1), ({"w": torch.tensor([1.0])}, 1)], t=0)
    assert samples((2, 2), {"adv": torch.zeros(7)}) == 7 and samples((2, 2), {"k": 1}) == 4


def test_merge_factors_keeps_rank_order_and_refuses_a_module_missing_on_a_rank():
    x0, g0, x1, g1 = torch.ones(2, 3), torch.ones(2, 4), 2 * torch.ones(3, 3), 2 * torch.ones(3, 4)
    out = merge_factors([{"fc": (x0, g0)}, {"fc": (x1, g1)}], t=0)
    assert out["fc"][0][:, 0].tolist() == [1, 1, 2, 2, 2] and out["fc"][1].shape == (5, 4)
    with pytest.raises(PartialFactorsError, match="module 'head' ran on some ranks but not on rank\\(s\\) \\[0\\]"):
        merge_factors([{"fc": (x0, g0)}, {"fc": (x1, g1), "head": (x1, g1)}], t=5)
