"""The report's "Does the attribution hold?" and coverage sections, credit counts, momentum.

Known answers: the synthetic validation table plants an over-stated and an under-stated feature;
Spearman values are checked against hand-computed ranks; coverage against hand sums of the
synthetic ledger (float64, 1e-12).
"""

from __future__ import annotations

import html
import re

import numpy as np
import pandas as pd
import pytest

from chisel.attribution import ledger as L
from chisel.demo import report_credit as RD
from chisel.report import figures as F
from chisel.report import html as H
from chisel.report import load_artifacts, summarize, write_comparison, write_report
from chisel.report import tables as T
from chisel.report import validation as V
from chisel.report.coverage import DICTIONARY, FEATURES, UNSPLIT, coverage
from tests.report import synthetic as syn


def _section(page: str, anchor: str) -> str:
    match = re.search(rf'<section id="{anchor}">(.*?)</section>', page, re.S)
    assert match, anchor
    return match.group(1)


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    root = syn.make_run(tmp_path_factory.mktemp("full") / "run", credit="grouped")
    return root, write_report(root).read_text()


@pytest.fixture(scope="module")
def partial(tmp_path_factory):
    root = syn.make_run(tmp_path_factory.mktemp("partial") / "run", validation="partial")
    return root, write_report(root).read_text()


# -- Spearman ------------------------------------------------------------------------------------
def test_spearman_known_answers():
    assert V.spearman([1, 2, 3, 4], [1, 3, 2, 4]) == (pytest.approx(0.8, abs=1e-15), 4)
    # ties share their average rank: ranks x = [1.5, 1.5, 3, 4]; ρ = 4.5 / sqrt(4.5 · 5)
    rho, n = V.spearman([1, 1, 2, 3], [1, 2, 3, 4])
    assert n == 4 and rho == pytest.approx(4.5 / np.sqrt(22.5), abs=1e-15)
    # non-finite pairs are left out and counted out of n
    assert V.spearman([1, np.nan, 2, 3, np.inf], [3, 1, 2, 1, 0]) == (pytest.approx(-1.0), 3)
    assert np.isnan(V.spearman([1, 2], [2, 1])[0])
    assert np.isnan(V.spearman([1, 1, 1], [1, 2, 3])[0])


def test_agreements_computed_when_validation_json_lacks_them():
    table = V.normalize(syn.validation_frame())
    features = table[table.kind == "feature"]
    got = {(a.predictor, a.effect): a for a in V.agreements(table, {}, "validation.parquet")}
    assert len(got) == 7 and ("attribution", "shapley") in got
    expected = syn.validation_summary()["spearman"]  # |x| against ablation effects
    for (x, y), a in got.items():
        assert a.source == "validation.parquet" and a.n == len(syn.INTERVENTIONS)
        xs = features[x].abs() if y.startswith("ablation") else features[x]
        rho = syn.spearman_no_ties(list(xs), list(features[y]))
        assert a.rho == pytest.approx(rho, abs=1e-12)
        assert a.rho == pytest.approx(expected[f"{x}_vs_{y}"]["rho"], abs=1e-12)
        assert a.transform == expected[f"{x}_vs_{y}"]["transform"]
    # validation.json wins where it has the pair
    given = {"spearman": {"attribution_vs_removal": {"rho": 0.123, "n": 18}}}
    a = next(a for a in V.agreements(table, given, "validation.parquet") if a.effect == "removal")
    assert (a.rho, a.n, a.source) == (0.123, 18, "validation.json")


# -- over- and under-stated ----------------------------------------------------------------------
def test_planted_over_and_under_stated_features():
    table = V.normalize(syn.validation_frame())
    for effect in V.EFFECTS:
        over, under, n = V.misranked(table, effect)
        assert n == len(syn.INTERVENTIONS)
        assert [g.label for g in over] == [syn.OVER], effect
        assert [g.label for g in under] == [syn.UNDER], effect
    assert over[0].rank_predictor == 1 and under[0].rank_effect <= 3


