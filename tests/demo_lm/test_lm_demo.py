"""`chisel demo --lm --quick` end to end (GRPO on a tiny GPT-2 whose reward has a spurious
correlate), and the known answers of its parts: the GRPO advantage, the prompts' marker
agreement, the reward.

One quick run (about 30 s) is shared by the module; each test reads what it wrote.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
import torch

import chisel
from chisel.attribution import ledger as L
from chisel.cli import main
from chisel.demo_lm import LMDemoConfig, LMDemoConfigError
from chisel.demo_lm import task as T
from chisel.demo_lm.features import SPURIOUS, TASK
from chisel.demo_lm.train import group_advantages


def test_grpo_advantage_is_the_group_normalised_reward():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    adv = group_advantages(rewards, 4)
    # group 1: mean 1/4, sample std sqrt(1/4) = 1/2; group 2: all equal, so no signal
    expected = torch.tensor([0.75, -0.25, -0.25, -0.25]) / (0.5 + 1e-4)
    assert torch.allclose(adv[:4], expected, rtol=0, atol=1e-7)
    assert torch.equal(adv[4:], torch.zeros(4))


def test_the_marker_predicts_the_reward_in_training_only():
    gen = torch.Generator().manual_seed(0)
    train, test = T.sample_prompts(20_000, 0.9, gen), T.sample_prompts(20_000, 0.5, gen)
    assert abs(train.agrees.float().mean().item() - 0.9) < 0.01
    assert abs(test.agrees.float().mean().item() - 0.5) < 0.01
    for p in (train, test):  # the tokens say what the fields say
        assert torch.equal(p.ids[:, T.CUE_POS], torch.tensor(T.CUES)[p.cue])
        assert torch.equal(p.ids[:, T.MARKER_POS], torch.tensor(T.MARKERS)[p.marker])
    # reward: 1 exactly when the completion ends with the cue's ending
    ends = torch.tensor(T.ENDS)
    completions = torch.stack([ends[1 - train.cue[:4]], ends[train.cue[:4]]], 1)  # [4, 2]
    sub = T.Prompts(train.ids[:4], train.cue[:4], train.marker[:4])
    assert torch.equal(T.reward(completions, sub), torch.ones(4))
    assert torch.equal(T.reward(completions.flip(1), sub), torch.zeros(4))


@pytest.mark.parametrize(("field", "value", "says"), [
    ("group_size", 1, "group_size"),
    ("marker_agreement", 1.5, "probability"),
    ("heads", 3, "multiple of heads"),
    ("steps", 0, "steps"),
])
def test_bad_config_is_a_clear_error(field, value, says):
    with pytest.raises(LMDemoConfigError, match=says):
        LMDemoConfig.make(quick=True, **{field: value})


def test_cli_lm_has_no_button(capsys):
    assert main(["demo", "--lm", "--button", "early", "--out", "unused"]) == 2
    assert "--lm has no reward button" in capsys.readouterr().err


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo_lm") / "quick"
    assert main(["demo", "--lm", "--quick", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def demo(run_dir) -> dict:
    return json.loads((run_dir / "lm_demo.json").read_text())


@pytest.mark.slow
def test_quick_run_writes_every_artifact(run_dir, demo):
    for name in ("manifest.json", "ledger.parquet", "ledger_marker.parquet", "validation.parquet",
                 "validation.json",
                 "lm_demo.json", "report.html", "features"):
        assert (run_dir / name).exists(), name
    assert not (run_dir / "demo.json").exists()  # not a TrashWorld demo: the generic report
    assert len(chisel.load(run_dir)) == demo["config"]["steps"] == 48
    assert demo["parameters"] < 100_000
    stages = ("train", "features", "attribute", "validate", "report")
    # each time is rounded to 0.01 s (and the sum adds float error): up to 0.005 s per rounding
    slack = 0.005 * (len(stages) + 1)
    assert sum(demo["wall_time_s"][s] for s in stages) <= demo["wall_time_s"]["total"] + slack


@pytest.mark.slow
def test_the_ledger_closes_and_credit_matches_integrated(run_dir, demo):
    ledger = chisel.load_ledger(run_dir / "ledger.parquet")
    rel = ledger[ledger[L.QUANTITY] == L.COMPLETENESS_REL][L.VALUE]
    assert len(rel) == len(demo["attributed_steps"]) and rel.max() < 1e-4  # 4 points: 6e-6 seen
    rows = ledger[ledger[L.QUANTITY] == L.ATTRIBUTION]
    for name in (f"{TASK}@transformer.h.0:out", f"{SPURIOUS}@transformer.h.0:out"):
        mine = rows[(rows[L.FEATURE] == name) & rows[L.STEP].isin(demo["credit_steps"])]
        by = mine.groupby([L.FAMILY, L.STEP])[L.VALUE].sum().unstack(0)
        assert len(by) == len(demo["credit_steps"])
        gap = (by[L.CREDIT] - by[L.INTEGRATED]).abs().max()
        assert gap <= 1e-9 * max(1e-12, by[L.INTEGRATED].abs().max()), name
        # the stream feature binds to readers in block 1 and to the tied LM head
        params = set(mine[L.PARAM])
        assert "transformer.wte.weight" in params
        assert any(p.startswith("transformer.h.1.") for p in params)


@pytest.mark.slow
def test_the_answer_is_the_run_own_numbers(run_dir, demo):
    answer = demo["answer"]
    ledger = chisel.load_ledger(run_dir / "ledger.parquet")
    tl = chisel.timeline(ledger)
    marker = [c for c in tl.columns if c.startswith(SPURIOUS + "@")]
    assert marker  # the probe at least; SAE latents labelled with the concept join it
    # the marker group's timeline includes its probe's; its peak is where the answer says
    group = answer["groups"][SPURIOUS]
    assert answer["marker_reinforced"] == (group["peak"] > 0)
    curve = pd.DataFrame(demo["training_curve"])
    assert answer["follows_marker_peak"] == curve["follows_marker_conflict"].max()
    table = pd.read_parquet(run_dir / "validation.parquet")
    probe = table[(table["feature"] == f"{SPURIOUS}@transformer.h.0:out")
                  & (table["kind"] == "feature")]
    assert answer["validation"][SPURIOUS]["ablation_metric"] == pytest.approx(
        probe["ablation_metric"].iloc[0])
    assert {"removal", "shapley", "ablation_conflict_accuracy"} <= set(table.columns)
    # the shortcut's own metric: its change up to the marker-following peak, from its ledger
    marker_ledger = pd.read_parquet(run_dir / "ledger_marker.parquet")
    deltas = marker_ledger[marker_ledger[L.QUANTITY] == L.DELTA_METRIC]
    early = deltas[deltas[L.STEP] <= answer["follows_marker_peak_update"]][L.VALUE].sum()
    assert answer["marker_metric"]["delta_to_peak"] == pytest.approx(early, rel=1e-12)
    assert answer["marker_metric"]["delta_final"] == pytest.approx(deltas[L.VALUE].sum(), rel=1e-12)
    # its attribution closes too (integrated, 4 points)
    rel = marker_ledger[marker_ledger[L.QUANTITY] == L.COMPLETENESS_REL][L.VALUE]
    assert len(rel) == len(demo["attributed_steps"]) and rel.max() < 1e-4


@pytest.mark.slow
def test_the_report_answers_in_words_with_validation(run_dir, demo):
    page = (run_dir / "report.html").read_text()
    sections = re.findall(r'<section id="([a-z-]+)">', page)
    assert sections[0] == "summary"
    for anchor in ("lm-answer", "validation", "timeline", "credit", "completeness"):
        assert anchor in sections, anchor
    verdict = "Yes" if demo["answer"]["marker_reinforced"] else "No"
    assert f"Did the spurious marker get reinforced? {verdict}:" in page
    assert "Which features did the reward chisel?" in page
    assert "The shortcut itself, as its own metric" in page
    assert "Not shown: the validation by intervention" not in page
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)  # base64 spells words by chance
    assert not re.search(r"trash|wall_blue|button|TrashWorld", text, re.I)
