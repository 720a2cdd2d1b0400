"""The report of a run that is not the demo: a plain contextual bandit recorded, probed and
attributed by hand. It renders every generic section (timeline, circuits, credit by each tag,
completeness, validation when written) and says nothing of TrashWorld."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import chisel
import probes
from chisel.report import write_report

N_ARMS, D_OBS = 3, 4


def _bandit_run(run_dir):
    """REINFORCE on a contextual bandit: arm = argmax of the first 3 inputs pays 1."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D_OBS, 8), nn.Tanh(), nn.Linear(8, N_ARMS))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(1)
    with chisel.record(model, opt, run_dir, factors=True) as rec:
        for _ in range(6):
            obs = torch.randn(16, D_OBS, generator=gen)
            dist = torch.distributions.Categorical(logits=model(obs))
            actions = dist.sample()
            reward = (actions == obs[:, :N_ARMS].argmax(1)).float()
            advantage = reward - reward.mean()
            loss = -(dist.log_prob(actions) * advantage).mean()
            opt.zero_grad()
            loss.backward()
            rec.tag(reward=reward, advantage=advantage)
            opt.step()
    return model


@pytest.fixture(scope="module")
def bandit(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("bandit") / "run"
    model = _bandit_run(run_dir)
    gen = torch.Generator().manual_seed(2)
    obs = torch.randn(256, D_OBS, generator=gen)
    acts = probes.capture(model, obs, sites=["1:out"])["1:out"]
    feature = probes.fit_probe(acts, (obs[:, 0] > 0).long(), name="first_positive", site="1:out")
    arms = probes.neurons("2:out", range(N_ARMS), dim=N_ARMS, prefix="arm")  # the action head
    features = probes.FeatureSet([feature, *arms])
    metric = chisel.metrics.logprob(obs[:64], obs[:64, :N_ARMS].argmax(1))
    chisel.attribute(run_dir, model, features, metric, out=True, progress=False)
    return run_dir, model, features, metric


_DEMO_WORDS = re.compile(r"trash|wall_blue|blue.wall|button|TrashWorld|reward event", re.I)


def _demo_words(page: str) -> list[str]:
    """Demo words in the page's text (embedded PNGs left out: base64 spells words by chance)."""
    return _DEMO_WORDS.findall(re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page))


def test_report_of_a_plain_bandit_has_the_generic_sections(bandit):
    run_dir, *_ = bandit
    page = write_report(run_dir).read_text()
    for anchor in ("summary", "timeline", "circuits", "credit", "completeness", "artifacts"):
        assert f'<section id="{anchor}">' in page, anchor
    for anchor in ("probes", "causal"):
        assert f'<section id="{anchor}">' not in page
    assert not _demo_words(page), _demo_words(page)[:5]
    assert "first_positive" in page and "first_positive→arm[0]" in page  # a circuit
    assert "Credit by tag" in page and "tag/reward" in page and "tag/advantage" in page
    assert "reward = 0" in page and "reward = 1" in page  # a tag with few values: per value
    assert "advantage &gt; 0" in page and "advantage &lt; 0" in page  # fractions: by sign
    for name in ("demo.json", "probes.parquet", "causal.json"):
        assert name not in page
    assert "Not shown: the chisel timeline" not in page and "Not shown: credit" not in page
    assert (run_dir / "figures" / "credit.png").exists()


def test_cli_report_of_a_plain_bandit(bandit, tmp_path):
    from chisel.cli import main

    run_dir, *_ = bandit
    assert main(["report", str(run_dir), "--out", str(tmp_path / "r.html")]) == 0
    assert not _demo_words((tmp_path / "r.html").read_text())


def test_validation_shows_when_written(bandit, tmp_path):
    run_dir, model, features, metric = bandit
    import shutil

    effects = chisel.pathway_effects(run_dir, model, features, metric)
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    table = chisel.validation_table(chisel.load_ledger(copy / "ledger.parquet"), effects)
    table.to_parquet(copy / "validation.parquet", index=False)
    page = write_report(copy).read_text()
    assert '<section id="validation">' in page
    assert "validation.parquet is not in the run directory" not in page
    assert "Not shown: the validation by intervention" not in page
    assert not _demo_words(page)
