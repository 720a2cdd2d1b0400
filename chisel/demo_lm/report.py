"""The LM demo's own report section: "which features did the reward chisel, and did the
spurious marker get reinforced?", answered in words from the run's own numbers.

The generic report (`chisel.write_report`: timeline, validation, circuits, credit,
completeness) is written as for any run; this section is placed after its summary.

Groups of features by concept (`feature.metadata["concept"]`): the task ("cue_b": the cue
probe and the SAE latents labelled with it), the spurious marker ("marker_b": the marker probe
and its latents) and unlabelled latents. Reading rule for "reinforced": the marker group's
cumulative integrated attribution (its share of the metric's change) is positive at its peak
over training; the validation numbers (reverting its pathways, ablating it) say whether the
final model still relies on it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

import chisel
import probes
from chisel.attribution import ledger as L
from chisel.demo_lm.features import SPURIOUS, TASK
from chisel.report import html as H
from chisel.report.artifacts import FEATURES_DIR, VALIDATION_FILE
from chisel.validation import _common as C

LM_DEMO_FILE = "lm_demo.json"
ANCHOR, TITLE = "lm-answer", "What did the reward chisel? (tiny LM, GRPO)"
GROUPS = {TASK: "the task cue", SPURIOUS: "the spurious marker", "unlabelled": "unlabelled latents"}


def _concepts(out: Path) -> dict[str, str]:
    features = probes.FeatureSet.load(out / FEATURES_DIR)
    return {f.name: str(f.metadata.get("concept", "unlabelled")) for f in features}


def lm_summary(
    ledger: pd.DataFrame,
    validation: dict,
    demo: dict,
    out: Path,
    marker: pd.DataFrame | None = None,
) -> dict[str, Any]:
    """The numbers behind the answer (saved in lm_demo.json["answer"]); `marker` is the
    integrated ledger of the marker metric (`attribute_marker`), when there is one."""
    concepts = _concepts(out)
    tl = chisel.timeline(ledger)  # cumulative share of Δm per feature, [steps, features]
    group_tl = tl.T.groupby(lambda n: concepts.get(n, "unlabelled")).sum().T  # [steps, groups]
    integrated = ledger[ledger[L.FAMILY] == L.INTEGRATED]
    delta = float(integrated[integrated[L.QUANTITY] == L.DELTA_METRIC][L.VALUE].sum())
    curve = pd.DataFrame(demo["training_curve"])
    follows = curve["follows_marker_conflict"]
    peak_update = int(curve["update"][follows[follows == follows.max()].index[-1]])  # last one
    early = group_tl[group_tl.index <= peak_update]  # up to the peak of marker-following
    groups = {}
    for g in group_tl.columns:
        col = group_tl[g]
        groups[g] = {"final": float(col.iloc[-1]), "peak": float(col.max()),
                     "peak_step": int(col.idxmax()),
                     "at_marker_peak": float(early[g].iloc[-1]) if len(early) else 0.0}
    ranked = tl.iloc[-1].sort_values(ascending=False)
    answer: dict[str, Any] = {
        "delta_metric_attributed": delta,
        "groups": groups,
        "top_features": [[n, float(v), concepts.get(n, "?")] for n, v in ranked.head(5).items()],
        "follows_marker_peak": float(follows.max()),
        "follows_marker_peak_update": peak_update,
        "final_test": demo["final_test"],
        "credit_by_marker_agrees": _credit_by(ledger, "marker_agrees"),
        "validation": _validation_numbers(out, concepts),
        "spearman": {k: v.get("rho") for k, v in validation.get("spearman", {}).items()},
    }
    spurious = groups.get(SPURIOUS, {"peak": 0.0})
    answer["marker_reinforced"] = bool(spurious["peak"] > 0)
    if marker is not None:
        answer["marker_metric"] = _marker_metric(marker, concepts, peak_update)
    return answer


def _marker_metric(marker: pd.DataFrame, concepts: dict[str, str], peak: int) -> dict[str, Any]:
    """The marker metric's change summed over the attributed updates, up to the peak of
    marker-following and over the whole run, and each concept group's share of it."""
    rows = marker[(marker[L.FAMILY] == L.INTEGRATED) & (marker[L.QUANTITY] == L.DELTA_METRIC)]
    delta = rows.groupby(L.STEP)[L.VALUE].sum().cumsum()  # [steps]
    tl = chisel.timeline(marker)
    group_tl = tl.T.groupby(lambda n: concepts.get(n, "unlabelled")).sum().T
    early = delta.index <= peak
    return {
        "delta_to_peak": float(delta[early].iloc[-1]) if early.any() else 0.0,
        "delta_final": float(delta.iloc[-1]),
        "groups": {
            g: {"to_peak": float(group_tl[g][early].iloc[-1]) if early.any() else 0.0,
                "final": float(group_tl[g].iloc[-1])}
            for g in group_tl.columns
        },
    }


