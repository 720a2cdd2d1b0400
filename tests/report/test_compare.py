"""`--compare`: two runs side by side; and the report of a real recorded and attributed run."""

from __future__ import annotations

import base64
import html
import json

import pandas as pd
import pytest
import torch

import chisel
import probes
from chisel.demo.report_numbers import demo_numbers
from chisel.errors import NotARunError
from chisel.report import html as H
from chisel.report import load_artifacts, summarize, write_comparison, write_report
from tests.attribute.helpers import policy, record_policy_gradient
from tests.report import synthetic as syn


def _late_button_run(root):
    """The synthetic run with the button feature made the largest pathway."""
    run = syn.make_run(root, button="late")
    led = pd.read_parquet(run / "ledger.parquet")
    hit = (led.family == "integrated") & (led.feature == f"button_visible@{syn.SITE}")
    led.loc[hit, "value"] = 2.0
    led.to_parquet(run / "ledger.parquet")
    return run


def test_comparison_side_by_side(tmp_path):
    a = syn.make_run(tmp_path / "early", button="early")
    b = _late_button_run(tmp_path / "late")
    path = write_comparison(a, b, tmp_path / "cmp")
    assert path == tmp_path / "cmp" / "compare.html"
    page = path.read_text()
    assert "A: early, button early" in page and "B: late, button late" in page
    for name in ("timelines", "groups"):
        png = (tmp_path / "cmp" / "figures" / f"compare-{name}.png").read_bytes()
        assert base64.b64encode(png).decode() in page
    (aa, sa), (ab, sb) = ((x, summarize(x)) for x in (load_artifacts(a), load_artifacts(b)))
    button_a = next(g for g in demo_numbers(aa, sa).groups if g.group == "button")
    button_b = next(g for g in demo_numbers(ab, sb).groups if g.group == "button")
    assert button_b.abs_share > button_a.abs_share
    row = f"<td>share of Σ|attribution|: button</td><td>{H.pct(button_a.abs_share)}</td><td>{H.pct(button_b.abs_share)}</td>"
    assert row in page
    assert sb.features[0].name == f"button_visible@{syn.SITE}"
    assert "http://" not in page and "https://" not in page and "<script" not in page.lower()
    assert html.escape(syn.EVIL) in page and syn.EVIL not in page


def test_write_report_with_compare_and_missing_artifacts(tmp_path):
    """`write_report(compare=)` is deprecated: it warns and writes the comparison."""
    a = syn.make_run(tmp_path / "a")
    bare = syn.make_run(tmp_path / "b", artifacts=False)
    with pytest.warns(DeprecationWarning, match="write_comparison"):
        path = write_report(a, compare=bare)
    assert path == a / "compare.html"
    page = path.read_text()
    assert "B: b: ledger.parquet is not in the run directory" in page
    with pytest.raises(NotARunError):
        write_comparison(a, tmp_path / "nothing", tmp_path / "out")


def test_report_of_a_recorded_and_attributed_run(tmp_path):
    """A real ledger (chisel.record + chisel.attribute) goes through the report unchanged."""
    model = policy()
    run = record_policy_gradient(
        tmp_path / "run", model, torch.optim.Adam(model.parameters(), lr=1e-2), steps=2
    )
    gen = torch.Generator().manual_seed(3)
    actions = ["left", "right", "stay"]
    features = probes.FeatureSet(
        [
            probes.custom(f"h{i}", "3:out", torch.randn(16, generator=gen, dtype=torch.float64))
            for i in range(3)
        ]
        + [
            probes.custom(a, "4:out", torch.eye(3, dtype=torch.float64)[j])
            for j, a in enumerate(actions)
        ]
    )
    obs = torch.randn(20, 6, generator=gen, dtype=torch.float64)
    metric = chisel.metrics.logprob(obs, torch.randint(0, 3, (20,), generator=gen))
    chisel.attribute(
        run,
        model,
        features,
        metric,
        families=("geometry", "integrated"),
        out=tmp_path / "run" / "ledger.parquet",
        points=4,
    )
    demo = {"action_names": actions, "concepts": {"task": ["h0", "h1"], "spurious": ["h2"]}}
    (tmp_path / "run" / "demo.json").write_text(json.dumps(demo))
    page = write_report(tmp_path / "run").read_text()
    for name in ("timeline", "circuits", "completeness"):
        assert (tmp_path / "run" / "figures" / f"{name}.png").exists()
    s = summarize(load_artifacts(tmp_path / "run"))
    assert {f.name for f in s.features} == {"h0", "h1", "h2"}
    assert s.completeness_max < 1e-6
    assert demo_numbers(load_artifacts(tmp_path / "run"), s).correlate.features == ["h2"]
    assert "features → actions" not in page  # the figure title is inside the PNG
    assert "Not shown: credit" in page and "Not shown: probe scores" in page


def test_cli_compare_and_report_compare_write_the_same_page(tmp_path, capsys):
    from chisel.cli import main

    a = syn.make_run(tmp_path / "early", button="early")
    b = _late_button_run(tmp_path / "late")
    assert main(["compare", str(a), str(b), "--out", str(tmp_path / "one")]) == 0
    assert main(["report", str(a), "--compare", str(b), "--out", str(tmp_path / "two")]) == 0
    assert main(["compare", str(a), str(b)]) == 0  # default: into the first run
    out = capsys.readouterr().out
    pages = [p / "compare.html" for p in (tmp_path / "one", tmp_path / "two", a)]
    assert all(f"wrote {p}" in out for p in pages)
    texts = {p.read_text() for p in pages}
    assert len(texts) == 1 and "A: early, button early" in texts.pop()