def test_over_and_under_stated_come_from_ranks_not_names():
    """A table of 9 features where A has the largest |attribution| and ~0 removal, B the
    reverse, the rest agreeing: A over-stated, B under-stated; swapping the columns swaps them."""
    names = [f"f{i}" for i in range(7)]
    attribution = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]
    rows = pd.DataFrame(
        {
            "feature": ["A", "B", *names],
            "attribution": [2.0, 0.01, *attribution],
            "removal": [0.001, -3.0, *attribution],
        }
    )
    table = V.normalize(rows)
    assert set(table.kind) == {"feature"}
    over, under, n = V.misranked(table, "removal")
    assert n == 9 and [g.label for g in over] == ["A"] and [g.label for g in under] == ["B"]
    swapped = V.normalize(rows.rename(columns={"attribution": "removal", "removal": "attribution"}))
    over, under, _ = V.misranked(swapped, "removal")
    assert [g.label for g in over] == ["B"] and [g.label for g in under] == ["A"]
    agree = V.normalize(rows.assign(removal=rows.attribution))
    assert V.misranked(agree, "removal")[:2] == ([], [])


def test_over_and_under_stated_sentences_in_the_page(full):
    _, page = full
    body = html.unescape(_section(page, "validation"))
    for effect, short in V.SHORT.items():
        head = f"Against {V.EFFECTS[effect]} (ranks of {len(syn.INTERVENTIONS)} feature pathways"
        sentence = next(line for line in body.split("<p") if head in line)
        over, under = sentence.split("under-states")
        assert f"over-states {syn.OVER} (|attribution| rank 1, {short} rank" in over
        assert f"{syn.UNDER} (|attribution| rank 6, {short} rank" in under


# -- the section ---------------------------------------------------------------------------------
def test_full_validation_section(full):
    root, page = full
    body = _section(page, "validation")
    png = (root / "figures" / "validation.png").read_bytes()
    assert png.startswith(b"\x89PNG") and H.img(png, "x").split("src=")[1] in body
    summary = syn.validation_summary()
    assert len(summary["spearman"]) == 7
    for key, entry in summary["spearman"].items():
        x, y = key.split("_vs_")
        xname = V.PREDICTORS[x] if entry["transform"] == "signed" else f"|{V.PREDICTORS[x]}|"
        yname = V.EFFECTS.get(y) or V.PREDICTORS[y]
        row = (
            f"<td>{html.escape(xname)}</td><td>{html.escape(yname)}</td>"
            f'<td class="n">{H.num(entry["rho"], 3)}</td><td class="n">{entry["n"]}</td>'
            "<td>validation.json</td>"
        )
        assert row in body, key
    # the pathway table is ranked by |Shapley|, groups apart, Shapley printed with its se
    frame = syn.validation_frame()
    pathways = frame[frame.kind != "group"]
    expected = list(pathways.loc[pathways.shapley.abs().sort_values(ascending=False).index].feature)
    table = body.split("Pathways ranked by |Shapley| (in validation.parquet):")[1]
    table = table.split("</table>")[0]
    cells = re.findall(r"<tr><td class=\"n\">\d+</td><td>(.*?)</td>", table)
    assert [html.unescape(c) for c in cells] == expected
    assert "0.7 ± 0.01" in table and "ablation: return" in table
    assert "Groups of pathways" in body and "<td>task</td>" in body
    numbers = html.unescape(body)
    assert f"Σ Shapley {H.num(summary['shapley_total'])}" in numbers
    assert f"named pathways' share of the whole learned change (Shapley) {H.pct(summary['coverage_shapley'])}" in numbers
    assert "Not shown" not in body


def test_summary_headline_uses_the_shapley_ranking(full):
    root, page = full
    s = summarize(load_artifacts(root))
    assert s.headline_by == "Shapley importance"
    frame = syn.validation_frame()
    features = frame[frame.kind == "feature"]
    order = features.loc[features.shapley.abs().sort_values(ascending=False).index]
    assert s.relied_on == list(zip(order.feature, order.shapley))
    body = html.unescape(_section(page, "summary"))
    total = syn.validation_summary()["shapley_total"]
    assert "What the agent now relies on (headline ranking: Shapley importance" in body
    assert f"sum exactly to m(final) − m(all players reverted) = {H.num(total)}" in body
    assert f"): {syn.UNDER} (0.7); " in body  # the Shapley headline
    kinds = frame[frame.kind != "group"].groupby("kind").shapley.sum()
    assert (
        f"By kind: feature pathways {H.num(kinds['feature'])} "
        f"({H.pct(kinds['feature'] / total)}), <bias> {H.num(kinds['<bias>'])}" in body
    )
    assert "When and from which experience (training-path attribution" in body
    assert f"attribution|): {syn.OVER} (1.25); " in body
    assert "by training-path attribution; best rank 1 of 7 pathways by Shapley importance" in body
    rho = syn.validation_summary()["spearman"]["attribution_vs_removal"]["rho"]
    assert f"training-path attribution ρ = {H.num(rho, 2)} (n = 7)" in body


