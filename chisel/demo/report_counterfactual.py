"""The report section of counterfactual reinforcement: what chisel predicts the agent would be
without a kind of reward, beside what retraining without it measured (benchmarks/counterfactual.py
writes counterfactual.json; the section reads it from the run directory or its parent).

Same contract as `sections`: returns (anchor, title, body markup) or None when there is nothing
to show, never raises on a missing or unreadable file. Figures use matplotlib's `Figure` API.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from chisel.report import html as H
from chisel.report.artifacts import RunArtifacts
from chisel.report.sections import FigureSink, Section

COUNTERFACTUAL_FILE = "counterfactual.json"
ANCHOR, TITLE = "counterfactual", "Counterfactual: the agent without a kind of reward"
PRIMARY = "logprob_greedy"
METRIC_TEXT = {
    "logprob_greedy": "mean log π(final greedy action) on held-out states",
    "logprob_press_button_visible": "log π(press | button visible)",
    "pathway_button_press": "button → press pathway (W_out[press]·d_button)",
}
INTRO = (
    "chisel.counterfactual predicts the parameters without a selection of training samples by "
    "subtracting their parts of every recorded update (their own gradient terms and what their "
    "gradients carried forward through Adam's first moment), with Adam's denominators, the clip "
    "coefficients and the collected data held as recorded: first order. Retraining from the "
    "same seeds with the reward removed is the ground truth; it also sees what the first-order "
    "prediction cannot: after the first update the agent collects different data."
)


def load(art: RunArtifacts) -> tuple[dict[str, Any] | None, str | None]:
    """counterfactual.json from the run directory or its parent, and its path or why it could
    not be read; (None, None) when there is none."""
    for folder in (art.root, art.root.parent):
        path = Path(folder) / COUNTERFACTUAL_FILE
        if path.is_file():
            try:
                return json.loads(path.read_text()), str(path)
            except (OSError, ValueError) as err:
                return None, f"{path} could not be read ({err})"
    return None, None


def _button_sentence(rows: list[dict], button: str) -> str | None:
    found = [r for r in rows if r["button"] == button and r["scenario"] == "button never pays"]
    if not found:
        return None
    row = max(found, key=lambda r: r["step"])  # the end of the run
    p_path, a_path = row["predicted/pathway_button_press"], row["actual/pathway_button_press"]
    p_lp, a_lp = row["predicted/logprob_press_button_visible"], row["actual/logprob_press_button_visible"]
    final = row["final/pathway_button_press"]

    def rel(x: float) -> str:
        return f" ({H.pct(abs(x / final))} of its final value)" if final and math.isfinite(x) else ""

    def weaker(x: float) -> str:
        return f"{H.num(abs(x))} {'weaker' if x < 0 else 'stronger'}{rel(x)}"

    def lower(x: float) -> str:
        return f"{H.num(abs(x))} {'lower' if x < 0 else 'higher'}"

    return (
        f"Without the button rewards ({button} button, {row['step']} updates), chisel predicts "
        f"the button-press pathway would be {weaker(p_path)} and log π(press | button visible) "
        f"{lower(p_lp)}; retraining measured the pathway {weaker(a_path)} and "
        f"log π(press | button visible) {lower(a_lp)}."
    )


def _lds_sentence(summary: dict) -> str | None:
    lds = [r for r in summary.get("lds", []) if r["metric"] == PRIMARY]
    if not lds:
        return None
    end = lds[-1]
    trail = ", ".join(f"{r['step']}: {H.num(r['spearman'], 3)}" for r in lds)
    return (
        f"Over {end['n']} random subsets of 50% of the episodes (the default demo), the Spearman "
        f"correlation between predicted and retrained changes of the {METRIC_TEXT[PRIMARY]} (the "
        f"LDS) is {H.num(end['spearman'], 3)} at the end of the run (by update — {trail}); the "
        f"mean absolute error is {H.num(end['mean_abs_error'], 3)} against a mean |retrained "
        f"change| of {H.num(end['mean_abs_actual'], 3)}."
    )


def scatter(rows: list[dict], metric: str = PRIMARY) -> Figure:
    """Predicted vs retrained change of `metric` over the subsets (final checkpoint)."""
    fig = Figure(figsize=(5.2, 4.6))
    ax = fig.add_subplot()
    for frac in sorted({r["nominal_fraction"] for r in rows}):
        at = [r for r in rows if r["nominal_fraction"] == frac]
        ax.scatter([r[f"actual/{metric}"] for r in at], [r[f"predicted/{metric}"] for r in at],
                   label=f"{frac:.0%} of episodes removed", s=22)
    values = np.array([r[f"{k}/{metric}"] for r in rows for k in ("actual", "predicted")], float)
    values = values[np.isfinite(values)]
    if values.size:
        lo, hi = float(values.min()), float(values.max())
        ax.plot([lo, hi], [lo, hi], color="0.5", lw=0.8, ls="--", label="predicted = retrained")
    ax.set_xlabel(f"retrained Δ {METRIC_TEXT[metric]}", fontsize=8)
    ax.set_ylabel(f"predicted Δ {METRIC_TEXT[metric]}", fontsize=8)
    ax.legend(fontsize=7)
    ax.set_title("counterfactual: predicted vs retrained, over episode subsets", fontsize=9)
    return fig


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    return buf.getvalue()


def _scenario_table(rows: list[dict]) -> str:
    header = ["run", "removed", "updates", "samples removed", *(
        f"{w} Δ {m}" for m in ("logprob_greedy", "logprob_press_button_visible")
        for w in ("predicted", "retrained"))]
    body = [
        [r["button"], r["scenario"], r["step"], H.pct(r["fraction_removed"]),
         *(H.num(r[f"{w}/{m}"]) for m in ("logprob_greedy", "logprob_press_button_visible")
           for w in ("predicted", "actual"))]
        for r in rows
    ]
    return H.table(header, body, numeric=tuple(range(2, 8)))


def counterfactual_section(art: RunArtifacts, figs: FigureSink) -> Section | None:
    """None when no counterfactual.json is found (the section is left out)."""
    data, where = load(art)
    if data is None:
        return None if where is None else (ANCHOR, TITLE, H.missing(f"Not shown: {where}."))
    summary, rows = data.get("summary", {}), data.get("rows", [])
    parts = [H.para(INTRO)]
    for button in ("early", "late"):
        sentence = _button_sentence(rows, button)
        if sentence:
            parts.append(H.para(sentence))
    lds = _lds_sentence(summary)
    if lds:
        parts.append(H.para(lds))
    subsets = [r for r in rows if r.get("kind") == "subset" and r["button"] == "none"]
    if subsets:
        end = max(r["step"] for r in subsets)
        fig = scatter([r for r in subsets if r["step"] == end])
        png = _png(fig)
        path = figs.folder / f"{figs.prefix}counterfactual.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png)
        parts.append(H.img(png, "predicted vs retrained metric change over episode subsets"))
    if summary.get("fractions"):
        parts.append(H.table(
            ["fraction of episodes", "subsets", "Spearman", "mean |error|", "mean |retrained Δ|",
             "cosine(Δθ pred, Δθ retrained)"],
            [[H.pct(f["fraction"]), f["n"], H.num(f.get("spearman"), 3), H.num(f["mean_abs_error"], 3),
              H.num(f["mean_abs_actual"], 3), H.num(f["param_cosine"], 3)]
             for f in summary["fractions"]], numeric=(1, 2, 3, 4, 5)))
    if summary.get("scenarios"):
        parts.append(_scenario_table(summary["scenarios"]))
    parts.append(H.para(f"Source: {where}."))
    return ANCHOR, TITLE, "".join(parts)
