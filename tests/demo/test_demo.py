"""`chisel demo --quick` end to end: every artifact of docs/demo-run.md, the report, the notebook.

One quick demo run (about 30 s) is shared by the module; each test reads what it wrote.
"""

from __future__ import annotations

import base64
import html
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import chisel
import probes
from chisel.agents.ppo import PPOConfig
from chisel.cli import main
from chisel.demo import DemoConfig, DemoConfigError
from chisel.demo.config import ACTOR_INPUT_SITES, QUICK
from chisel.envs import ACTION_NAMES
from chisel.report import html as H
from tests.notebooks import execute

ROOT = Path(__file__).resolve().parents[2]
FIGURES = {"timeline", "probes", "circuits", "credit", "completeness", "coverage", "validation"}
EVIL = "<script>alert(1)</script>"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "quick"
    assert main(["demo", "--quick", "--out", str(out), "--seed", "1"]) == 0
    return out


@pytest.fixture(scope="module")
def demo(run_dir) -> dict:
    return json.loads((run_dir / "demo.json").read_text())


@pytest.fixture(scope="module")
def ledger(run_dir) -> pd.DataFrame:
    return chisel.load_ledger(run_dir / "ledger.parquet")


def test_every_artifact_exists(run_dir):
    for name in (
        "manifest.json",
        "ledger.parquet",
        "probes.parquet",
        "demo.json",
        "causal.json",
        "validation.parquet",
        "validation.json",
        "report.html",
    ):
        assert (run_dir / name).is_file(), name
    assert {p.stem for p in (run_dir / "figures").glob("*.png")} == FIGURES
    run = chisel.load(run_dir)
    ppo = PPOConfig(total_timesteps=QUICK["total_timesteps"], num_envs=QUICK["num_envs"])
    assert len(run) == ppo.num_updates == 512
    assert set(run.factors(0)) == {"pi_fc1", "pi_fc2", "pi_out"}
    assert run.factors(1) == {} or not run.factors(1)  # factors every 16th step only
    tags = run.tags(8)
    assert {
        "advantage",
        "reward",
        "reward_source",
        "next_reward_source",
        "advantage_sign",
        "episode_id",
    } <= set(tags)
    assert set(np.unique(np.asarray(tags["advantage_sign"]))) <= {-1.0, 1.0}


def test_report_embeds_every_figure(run_dir):
    page = (run_dir / "report.html").read_text()
    for name in FIGURES:
        png = (run_dir / "figures" / f"{name}.png").read_bytes()
        assert base64.b64encode(png).decode() in page, name
    assert "Not shown" not in page
    assert "http://" not in page and "https://" not in page


def test_ledger_has_all_families_and_closes(ledger, demo):
    assert set(ledger.family) == {"geometry", "integrated", "credit"}
    comp = ledger[(ledger.family == "integrated") & (ledger.quantity == "completeness_rel")]
    assert sorted(comp.step) == demo["attributed_steps"]
    assert comp.value.max() < 1e-6
    # credit rows of a step (whole rows, every part and tag group) sum to ⟨Δθ, ḡ⟩ of that step
    total = ledger[(ledger.family == "integrated") & (ledger.quantity == "attribution_total")]
    whole = ledger[(ledger.family == "credit") & (ledger.feature == "")]
    credit = whole.groupby("step").value.sum()
    assert list(credit.index) == demo["credit_steps"]
    expected = total.set_index("step").value.loc[credit.index]
    np.testing.assert_allclose(credit.values, expected.values, rtol=1e-6, atol=1e-9)
    grouped = whole[whole["tag/reward_source"].notna()]
    assert len(grouped) and grouped["sample"].isna().all()
    assert set(grouped["tag/advantage_sign"]) <= {-1.0, 1.0}
    circuits = ledger[(ledger.family == "geometry") & (ledger.quantity == "circuit")]
    assert circuits.feature.str.endswith("→pick_up@hook_logits").any()