def test_partial_validation(partial):
    root, page = partial
    body = _section(page, "validation")
    assert (root / "figures" / "validation.png").exists()
    assert "Shapley" not in body.split("Pathways ranked by")[1]  # no Shapley column
    assert "Pathways ranked by |removal|" in body
    assert "ablation: return" not in body and "ablation: metric" in body
    assert body.count("<td>validation.json</td>") == 2
    assert "Against pathway removal (metric)" in body
    assert "Against feature ablation (return)" not in body
    s = summarize(load_artifacts(root))
    assert s.headline_by == "training-path attribution" and s.relied_on == []
    summary = html.unescape(_section(page, "summary"))
    assert "headline ranking: training-path attribution" in summary
    assert "validation.parquet has no Shapley values" in summary
    assert "Not shown" not in page


def test_absent_validation_is_a_note(tmp_path):
    root = syn.make_run(tmp_path / "run", validation=False)
    page = write_report(root).read_text()
    body = _section(page, "validation")
    assert (
        "Not shown: the validation by intervention. validation.parquet is not in the run "
        "directory; validation.json is not in the run directory." in body
    )
    assert "no validation by intervention: validation.parquet is not in the run directory" in page
    assert not (root / "figures" / "validation.png").exists()
    # an unreadable table with a readable summary: the summary's numbers still show
    syn.make_run(root, validation=True)
    (root / "validation.parquet").write_bytes(b"not parquet")
    page = write_report(root).read_text()
    body = _section(page, "validation")
    assert "<td>validation.json</td>" in body and "validation.parquet cannot be read" in body


def test_new_sections_escape_user_strings(full):
    _, page = full
    assert "<script" not in page.lower()
    for anchor in ("validation", "summary"):
        body = _section(page, anchor)
        assert html.escape(f"{syn.EVIL}@{syn.SITE}") in body
        assert syn.EVIL not in body


def test_long_names_are_cut_in_the_middle(tmp_path):
    long = "a_very_long_concept_name_" * 8 + "@hook_pi_hidden1"
    label = F._short(long)
    assert len(label) <= 28 and label.endswith("hidden1") and "…" in label
    rows = V.normalize(pd.DataFrame({"feature": [long, "b", "c"], "attribution": [1.0, 2, 3]}))
    rows["removal"] = [3.0, 1, 2]
    fig = F.validation_figure(rows, [("attribution", "removal", "ρ", True)], {})
    assert F.to_png(fig).startswith(b"\x89PNG")


# -- coverage ------------------------------------------------------------------------------------
def test_coverage_equals_hand_sums():
    cov = coverage(syn.ledger())
    table = cov.per_step
    assert list(table.index) == syn.STEPS
    for i, t in enumerate(syn.STEPS):
        features = sum(values[i] for _, values in syn.FEATURES.values())
        delta = features + syn.MEAN[i] + syn.RESIDUAL[i] + syn.BIAS[i] + syn.CRITIC[i]
        row = table.loc[t]
        assert row[FEATURES] == pytest.approx(features, abs=1e-12)
        assert row[L.MEAN] == pytest.approx(syn.MEAN[i], abs=1e-12)
        assert row[L.RESIDUAL] == pytest.approx(syn.RESIDUAL[i], abs=1e-12)
        assert row[L.BIAS] == pytest.approx(syn.BIAS[i], abs=1e-12)
        assert row[UNSPLIT] == pytest.approx(syn.CRITIC[i], abs=1e-12)
        assert row[L.DELTA_METRIC] == pytest.approx(delta, abs=1e-12)
        assert cov.step_shares().loc[t, FEATURES] == pytest.approx(features / delta, abs=1e-12)
    feature_sum = sum(sum(v) for _, v in syn.FEATURES.values())
    assert cov.share() == pytest.approx(feature_sum / syn.delta_metric(), abs=1e-12)
    assert cov.share(UNSPLIT) == pytest.approx(sum(syn.CRITIC) / syn.delta_metric(), abs=1e-12)
    assert sum(cov.share(p) for p in cov.parts) == pytest.approx(1.0, abs=1e-12)
    first_two = sum(v[0] + v[1] for _, v in syn.FEATURES.values())
    delta_two = table[L.DELTA_METRIC].iloc[:2].sum()
    assert cov.cumulative_shares()[FEATURES].iloc[1] == pytest.approx(first_two / delta_two)


