"""Sites: listing, resolving, aliases, and the unknown-site error."""

from __future__ import annotations

import pytest

import probes
from probes import Site, UnknownSiteError


def test_sequential_sites_are_module_in_out(seq):
    assert probes.sites(seq) == [":in", ":out"] + [
        f"{i}:{s}" for i in range(5) for s in ("in", "out")
    ]
    assert probes.resolve_site(seq, "2:out") == Site("2:out", "out", "2")
    assert probes.resolve_site(seq, ":in") == Site(":in", "in", "")


def test_unknown_site_lists_closest_names(seq):
    with pytest.raises(UnknownSiteError) as err:
        probes.resolve_site(seq, "2:outt")
    msg = str(err.value)
    assert "'2:outt'" in msg and "Closest valid sites: '2:out'" in msg
    assert "probes.sites(model)" in msg
    with pytest.raises(UnknownSiteError, match="end in ':in' or ':out'"):
        probes.resolve_site(seq, "2")
    with pytest.raises(UnknownSiteError):
        probes.resolve_site(seq, "7:out")  # no such module


def test_unknown_site_is_a_value_error_and_key_error(seq):
    with pytest.raises(ValueError):
        probes.resolve_site(seq, "nope:out")
    with pytest.raises(KeyError):
        probes.resolve_site(seq, "nope:out")


def test_hooked_root_module_lists_hook_names_then_modules(policy):
    names = probes.sites(policy)
    assert names[:2] == ["hook_torso", "hook_logits"]
    assert {"torso.0:out", "head:in", ":out"} <= set(names)
    assert "hook_torso:out" not in names  # HookPoints are reached by their hook name
    assert probes.resolve_site(policy, "hook_torso") == Site("hook_torso", "hook", "hook_torso")
    with pytest.raises(UnknownSiteError, match="'hook_torso'"):
        probes.resolve_site(policy, "hook_torsoo")


def test_bridge_lists_hooks_and_resolves_legacy_alias(bridge):
    names = probes.sites(bridge)
    assert set(bridge.hook_dict) <= set(names)
    assert "blocks.1.hook_resid_post" in names and "blocks.0.hook_out" in names
    site = probes.resolve_site(bridge, "blocks.0.hook_resid_post")
    assert site.name == "blocks.0.hook_resid_post"  # keyed by the name asked
    assert site.target == "blocks.0.hook_out"  # the canonical hook
    with pytest.raises(UnknownSiteError, match=r"blocks\.0\.hook_resid_post"):
        probes.resolve_site(bridge, "blocks.0.hook_resid_postt")