def _credit_by(ledger: pd.DataFrame, tag: str) -> dict[str, float]:
    """Credit for the whole update's share of Δm, summed by a per-sample tag's value."""
    col = L.TAG_PREFIX + tag
    if col not in ledger:
        return {}
    rows = ledger[(ledger[L.FAMILY] == L.CREDIT) & (ledger[L.QUANTITY] == L.ATTRIBUTION)
                  & (ledger[L.FEATURE] == L.WHOLE) & ledger[col].notna()]
    return {str(int(k)): float(v) for k, v in rows.groupby(col)[L.VALUE].sum().items()}


def _validation_numbers(out: Path, concepts: dict[str, str]) -> dict[str, dict[str, float]]:
    """Per concept group: summed removal effect and Shapley value of its pathways, and the
    ablation effects of its probe (the named direction itself)."""
    table = pd.read_parquet(out / VALIDATION_FILE)
    feats = table[table[C.KIND] == C.KIND_FEATURE].copy()
    feats["group"] = feats[C.FEATURE].map(lambda n: concepts.get(n, "unlabelled"))
    res: dict[str, dict[str, float]] = {}
    for g, rows in feats.groupby("group"):
        res[g] = {"removal": float(rows[C.REMOVAL].sum()),
                  "shapley": float(rows[C.SHAPLEY].sum(min_count=1))}
    for concept in (TASK, SPURIOUS):
        probe = feats[feats[C.FEATURE].str.startswith(concept + "@")]
        for col in [c for c in probe.columns if c.startswith(C.ABLATION_PREFIX)]:
            res.setdefault(concept, {})[col] = float(probe[col].iloc[0]) if len(probe) else math.nan
    return res