def test_coverage_in_the_page(full):
    root, page = full
    body = _section(page, "coverage")
    assert (root / "figures" / "coverage.png").exists()
    cov = coverage(syn.ledger())
    for part in cov.parts:
        assert f'<td class="n">{H.pct(cov.share(part))}</td>' in body, part
    assert H.pct(syn.validation_summary()["coverage_shapley"]) in body
    summary = html.unescape(_section(page, "summary"))
    assert f"the 7 features carry {H.num(cov.totals[FEATURES])} ({H.pct(cov.share())})" in summary


def test_a_new_not_feature_label_keeps_its_own_part(monkeypatch):
    """A label added to L.NOT_FEATURES later is not a feature and not dropped: its own part."""
    monkeypatch.setattr(L, "NOT_FEATURES", (*L.NOT_FEATURES, "<new label>"))
    led = syn.ledger()
    extra = L.row(8, L.INTEGRATED, "pi.W2", syn.SITE, "<new label>", L.ATTRIBUTION, -0.05)
    led = L.to_frame(pd.concat([led, pd.DataFrame([extra])], ignore_index=True), [])
    led.loc[(led.step == 8) & (led.param == "pi.W2") & (led.feature == ""), "value"] -= 0.05
    led.loc[(led.step == 8) & (led.quantity == L.DELTA_METRIC), "value"] -= 0.05
    cov = coverage(led)
    assert cov.per_step.loc[8, "<new label>"] == pytest.approx(-0.05)
    assert cov.share() == pytest.approx(
        coverage(syn.ledger()).share() * syn.delta_metric() / (syn.delta_metric() - 0.05)
    )
    parts = cov.per_step[cov.parts].sum(axis=1)
    assert list(parts) == pytest.approx(list(cov.per_step[L.DELTA_METRIC]), abs=1e-12)


def test_dictionary_latents_and_mean_rows(tmp_path):
    """ "sae<i>@site" latents are features counted apart; "<mean>" is never ranked as one."""
    led = syn.ledger()
    extra = [
        L.row(8, L.INTEGRATED, "pi.W2", syn.SITE, "sae3@hook_pi_hidden2", L.ATTRIBUTION, 0.25),
        L.row(8, L.INTEGRATED, "pi.W2", syn.SITE, "<new label>", L.ATTRIBUTION, -0.05),
    ]
    led = L.to_frame(pd.concat([led, pd.DataFrame(extra)], ignore_index=True), [])
    led.loc[(led.step == 8) & (led.param == "pi.W2") & (led.feature == ""), "value"] += 0.2
    led.loc[(led.step == 8) & (led.quantity == L.DELTA_METRIC), "value"] += 0.2
    cov = coverage(led)
    assert cov.per_step.loc[8, DICTIONARY] == pytest.approx(0.25)
    assert cov.per_step.loc[0, DICTIONARY] == 0.0
    assert cov.features == [FEATURES, DICTIONARY]
    parts = cov.per_step[cov.parts].sum(axis=1)
    assert list(parts) == pytest.approx(list(cov.per_step[L.DELTA_METRIC]), abs=1e-12)
    art = load_artifacts(syn.make_run(tmp_path / "run", artifacts=False))
    art.ledger = led
    s = summarize(art)
    assert L.MEAN not in [f.name for f in s.features]
    assert len(s.features) == len(syn.FEATURES) + 2
    assert s.mean == pytest.approx(sum(syn.MEAN))