def test_demo_json_is_sane(run_dir, demo):
    assert demo["quick"] is True and demo["button"] == "none" and demo["seed"] == 1
    r = demo["returns"]
    assert 1.0 < r["oracle"] <= 2.0 and 0.0 <= r["random"] < 0.2 * r["oracle"]
    assert r["ratio"] == pytest.approx(r["agent"] / r["oracle"])
    assert r["ratio"] >= 0.5  # the quick preset learns (issue 14: it used to reach 2% of the oracle)
    wall = demo["wall_time_s"]
    assert {"train", "probes", "attribute", "validate", "causal", "report", "total"} <= set(wall)
    assert wall["total"] >= sum(v for k, v in wall.items() if k != "total") - 1e-6
    curve = pd.DataFrame(demo["training_curve"])
    assert list(curve["update"]) == [16 * (i + 1) for i in range(32)]
    assert curve.env_steps.is_monotonic_increasing
    assert demo["attributed_steps"] == list(range(0, 512, 4))
    assert demo["credit_steps"] == list(range(0, 512, 16))
    assert demo["action_names"] == list(ACTION_NAMES)
    assert demo["concepts"]["reward_predictive"] == ["reward_within_k"]
    assert demo["concepts"]["spurious"] == ["wall_blue"]
    features = probes.FeatureSet.load(run_dir / "features")
    assert set(demo["feature_concepts"]) == set(features.names)
    for action in ACTION_NAMES:
        assert demo["feature_concepts"][f"{action}@hook_logits"] == action
    assert "holding_trash@hook_pi_hidden2" in features
    assert "reward_within_k@hook_obs" in features


def test_dictionary_latents_join_the_features_with_concepts(run_dir, demo):
    features = probes.FeatureSet.load(run_dir / "features")
    latents = [f for f in features if f.source == "sae"]
    n = demo["config"]["dictionary_latents"]
    assert n == 16
    usable = {f.metadata["concept"] for f in features if f.source == "probe"}
    for site in ACTOR_INPUT_SITES:
        at = [f for f in latents if f.site == site]
        assert at, site
        assert len(at) == n - len(at[0].metadata["dead_latents"])
        assert all(f.name == f"sae{f.metadata['latent']}@{site}" for f in at)
        assert at[0].metadata["variance_explained"] > 0.5
    assert features.names[-len(latents) :] == [f.name for f in latents]  # after the probes
    for f in latents:
        concept = f.metadata["concept"]
        assert concept in usable | {"unlabelled"}
        assert demo["feature_concepts"][f.name] == concept
        assert (concept == "unlabelled") == (f.metadata["concept_score"] < 0.5)
    assert any(f.metadata["concept"] != "unlabelled" for f in latents)


def test_probe_table_covers_checkpoints_sites_concepts(run_dir):
    table = pd.read_parquet(run_dir / "probes.parquet")
    assert list(table.columns) == ["step", "site", "concept", "metric", "score"]
    assert sorted(table.step.unique()) == [0, 256, 512]
    assert {"hook_obs", "hook_pi_hidden1", "hook_pi_hidden2", "hook_logits"} <= set(table.site)
    assert {"holding_trash", "wall_blue", "reward_within_k"} <= set(table.concept)
    assert table.score.between(0, 1).all()


def test_causal_json_follows_the_contract(run_dir):
    causal = json.loads((run_dir / "causal.json").read_text())
    features = probes.FeatureSet.load(run_dir / "features")
    names = set(features.names)
    assert [c["name"] for c in causal["conditions"]] == ["top", "bottom", "random"]
    top, bottom, rand = causal["conditions"]
    assert len(top["features"]) == len(bottom["features"]) == causal["k"] == 3
    assert set(top["features"]).isdisjoint(bottom["features"])
    assert set(top["features"] + bottom["features"] + rand["features"]) <= names
    assert rand["seeds"] == QUICK["causal_seeds"]
    # the seeds draw different directions, and projecting them out moves the return differently
    assert len(set(rand["features"])) > causal["k"] and rand["std"] > 0
    probed = [f for f in features if f.source == "probe" and f.site.startswith("hook_pi_hidden")]
    assert len(causal["singles"]) == len(probed)  # the causal check ablates probes only


