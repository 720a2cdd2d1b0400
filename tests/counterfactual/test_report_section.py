"""The report's counterfactual section: the headline sentence carries the json's numbers, the
scatter is drawn, and a run without counterfactual.json gets no section."""

from __future__ import annotations

import json

from chisel.demo.report_counterfactual import COUNTERFACTUAL_FILE, counterfactual_section
from chisel.report.artifacts import RunArtifacts
from chisel.report.sections import FigureSink


def _row(button, scenario, kind, pred, actual, frac=None):
    return {
        "button": button, "scenario": scenario, "kind": kind, "step": 64, "rollout": 4,
        "fraction_removed": 0.5 if frac else 0.02, "nominal_fraction": frac,
        "final/pathway_button_press": 2.0,
        "predicted/pathway_button_press": -0.5, "actual/pathway_button_press": -0.25,
        "predicted/logprob_press_button_visible": -1.5, "actual/logprob_press_button_visible": -0.75,
        "predicted/logprob_greedy": pred, "actual/logprob_greedy": actual,
    }


def test_section_reads_the_json(tmp_path):
    rows = [_row("none", f"50% of episodes dropped (seed {k})", "subset", -0.1 * k, -0.05 * k, 0.5) for k in range(5)]
    rows.append(_row("early", "button never pays", "scenario", -0.3, -0.2))
    summary = {"lds": [{"step": 64, "metric": "logprob_greedy", "spearman": 1.0, "n": 5,
                        "mean_abs_error": 0.1, "mean_abs_actual": 0.1}],
               "fractions": [], "scenarios": [rows[-1]]}
    (tmp_path / COUNTERFACTUAL_FILE).write_text(json.dumps({"summary": summary, "rows": rows}))
    run = tmp_path / "base-early"
    run.mkdir()
    anchor, _title, body = counterfactual_section(RunArtifacts(run, {}), FigureSink(tmp_path / "figures"))
    assert anchor == "counterfactual"
    assert ("Without the button rewards (early button, 64 updates), chisel predicts the button-press "
            "pathway would be 0.5 weaker (25.0% of its final value) and log π(press | button visible) "
            "1.5 lower; retraining measured the pathway 0.25 weaker") in body
    assert "Over 5 random subsets" in body and "data:image/png;base64," in body
    assert (tmp_path / "figures" / "counterfactual.png").stat().st_size > 1000


def test_no_json_no_section(tmp_path):
    assert counterfactual_section(RunArtifacts(tmp_path, {}), FigureSink(tmp_path / "f")) is None
    (tmp_path / COUNTERFACTUAL_FILE).write_text("{not json")
    _, _, body = counterfactual_section(RunArtifacts(tmp_path, {}), FigureSink(tmp_path / "f"))
    assert "could not be read" in body
