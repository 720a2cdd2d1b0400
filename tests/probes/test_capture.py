"""capture: exact activations, batching, positions, and no hook left behind."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import probes
from probes import SiteCaptureError
from tests.probes.helpers import BoomAfter, hook_state, make_policy, n_hooks


def test_sequential_matches_reference_forward(seq):
    x = torch.randn(10, 4)
    acts = probes.capture(seq, x, ["0:out", "2:in", "4:out", ":in"])
    h0 = seq[0](x)
    assert torch.equal(acts["0:out"], h0)
    assert torch.equal(acts["2:in"], seq[1](h0))
    assert torch.equal(acts["4:out"], seq(x))
    assert torch.equal(acts[":in"], x)
    assert list(acts) == ["0:out", "2:in", "4:out", ":in"]
    assert n_hooks(seq) == 0


def test_batched_capture_equals_batchwise_reference(seq):
    x = torch.randn(10, 4)
    acts = probes.capture(seq, x, "2:out", batch_size=3)
    ref = torch.cat([seq[:3](x[i : i + 3]) for i in range(0, 10, 3)])
    assert torch.equal(acts["2:out"], ref)
    torch.testing.assert_close(acts["2:out"], seq[:3](x))


def test_capture_runs_without_grad_and_copies_before_inplace_ops():
    net = nn.Sequential(nn.Linear(3, 5), nn.ReLU(inplace=True))
    x = torch.randn(6, 3)
    acts = probes.capture(net, x, "0:out")
    assert not acts["0:out"].requires_grad
    assert torch.equal(acts["0:out"], net[0](x))  # negatives survive the in-place ReLU
    assert (acts["0:out"] < 0).any()


def test_tuple_and_mapping_inputs():
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return self.lin(a * b)

    net, a, b = Two(), torch.randn(5, 3), torch.randn(5, 3)
    ref = net.lin(a * b)
    assert torch.equal(probes.capture(net, (a, b), "lin:out")["lin:out"], ref)
    assert torch.equal(
        probes.capture(net, {"a": a, "b": b}, "lin:out", batch_size=2)["lin:out"][:2],
        net.lin(a[:2] * b[:2]),
    )


def test_no_hook_left_when_model_raises_mid_batch(seq):
    seq.insert(2, BoomAfter(n=2))  # second batch raises
    with pytest.raises(RuntimeError, match="boom"):
        probes.capture(seq, torch.randn(8, 4), ["0:out", "4:in", ":out"], batch_size=4)
    assert seq[2].calls == 2
    assert n_hooks(seq) == 0


def test_no_hook_left_when_a_site_is_bad(seq):
    with pytest.raises(probes.UnknownSiteError):
        probes.capture(seq, torch.randn(2, 4), ["0:out", "9:out"])
    assert n_hooks(seq) == 0


def test_site_that_never_fires_is_an_error():
    class Skip(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.unused = nn.Linear(2, 2), nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    net = Skip()
    with pytest.raises(SiteCaptureError, match=r"\['unused:out'\] did not fire"):
        probes.capture(net, torch.randn(3, 2), ["used:out", "unused:out"])
    assert n_hooks(net) == 0


def test_non_tensor_output_is_an_error():
    net = nn.Sequential(nn.GRU(3, 4, batch_first=True))
    with pytest.raises(SiteCaptureError, match="tuple, not a tensor"):
        probes.capture(net, torch.randn(2, 5, 3), "0:out")
    assert n_hooks(net) == 0


def test_module_called_twice_is_an_error():
    lin = nn.Linear(3, 3)
    net = nn.Module()
    net.lin = lin
    net.forward = lambda x: lin(lin(x))
    with pytest.raises(SiteCaptureError, match="more than once"):
        probes.capture(net, torch.randn(2, 3), "lin:out")
    assert n_hooks(net) == 0


def test_existing_user_hooks_are_kept(seq):
    calls = []
    handle = seq[0].register_forward_hook(lambda m, i, o: calls.append(1))
    before = hook_state(seq)
    probes.capture(seq, torch.randn(4, 4), "0:out", batch_size=2)
    assert hook_state(seq) == before and calls == [1, 1]
    handle.remove()


def test_hooked_root_module_matches_run_with_cache(policy):
    x = torch.randn(7, 4)
    out, cache = policy.run_with_cache(x)
    acts = probes.capture(policy, x, ["hook_torso", "hook_logits", "head:out"])
    assert torch.equal(acts["hook_torso"], cache["hook_torso"])
    assert torch.equal(acts["hook_logits"], cache["hook_logits"])
    assert torch.equal(acts["head:out"], out)
    assert n_hooks(policy) == 0


def test_hooked_root_module_no_hook_left_on_error():
    policy = make_policy()
    policy.torso.append(BoomAfter(n=3))
    with pytest.raises(RuntimeError, match="boom"):
        probes.capture(policy, torch.randn(9, 4), ["hook_torso", "hook_logits"], batch_size=3)
    assert n_hooks(policy) == 0
    assert all(not hp.fwd_hooks and not hp.bwd_hooks for hp in policy.hook_dict.values())


def test_bridge_matches_run_with_cache_and_keys_by_alias(bridge):
    tokens = torch.randint(0, 20, (3, 8))
    _, cache = bridge.run_with_cache(tokens)
    names = [
        "blocks.0.hook_resid_post",
        "blocks.1.hook_out",
        "blocks.0.attn.hook_pattern",
        "blocks.1.mlp.hook_post",
        "hook_embed",
    ]
    before = hook_state(bridge)
    acts = probes.capture(bridge, tokens, names)
    assert hook_state(bridge) == before
    assert list(acts) == names
    for name in names:
        assert torch.equal(acts[name], cache[name]), name
    assert acts["blocks.0.hook_resid_post"].shape == (3, 8, 16)


def test_bridge_positions_and_batches(bridge):
    tokens = torch.randint(0, 20, (5, 8))
    _, cache = bridge.run_with_cache(tokens)
    last = probes.capture(bridge, tokens, "blocks.1.hook_resid_post", positions=-1)
    torch.testing.assert_close(
        last["blocks.1.hook_resid_post"], cache["blocks.1.hook_resid_post"][:, -1]
    )
    some = probes.capture(
        bridge,
        tokens,
        ["blocks.1.hook_resid_post", "blocks.0.attn.hook_pattern"],
        positions=[0, 3],
        batch_size=2,
    )
    torch.testing.assert_close(
        some["blocks.1.hook_resid_post"], cache["blocks.1.hook_resid_post"][:, [0, 3]]
    )
    # attention patterns are [batch, head, query, key]: positions pick queries
    torch.testing.assert_close(
        some["blocks.0.attn.hook_pattern"], cache["blocks.0.attn.hook_pattern"][:, :, [0, 3]]
    )


def test_bridge_no_hook_left_when_model_raises_mid_batch(bridge):
    tokens = torch.randint(0, 20, (4, 8))
    tokens[3, 0] = 99  # out of vocabulary: the second batch fails inside the embedding
    before = hook_state(bridge)
    with pytest.raises((IndexError, RuntimeError)):
        probes.capture(bridge, tokens, ["blocks.0.hook_resid_post", "hook_embed"], batch_size=2)
    assert hook_state(bridge) == before
    assert all(not hp.fwd_hooks for hp in bridge.hook_dict.values())


def test_bad_batch_size(seq):
    with pytest.raises(ValueError, match="batch_size"):
        probes.capture(seq, torch.randn(2, 4), "0:out", batch_size=0)
