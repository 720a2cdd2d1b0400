"""The report of a synthetic demo run: every section, escaping, no external URL, exact numbers."""

from __future__ import annotations

import base64
import html
import json
import re

import pytest

from chisel.demo import report_credit as RD
from chisel.demo.report_numbers import demo_numbers
from chisel.errors import NotARunError
from chisel.report import html as H
from chisel.report import load_artifacts, summarize, write_report
from chisel.report import sections as S
from chisel.report import tables as T
from tests.report import synthetic as syn

FIGURES = ["timeline", "validation", "coverage", "probes", "circuits", "credit", "completeness"]
SECTIONS = [
    "summary",
    "timeline",
    "validation",
    "coverage",
    "probes",
    "circuits",
    "credit",
    "completeness",
    "causal",
    "artifacts",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return syn.make_run(tmp_path_factory.mktemp("report") / "run")


@pytest.fixture(scope="module")
def page(run_dir):
    """The report written once into the run directory (the default `out`)."""
    path = write_report(run_dir)
    assert path == run_dir / "report.html"
    return path.read_text()


def _totals() -> dict[str, float]:
    return {name: sum(values) for name, (_, values) in syn.FEATURES.items()}


def test_every_section_and_figure_is_written_and_embedded(run_dir, page):
    for anchor in SECTIONS:
        assert f'<section id="{anchor}">' in page
    for name in FIGURES:
        png = (run_dir / "figures" / f"{name}.png").read_bytes()
        assert png.startswith(b"\x89PNG")
        assert base64.b64encode(png).decode() in page
    assert page.count("data:image/png;base64,") == len(FIGURES)
    assert "Not shown" not in page


def test_self_contained_and_escaped(page):
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page.lower()
    assert syn.EVIL not in page
    assert html.escape(syn.EVIL) in page  # the feature and the concept, escaped
    assert "&lt;script&gt;alert(1)&lt;/script&gt;@hook_pi_hidden2" in page
    assert not re.search(r"""(src|href)=["'](?!data:|#)""", page)  # only data URIs and anchors


def test_summary_numbers_match_the_ledger(run_dir):
    art = load_artifacts(run_dir)
    s = summarize(art)
    n = demo_numbers(art, s)
    totals = _totals()
    assert [f.name for f in s.features] == sorted(totals, key=lambda n: -abs(totals[n]))
    for f in s.features:
        assert f.total == pytest.approx(totals[f.name], abs=1e-12)
    all_sum = sum(totals.values())
    all_abs = sum(abs(v) for v in totals.values())
    groups = {g.group: g for g in n.groups}
    for group, concepts in syn.CONCEPTS.items():
        members = [totals[n] for n, (c, _) in syn.FEATURES.items() if c in concepts]
        assert groups[group].total == pytest.approx(sum(members))
        assert groups[group].share == pytest.approx(sum(members) / all_sum)
        assert groups[group].abs_share == pytest.approx(sum(map(abs, members)) / all_abs)
    assert groups["other"].features == 1  # cost$x$ has no concept
    wall = n.correlate
    assert wall.features == [f"wall_blue@{syn.SITE}"]
    assert wall.best_rank == 6 and wall.n_features == 7
    assert wall.abs_share == pytest.approx(abs(totals[f"wall_blue@{syn.SITE}"]) / all_abs)
    assert not wall.chiseled
    assert s.completeness_max == max(syn.COMPLETENESS) and s.completeness_step == 8
    assert s.residual == pytest.approx(sum(syn.RESIDUAL) + sum(syn.BIAS))
    assert n.causal_baseline == 1.5
    assert {r.name: r.drop for r in n.causal} == pytest.approx(
        {"top": 1.1, "bottom": 0.05, "random": 0.2}
    )


def test_summary_numbers_are_printed(run_dir, page):
    art = load_artifacts(run_dir)
    s = summarize(art)
    n = demo_numbers(art, s)
    rwk = next(g for g in n.groups if g.group == "reward_predictive")
    task = next(g for g in n.groups if g.group == "task")
    for text in (
        H.pct(rwk.abs_share),
        H.pct(task.abs_share),
        H.num(rwk.total),
        H.num(task.total),
        H.pct(n.correlate.abs_share),
        "best rank 6 of 7",
        H.num(s.completeness_max),
        H.num(1.1),
        "was not chiseled much",
    ):
        assert html.escape(text) in page, text


def test_credit_tables_match_a_brute_force_sum(run_dir):
    led = load_artifacts(run_dir).ledger
    raw = syn.credit_samples()
    whole = raw[raw.feature == ""].dropna(subset=["sample"])
    by_source = RD.credit_by_reward_source(led)
    for code, label in RD.REWARD_SOURCES.items():
        rows = whole[whole["tag/reward_source"] == code]
        assert by_source.loc[label, "total"] == pytest.approx(rows.value.sum())
        assert by_source.loc[label, "samples"] == 2 * len(syn.STEPS)
    by_adv = RD.credit_by_advantage(led)
    assert by_adv.loc["advantage > 0", "total"] == pytest.approx(
        whole[whole["tag/advantage"] > 0].value.sum()
    )
    assert by_adv.loc["advantage < 0", "total"] == pytest.approx(
        whole[whole["tag/advantage"] < 0].value.sum()
    )
    parts = T.credit_parts(led)
    whole_rows = raw[raw.feature == ""]
    for part in ("gradient", "momentum", "weight_decay"):
        assert parts[part] == pytest.approx(whole_rows[whole_rows.part == part].value.sum())
    assert parts.sum() == pytest.approx(whole_rows.value.sum())


def test_credit_tables_read_credit_by_groups(tmp_path):
    """Rows summed by `credit_by` (sample null, group tags set) give the same totals as the
    per-sample rows; without a count column the sample counts are unknown: a dash."""
    grouped = load_artifacts(syn.make_run(tmp_path / "grouped", credit="uncounted")).ledger
    assert grouped[grouped.family == "credit"]["sample"].isna().all()
    raw = syn.credit_samples()
    whole = raw[raw.feature == ""].dropna(subset=["sample"])
    by_source = RD.credit_by_reward_source(grouped)
    for code, label in RD.REWARD_SOURCES.items():
        rows = whole[whole["tag/reward_source"] == code]
        assert by_source.loc[label, "total"] == pytest.approx(rows.value.sum())
        assert by_source["samples"].isna().all()
    by_adv = RD.credit_by_advantage(grouped)
    assert by_adv.loc["advantage > 0", "total"] == pytest.approx(
        whole[whole["tag/advantage"] >= 0].value.sum()
    )
    assert by_adv.loc["advantage < 0", "total"] == pytest.approx(
        whole[whole["tag/advantage"] < 0].value.sum()
    )
    parts = T.credit_parts(grouped)
    momentum = raw[(raw.feature == "") & (raw.part == "momentum")]
    assert len(momentum) and parts["momentum"] == pytest.approx(momentum.value.sum())
    assert RD.credit_features_by_source(grouped).empty  # feature rows carry no tags
    page = write_report(tmp_path / "grouped").read_text()
    assert "Not shown: credit" not in page
    assert "next reward event" in page and '<td class="n">—</td>' in page


def test_circuits_keep_feature_to_action_pairs(run_dir):
    circ = T.circuits(load_artifacts(run_dir).ledger, syn.ACTIONS)
    assert circ.to_actions and len(circ.totals) == len(syn.FEATURES) * len(syn.ACTIONS)
    expected = {k: 3 * v for k, v in syn.circuit_values().items() if v != 99.0}
    up = sorted((v for v in expected.values() if v > 0), reverse=True)[:10]
    down = sorted(v for v in expected.values() if v < 0)[:10]
    assert list(circ.strengthened()) == pytest.approx(up)
    assert list(circ.weakened()) == pytest.approx(down)


def test_missing_artifacts_degrade_to_notes(tmp_path):
    bare = syn.make_run(tmp_path / "bare", artifacts=False)
    page = write_report(bare).read_text()
    # not a demo run (no demo.json): the generic sections, and no note on the demo's artifacts
    for anchor in SECTIONS:
        assert (f'<section id="{anchor}">' in page) == (anchor not in ("probes", "causal"))
    for name in ("ledger.parquet", "validation.parquet", "validation.json"):
        assert f"{name} is not in the run directory" in page
    for name in ("probes.parquet", "demo.json", "causal.json"):
        assert name not in page
    assert "data:image/png" not in page

    no_credit = syn.make_run(tmp_path / "no_credit", credit=False)
    (no_credit / "causal.json").unlink()
    (no_credit / "demo.json").write_text("{not json")
    path = write_report(no_credit, tmp_path / "x" / "mine.html")  # out: an .html path
    assert path == tmp_path / "x" / "mine.html" and not (no_credit / "report.html").exists()
    page = path.read_text()
    assert "Not shown: credit (no tagged per-sample credit rows)" in page
    assert "Not shown: the causal check. causal.json is not in the run directory" in page
    assert "demo.json cannot be read" in page
    assert "no training curve" not in page  # drawn inside the timeline figure, noted below it
    assert "Not shown: the reward curve" in page
    assert (tmp_path / "x" / "figures" / "timeline.png").exists()
    assert not (tmp_path / "x" / "figures" / "credit.png").exists()


def test_not_a_run_is_a_clear_error(tmp_path):
    with pytest.raises(NotARunError, match="manifest.json is missing"):
        write_report(tmp_path)


def test_artifacts_only_need_the_manifest(tmp_path):
    root = syn.make_run(tmp_path / "r", artifacts=False)
    art = load_artifacts(root)
    assert art.ledger is None and art.demo is None
    assert json.loads((root / "manifest.json").read_text()) == art.manifest


def test_probe_scores_without_a_finite_value_are_a_note(tmp_path):
    art = load_artifacts(syn.make_run(tmp_path / "r", artifacts=False))
    art.probes = syn.probes_frame().assign(score=float("nan"))
    _, _, body = S.probes_section(art, S.FigureSink(tmp_path / "figures"))
    assert "Not shown: probe scores (no finite score)" in body
    assert not (tmp_path / "figures").exists()