# -- credit counts and momentum ------------------------------------------------------------------
def test_credit_by_groups_read_their_count(full):
    root, page = full
    led = load_artifacts(root).ledger
    by_source = RD.credit_by_reward_source(led)
    assert list(by_source["samples"]) == [2 * len(syn.STEPS)] * 3  # 2 samples a step each
    by_adv = RD.credit_by_advantage(led)
    raw = syn.credit_samples()
    whole = raw[(raw.feature == "") & raw["sample"].notna() & (raw.param == "pi.W2")]
    whole = whole.drop_duplicates(["origin_step", "sample"])  # a sample counts once, not per part
    assert by_adv.loc["advantage > 0", "samples"] == (whole["tag/advantage"] >= 0).sum()
    assert by_adv.loc["advantage < 0", "samples"] == (whole["tag/advantage"] < 0).sum()
    # momentum rows of the same samples at a later step do not count them again
    echo = led[(led.family == "credit") & led["count"].notna()].assign(step=lambda f: f.step + 1)
    again = RD.credit_by_reward_source(pd.concat([led, echo], ignore_index=True))
    assert list(again["samples"]) == list(by_source["samples"])
    assert list(again["total"]) == pytest.approx(list(2 * by_source["total"]))
    credit = _section(page, "credit")
    assert f'<td class="n">{2 * len(syn.STEPS)}</td>' in credit
    assert '<td class="n">—</td>' not in credit


def test_momentum_unresolved_share(full, tmp_path):
    _, page = full
    credit = html.unescape(_section(page, "credit"))
    shares = syn.MOMENTUM_UNRESOLVED
    assert (
        f"on average {H.pct(float(np.mean(shares)))} of an update's momentum part is left "
        f"unresolved (max {H.pct(max(shares))} at step {syn.STEPS[1]}, over 3 credit steps)"
    ) in credit
    led = syn.ledger(credit=True)
    assert list(T.momentum_unresolved(led)) == pytest.approx(shares)
    without = led[led.quantity != L.MOMENTUM_UNRESOLVED_SHARE]
    assert T.momentum_unresolved(without).empty
    root = syn.make_run(tmp_path / "run")
    led = load_artifacts(root).ledger
    led[led.quantity != L.MOMENTUM_UNRESOLVED_SHARE].to_parquet(root / "ledger.parquet")
    assert "Momentum horizon" not in write_report(root).read_text()


def test_comparison_shows_coverage_and_agreement(tmp_path):
    a = syn.make_run(tmp_path / "a")
    b = syn.make_run(tmp_path / "b", validation="partial")
    page = html.unescape(write_comparison(a, b, tmp_path / "cmp").read_text())
    rho = syn.validation_summary()["spearman"]
    both = H.num(rho["attribution_vs_removal"]["rho"], 3) + " (n = 7)"
    assert (
        f"<td>Spearman: training-path attribution vs pathway removal (metric)</td><td>{both}</td><td>{both}</td>"
        in page
    )
    shapley = H.num(rho["shapley_vs_removal"]["rho"], 3) + " (n = 7)"
    assert f"vs pathway removal (metric)</td><td>{shapley}</td><td>n/a</td>" in page
    assert (
        "<td>headline ranking</td><td>Shapley importance</td><td>training-path attribution</td>"
        in page
    )
    share = H.pct(coverage(syn.ledger()).share())
    assert f"<td>features' share of Δm</td><td>{share}</td><td>{share}</td>" in page


def test_many_pathways_are_capped(tmp_path):
    """60 feature pathways, the attribution ranking reversed against removal: the sentence names
    the 5 largest rank gaps "and N more", the table shows the first 40 by |Shapley|."""
    n = 60
    frame = pd.DataFrame(
        {
            "feature": [f"f{i:02d}@site" for i in range(n)],
            "attribution": np.arange(n, 0, -1, dtype=float),
            "removal": np.arange(1, n + 1, dtype=float),
            "shapley": np.arange(1, n + 1, dtype=float),
        }
    )
    root = syn.make_run(tmp_path / "run", validation=False)
    frame.to_parquet(root / "validation.parquet")
    body = html.unescape(_section(write_report(root).read_text(), "validation"))
    over, under, _ = V.misranked(V.normalize(frame), "removal")
    assert len(over) == len(under) == 20  # top third by one, bottom half by the other
    assert "f00@site (|attribution| rank 1, removal rank 60)" in body and "and 15 more" in body
    assert "Pathways ranked by |Shapley| (the first 40 of 60 in validation.parquet):" in body
    assert "<td>f59@site</td>" in body and "<td>f19@site</td>" not in body
    assert "<td>validation.parquet</td>" in body