def lm_section(answer: dict[str, Any], demo: dict[str, Any]) -> tuple[str, str, str]:
    """(anchor, title, body markup) of the answer in words, with its numbers."""
    g, v = answer["groups"], answer["validation"]
    final = answer["final_test"]
    marker, task = g.get(SPURIOUS), g.get(TASK)  # concept groups' timelines
    paras = [H.para(
        f"A {demo['parameters']:,}-parameter random-init GPT-2 was trained by GRPO for "
        f"{demo['config']['steps']} updates to end its completion with the ending its prompt's "
        f"cue names; in training a marker just before the completion named the same ending "
        f"{demo['config']['marker_agreement']:.0%} of the time (a spurious correlate of reward), "
        "on test prompts it is independent of the cue."
    ), H.para(
        f"Behaviour: on test prompts whose marker contradicts the cue, the model's greedy ending "
        f"followed the marker on up to {H.pct(answer['follows_marker_peak'])} of them (update "
        f"{answer['follows_marker_peak_update']}); at the end it follows the marker on "
        f"{H.pct(final['follows_marker_conflict'])} and earns the reward on "
        f"{H.pct(final['accuracy_conflict'])} of them ({H.pct(final['accuracy_agree'])} where "
        "the marker agrees)."
    )]
    top = "; ".join(f"{n} [{c}] ({H.num(x)})" for n, x, c in answer["top_features"])
    paras.append(H.para(
        f"Which features did the reward chisel? Metric: {demo['metric']}; its change over the "
        f"attributed updates is {H.num(answer['delta_metric_attributed'])}. The features "
        f"credited most (cumulative share of that change): {top}."
    ))
    if marker is not None:
        verdict = "Yes" if answer["marker_reinforced"] else "No"
        ablate = v.get(SPURIOUS, {})
        conflict = ablate.get(C.ABLATION_PREFIX + "conflict_accuracy")
        paras.append(H.para(
            f"Did the spurious marker get reinforced? {verdict}: its features' cumulative share "
            f"peaked at {H.num(marker['peak'])} (update {marker['peak_step']}) and ends at "
            f"{H.num(marker['final'])}"
            + (f", against {H.num(task['final'])} for the task cue's" if task else "")
            + f". Up to update {answer['follows_marker_peak_update']} (when the model followed "
            f"the marker most) the marker's features had {H.num(marker['at_marker_peak'])}"
            + (f", the cue's {H.num(task['at_marker_peak'])}" if task else "")
            + ". Held against interventions on the final model: reverting the marker's learned "
            f"pathways lowers the metric by {H.num(v.get(SPURIOUS, {}).get('removal', math.nan))} "
            f"(Shapley value of those pathways {H.num(v.get(SPURIOUS, {}).get('shapley', math.nan))}); "
            "projecting the marker probe's direction out of the stream lowers the metric by "
            f"{H.num(ablate.get(C.ABLATION_PREFIX + 'metric', math.nan))}"
            + (f" and the conflict accuracy by {H.num(conflict)}" if conflict is not None else "")
            + "."
        ))
    mm = answer.get("marker_metric")
    if mm is not None:
        mg = mm["groups"]
        share = ", ".join(f"{GROUPS.get(k, k)} {H.num(x['to_peak'])}" for k, x in mg.items())
        share_end = ", ".join(f"{GROUPS.get(k, k)} {H.num(x['final'])}" for k, x in mg.items())
        paras.append(H.para(
            f"The shortcut itself, as its own metric ({demo.get('marker_metric', 'marker metric')}"
            f", integrated attribution summed over the same sampled updates): up to update "
            f"{answer['follows_marker_peak_update']} the updates raised it by "
            f"{H.num(mm['delta_to_peak'])}, through {share}; over the whole run it changed by "
            f"{H.num(mm['delta_final'])}, through {share_end}."
        ))
    if TASK in v:
        paras.append(H.para(
            "The task cue, the same way: reverting its pathways lowers the metric by "
            f"{H.num(v[TASK].get('removal', math.nan))}, its probe's ablation lowers the metric by "
            f"{H.num(v[TASK].get(C.ABLATION_PREFIX + 'metric', math.nan))} and the conflict "
            f"accuracy by {H.num(v[TASK].get(C.ABLATION_PREFIX + 'conflict_accuracy', math.nan))}."
        ))
    credit = answer["credit_by_marker_agrees"]
    if credit:
        paras.append(H.para(
            "Which experience did it: credit for the whole change, by whether the sample's marker "
            f"agreed with its cue: agreeing {H.num(credit.get('1', 0.0))}, conflicting "
            f"{H.num(credit.get('0', 0.0))} (the rest: weight decay and any share no "
            "per-sample factor covers)."
        ))
    rows = [[GROUPS.get(k, k), H.num(x["at_marker_peak"]), H.num(x["peak"]), str(x["peak_step"]),
             H.num(x["final"]),
             H.num(v.get(k, {}).get("removal")), H.num(v.get(k, {}).get("shapley"))]
            for k, x in g.items()]
    paras.append(H.table(["features", "share by the marker peak", "peak cumulative share",
                          "at update", "final",
                          "removal effect", "Shapley"], rows))
    return ANCHOR, TITLE, "".join(paras)


def write_lm_report(out: Path, demo: dict[str, Any]) -> Path:
    """report.html: the generic report of the run with the LM section after its summary."""
    return chisel.write_report(out, sections=[lm_section(demo["answer"], demo)])


def load_demo(out: str | Path) -> dict[str, Any]:
    return json.loads((Path(out) / LM_DEMO_FILE).read_text())