def test_validation_files_are_consistent(run_dir):
    """validation.parquet / .json: every attributed feature validated, Shapley sums to its total."""
    from chisel.demo.validate import ACTOR_WEIGHTS, COLUMNS

    table = pd.read_parquet(run_dir / "validation.parquet")
    summary = json.loads((run_dir / "validation.json").read_text())
    assert list(table.columns) == COLUMNS and table.pathway.is_unique
    players = table[table.kind != "group"]
    assert set(players.kind) == {"feature", "<mean>", "<residual>", "<bias>"}
    assert set(table.param) - {""} <= set(ACTOR_WEIGHTS) | {w.replace("weight", "bias") for w in ACTOR_WEIGHTS}
    # the headline game is played by the feature pathways; the other pathways are removal-only
    assert summary["shapley_players"] == "features"
    playing = players[players.shapley.notna()]
    assert set(playing.kind) == {"feature"} and playing.shapley_se.notna().all()
    total = summary["metric_final"] - summary["metric_reverted"]
    assert summary["shapley_total"] == pytest.approx(total, abs=1e-12)
    assert playing.shapley.sum() == pytest.approx(summary["shapley_total"], abs=1e-10)
    assert len(playing) == summary["players"]
    whole = summary["delta_metric_reverted"]  # m(final) − m(every pathway reverted)
    # every feature at an actor input site has a pathway and both ablations
    features = probes.FeatureSet.load(run_dir / "features")
    attributed = {f.name for f in features if f.site in ACTOR_INPUT_SITES}
    named = players[players.kind == "feature"]
    assert set(named.feature) == attributed and {"hook_obs"} <= set(named.site)
    assert named[["attribution", "removal", "ablation_metric", "ablation_return"]].notna().all().all()
    assert summary["coverage_shapley"] == pytest.approx(named.shapley.sum() / whole, rel=1e-9)
    assert summary["ablation"]["features"] == len(attributed)
    for key in ("attribution_vs_removal", "shapley_vs_removal", "attribution_vs_ablation_metric",
                "attribution_vs_ablation_return", "shapley_vs_ablation_return"):
        entry = summary["spearman"][key]
        assert entry["n"] == len(named) and -1 <= entry["rho"] <= 1, key
    assert summary["evaluations"] > summary["permutations"] * (summary["players"] - 1)


def test_notebook_executes_on_the_run(run_dir, monkeypatch):
    monkeypatch.setenv("CHISEL_RUN", str(run_dir))
    text = execute("01_trashworld.ipynb", run_dir)  # raises on the first failing cell
    assert f"run {run_dir}" in text and "largest relative completeness error" in text


def test_an_evil_feature_name_is_escaped(run_dir, tmp_path):
    """Rename a feature everywhere the report reads names, then rewrite the report."""
    copy = tmp_path / "evil"
    copy.mkdir()
    for name in ("manifest.json", "ledger.parquet", "probes.parquet", "causal.json"):
        shutil.copy(run_dir / name, copy / name)
    victim = "holding_trash@hook_pi_hidden2"
    led = pd.read_parquet(copy / "ledger.parquet")
    led["feature"] = led.feature.str.replace(victim, EVIL, regex=False)
    led.to_parquet(copy / "ledger.parquet")
    demo = json.loads((run_dir / "demo.json").read_text())
    demo["feature_concepts"][EVIL] = demo["feature_concepts"].pop(victim)
    demo["metric"] = EVIL
    (copy / "demo.json").write_text(json.dumps(demo))
    page = chisel.write_report(copy).read_text()
    assert EVIL not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_cli_rejects_a_bad_button(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--button", "sometimes"])
    assert "invalid choice" in capsys.readouterr().err


def test_config_is_validated():
    assert DemoConfig.make(quick=True).total_timesteps == QUICK["total_timesteps"]
    assert DemoConfig.make(quick=True, factors_every=4).factors_every == 4
    with pytest.raises(DemoConfigError, match="attribute_every"):
        DemoConfig(attribute_every=0)
    with pytest.raises(DemoConfigError, match="causal_sites"):
        DemoConfig(causal_sites=("hook_value",))
    with pytest.raises(DemoConfigError, match="dictionary_latents=-1: must be >= 0"):
        DemoConfig(dictionary_latents=-1)
    assert DemoConfig(dictionary_latents=0).dictionary_latents == 0
    assert os.fspath(DemoConfig(out="x").out) == "x"


def test_report_headline_says_who_plays_the_shapley_game(run_dir):
    page = html.unescape((run_dir / "report.html").read_text())
    summary = json.loads((run_dir / "validation.json").read_text())
    assert "The players are the feature pathways only" in page
    assert f"carry {H.pct(summary['coverage_shapley'])} of the whole learned change" in page


def test_demo_json_names_the_demo_report_sections(demo, run_dir):
    """The report finds the demo's sections through demo.json, and shows them."""
    from chisel.report.scenario import SECTIONS_KEY

    assert demo[SECTIONS_KEY] == "chisel.demo.report_sections"
    page = (run_dir / "report.html").read_text()
    for anchor in ("reward-optimizer", "probes", "causal"):
        assert f'<section id="{anchor}">' in page, anchor
    assert "Credit by reward event and advantage sign" in page
