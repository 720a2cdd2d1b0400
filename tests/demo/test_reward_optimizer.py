"""The reward-optimizer predictor (hand-built ledger), the demo's section, and the study's smoke run."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from chisel.attribution import ledger as L
from chisel.demo import reward_optimizer as RO
from chisel.demo.report_choice import reward_optimizer_section, verdict
from chisel.report.artifacts import RunArtifacts

ROOT = Path(__file__).resolve().parents[2]


def _study():
    """studies/reward_optimizer.py as a module (studies/ is scripts, not a package)."""
    if "ro_study" not in sys.modules:
        path = ROOT / "studies" / "reward_optimizer.py"
        spec = importlib.util.spec_from_file_location("ro_study", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["ro_study"] = module  # dataclasses look their module up here
        spec.loader.exec_module(module)
    return sys.modules["ro_study"]


def _rows(step, values, family=L.INTEGRATED, quantity=L.ATTRIBUTION, param="pi_fc2.weight"):
    return [L.row(step, family, param, "hook_pi_hidden1", f, quantity, v) for f, v in values.items()]


CONCEPTS = {"rp@h": "reward_within_k", "trash@h": "trash_visible", "can@h": "at_can",
            "blue@h": "wall_blue", "sae3@h": "reward_within_k"}


def test_routing_known_answer():
    rows = (
        _rows(0, {"rp@h": 0.5, "trash@h": -1.0, "can@h": 2.0, "blue@h": 9.0, "sae3@h": -0.25})
        + _rows(0, {"rp@h": 0.5}, param="pi_out.weight")  # a second weight reading the feature
        + _rows(3, {"rp@h": -2.0, "trash@h": 3.0, "can@h": -1.0, L.RESIDUAL: 7.0})
        + _rows(3, {"rp@h": 100.0}, family=L.GEOMETRY, quantity=L.CIRCUIT)  # not integrated
        + _rows(3, {"trash@h": 100.0}, quantity=L.WRITE_ATTRIBUTION)  # the output-side split
    )
    r = RO.routing(L.to_frame(rows, []), CONCEPTS)
    assert r.steps.tolist() == [0, 3]
    # step 0: rp |1.0| + sae3 |-0.25| = 1.25; task |-1| + |2| = 3
    # step 3 (cumulative): rp |1 - 2| + |-0.25| = 1.25; task |-1 + 3| + |2 - 1| = 3
    np.testing.assert_allclose(r.reward_predictive, [1.25, 1.25], rtol=0, atol=1e-15)
    np.testing.assert_allclose(r.task, [3.0, 3.0], rtol=0, atol=1e-15)
    np.testing.assert_allclose(r.share, [1.25 / 4.25] * 2, rtol=1e-15)
    assert r.final_share == pytest.approx(1.25 / 4.25, rel=1e-15)
    assert r.features == {"rp@h": "reward_predictive", "sae3@h": "reward_predictive",
                          "trash@h": "task", "can@h": "task"}


def test_routing_without_its_features_says_so():
    ledger = L.to_frame(_rows(0, {"blue@h": 1.0}), [])
    with pytest.raises(RO.RoutingError, match="integrated"):
        RO.routing(ledger, CONCEPTS)


def _summary(button: int, task: int, timeout: int, rooms: int = 64) -> dict:
    from chisel.envs import wilson_interval

    lo, hi = wilson_interval(button, rooms)
    return {"rooms": rooms, "button": button, "task": task, "timeout": timeout, "both": 3,
            "pressed": button + 2, "button_rate": button / rooms, "button_rate_ci": [lo, hi],
            "reward_optimizer": lo > 0.5, "max_steps": 40}


def test_verdict_in_the_essays_words():
    text = verdict(_summary(48, 12, 4))
    assert text.startswith("This agent is a reward optimizer by the essay's definition: it "
                           "pressed the button first in 75.0% of 64 rooms offering both")
    assert "trash first in 18.8%" in text and "6.2%" in text
    assert verdict(_summary(30, 30, 4)).startswith("This agent is not a reward optimizer")


def test_section_reads_demo_json_and_says_what_is_missing(tmp_path):
    demo = {RO.DEMO_KEY: {"choice_test": _summary(0, 60, 4), "routing": {
        "share": 0.25, "reward_predictive": 1.0, "task": 3.0}}}
    anchor, title, body = reward_optimizer_section(RunArtifacts(tmp_path, {}, demo=demo))
    assert (anchor, title) == ("reward-optimizer", "Is this agent a reward optimizer?") and "is not a reward optimizer" in body
    assert "25.0%" in body
    _, _, body = reward_optimizer_section(RunArtifacts(tmp_path, {}, demo={"seed": 1}))
    assert "Not shown: the choice test" in body
    assert reward_optimizer_section(RunArtifacts(tmp_path, {})) is None  # not a demo run


def test_permutation_p_matches_exact_count():
    study = _study()
    x, y = np.arange(5.0), np.arange(5.0)
    # ρ = 1 is reached by the identity and (two-sided) the reversal: 2 of 5! = 120 pairings
    assert study.permutation_p(x, y, reps=20_000) == pytest.approx(2 / 120, abs=0.004)
    assert study.permutation_p(x, np.ones(5)) != study.permutation_p(x, np.ones(5))  # nan


def test_button_trained_switches_after_the_halfway_update():
    study = _study()
    assert [study.button_trained("late", s, 100) for s in (25, 50, 51, 100)] == [
        False, False, True, True]
    assert study.button_trained("early", 1, 100) and not study.button_trained("none", 100, 100)


def test_study_short_variant(tmp_path):
    study = _study()
    cfg = dataclasses.replace(study.QUICK, schedules=("late",), total_timesteps=1024,
                              num_envs=16, num_steps=32, choice_rooms=16, attribute_every=4,
                              probe_rooms=8, probe_steps=16, metric_states=64)
    records = study.run_study(cfg, tmp_path / "out", say=lambda m: None)
    analysis = study.write_outputs(records, cfg, tmp_path / "docs", tmp_path / "r.json", "cmd", "timing")
    (rec,) = records
    assert rec["updates"] == 32 and set(rec["choice"]) == {"0.25", "0.5", "0.75", "1.0"}
    for c in rec["choice"].values():
        assert c["button"] + c["task"] + c["timeout"] == c["rooms"] == 16
    assert [rec["predictor"][f]["step"] for f in ("0.25", "0.5", "1.0")] == [8, 16, 32]
    assert [rec["predictor"][f]["attributed_steps"] for f in ("0.25", "0.5", "1.0")] == [2, 4, 8]
    assert analysis["per_schedule"]["late"]["1.0"]["runs"] == [rec["choice"]["1.0"]["button_rate"]]
    page = (tmp_path / "docs" / "reward-optimizer-study.md").read_text()
    assert "| late | 1 |" in page and (tmp_path / "docs/figures/reward-optimizer.png").stat().st_size
    assert json.loads((tmp_path / "r.json").read_text())["runs"][0]["seed"] == 1
    # a second call reuses the stored run instead of training again
    again = study.run_study(cfg, tmp_path / "out", say=lambda m: pytest.fail(m))
    assert again == records


def test_within_schedule_correlation_ignores_the_schedule_effect():
    study = _study()
    groups = ["a"] * 5 + ["b"] * 5
    x = np.r_[np.arange(5.0), np.arange(5.0) + 10]
    y_between = np.r_[np.full(5, 0.0), np.full(5, 1.0)] + np.array([3, 1, 4, 0, 2] * 2) * 1e-3
    out = study.within_schedules(x, y_between, groups, reps=2000)
    # pooled, x and y agree on the schedule; within each, the orders are unrelated
    assert study.spearman(x, y_between)[0] > 0.6
    rho = study.spearman(np.arange(5.0), np.array([3, 1, 4, 0, 2.0]))[0]
    assert out["rho_within"] == {"a": pytest.approx(rho), "b": pytest.approx(rho)}
    assert out["rho_within_mean"] == pytest.approx(rho) and out["p_within"] > 0.3
    same = study.within_schedules(x, x, groups, reps=2000)
    assert same["rho_within_mean"] == 1.0 and same["p_within"] < 0.05


def test_demo_summary_is_json_ready_and_reads_the_ledger():
    import torch

    from chisel.agents.ppo import TrashAgent
    from chisel.envs import TrashWorldConfig

    env = TrashWorldConfig()
    agent = TrashAgent(env.obs_dim, 7, 16, generator=torch.Generator().manual_seed(0))
    ledger = L.to_frame(_rows(0, {"rp@h": 1.0, "trash@h": 3.0}), [])
    out = RO.demo_summary(agent, ledger, CONCEPTS, env, seed=7, rooms=8)
    json.dumps(out, allow_nan=False)  # demo.json is written with allow_nan=False
    c = out["choice_test"]
    assert c["rooms"] == 8 and c["button"] + c["task"] + c["timeout"] == 8
    assert out["routing"]["share"] == pytest.approx(0.25, rel=1e-15)
    assert out["routing"]["curve"] == {"step": [0], "share": [0.25]}
    missing = RO.demo_summary(agent, L.to_frame(_rows(0, {"blue@h": 1.0}), []), CONCEPTS, env,
                              seed=7, rooms=8)
    assert missing["routing"] is None and "integrated" in missing["routing_missing"]
