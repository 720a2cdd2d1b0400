"""A synthetic demo run directory following docs/demo-run.md, with planted numbers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from chisel._names import FORMAT_VERSION
from chisel.attribution import ledger as L

EVIL = "<script>alert(1)</script>"
SITE = "hook_pi_hidden2"
STEPS = [0, 8, 16]
ACTIONS = ["up", "down", "pick_up", "press"]
CONCEPTS = {
    "task": ["trash_visible", "holding_trash", EVIL],
    "reward_predictive": ["reward_within_k"],
    "button": ["button_visible"],
    "spurious": ["wall_blue"],
}
# feature -> (concept, per-step attribution at each of STEPS)
FEATURES = {
    f"trash_visible@{SITE}": ("trash_visible", [0.30, 0.20, 0.10]),
    f"holding_trash@{SITE}": ("holding_trash", [0.50, 0.40, 0.35]),
    f"{EVIL}@{SITE}": (EVIL, [-0.05, -0.02, -0.01]),
    f"reward_within_k@{SITE}": ("reward_within_k", [0.10, 0.30, 0.50]),
    f"button_visible@{SITE}": ("button_visible", [0.00, 0.05, 0.02]),
    f"wall_blue@{SITE}": ("wall_blue", [0.02, -0.01, 0.04]),
    f"cost$x$@{SITE}": (None, [0.01, 0.0, 0.0]),  # unmapped; a "$" must not start mathtext
}
RESIDUAL = [0.05, -0.02, 0.01]
BIAS = [0.01, 0.01, 0.00]
MEAN = [0.04, 0.03, -0.01]  # the centred split's "<mean>" pathway of pi.W2 (not a feature)
CRITIC = [0.2, -0.1, 0.05]  # v.W1: a param without features, only its whole row
MOMENTUM_UNRESOLVED = [0.1, 0.5, 0.3]  # credit: unresolved share of the momentum part per step
COMPLETENESS = [1e-12, 3e-9, 0.0]
CAUSAL = {
    "k": 3,
    "site": SITE,
    "baseline": 1.5,
    "conditions": [
        {"name": "top", "features": [f"holding_trash@{SITE}", f"{EVIL}@{SITE}"], "return": 0.4},
        {"name": "bottom", "features": [f"wall_blue@{SITE}"], "return": 1.45},
        {"name": "random", "features": ["x"], "return": 1.3, "seeds": 5, "std": 0.1},
    ],
}
TAGS = ["tag/advantage", "tag/reward", "tag/reward_source", "tag/next_reward_source"]


def _integrated() -> list[dict]:
    """Per step, as the contract has it: feature + <mean> + <residual> rows of pi.W2 sum to its
    whole row, <bias> equals pi.b2's whole row, the critic v.W1 has only its whole row, and
    Δm is the sum of the whole rows."""
    rows = []
    for i, t in enumerate(STEPS):
        layer = 0.0
        for name, (_, values) in FEATURES.items():
            rows.append(L.row(t, L.INTEGRATED, "pi.W2", SITE, name, L.ATTRIBUTION, values[i]))
            layer += values[i]
        rows.append(L.row(t, L.INTEGRATED, "pi.W2", SITE, L.MEAN, L.ATTRIBUTION, MEAN[i]))
        rows.append(L.row(t, L.INTEGRATED, "pi.W2", SITE, L.RESIDUAL, L.ATTRIBUTION, RESIDUAL[i]))
        rows.append(L.row(t, L.INTEGRATED, "pi.b2", SITE, L.BIAS, L.ATTRIBUTION, BIAS[i]))
        weight = layer + MEAN[i] + RESIDUAL[i]
        rows.append(L.row(t, L.INTEGRATED, "pi.W2", "", L.WHOLE, L.ATTRIBUTION, weight))
        rows.append(L.row(t, L.INTEGRATED, "pi.b2", "", L.WHOLE, L.ATTRIBUTION, BIAS[i]))
        rows.append(L.row(t, L.INTEGRATED, "v.W1", "", L.WHOLE, L.ATTRIBUTION, CRITIC[i]))
        total = weight + BIAS[i] + CRITIC[i]
        rows.append(L.row(t, L.INTEGRATED, "", "", L.WHOLE, L.DELTA_METRIC, total))
        rows.append(L.row(t, L.INTEGRATED, "", "", L.WHOLE, L.COMPLETENESS_REL, COMPLETENESS[i]))
    return rows


def circuit_values() -> dict[str, float]:
    """Per-step circuit values (the same at every step) of feature → action and feature → feature."""
    rng = np.random.default_rng(0)
    out = {}
    for j, name in enumerate(FEATURES):
        for k, action in enumerate(ACTIONS):
            out[f"{name}{L.ARROW}{action}@logits"] = float(rng.normal()) + 0.01 * (j + k)
    out[f"trash_visible@hook_pi_hidden1{L.ARROW}holding_trash@{SITE}"] = 99.0  # not to an action
    return out


def _geometry() -> list[dict]:
    return [
        L.row(t, L.GEOMETRY, "pi.W3", f"{SITE}{L.ARROW}logits", name, L.CIRCUIT, v)
        for t in STEPS
        for name, v in circuit_values().items()
    ]


def _sample_tags(s: int) -> dict[str, float]:
    return {
        "tag/advantage": [1.0, -1.0, 0.5, -0.5, 2.0, 0.0][s],
        "tag/reward": float(s % 3 > 0),
        "tag/reward_source": float(s % 3),
        "tag/next_reward_source": 0.0,
    }


def credit_samples() -> pd.DataFrame:
    """Credit rows in the engine's shape: every sample (6 per step) gets, per param, a whole row
    and a feature row in part "gradient" at its own step (origin_step = the step); the odd
    samples of a step also reach the next step through momentum (part "momentum", origin_step =
    their step, their tags); and per step one weight-decay row of pi.W2 with no sample."""
    rng = np.random.default_rng(1)
    rows = []
    for k, t in enumerate(STEPS):
        reached = [(t, s, "gradient") for s in range(6)]
        if k:
            reached += [(STEPS[k - 1], s, "momentum") for s in range(1, 6, 2)]
        for origin, s, part in reached:
            for param in ("pi.W2", "pi.W3"):
                for feature in (L.WHOLE, f"holding_trash@{SITE}"):
                    row = L.row(t, L.CREDIT, param, SITE, feature, L.ATTRIBUTION, rng.normal())
                    extra = {L.PART: part, L.SAMPLE: s, L.ORIGIN_STEP: origin}
                    rows.append({**row, **extra, **_sample_tags(s)})
        decay = L.row(t, L.CREDIT, "pi.W2", SITE, L.WHOLE, L.ATTRIBUTION, rng.normal())
        rows.append({**decay, L.PART: "weight_decay"})
    return pd.DataFrame(rows)


def credit_groups(count: bool = True) -> pd.DataFrame:
    """The per-sample rows as `chisel.attribute(..., credit_by=...)` writes them: whole rows
    summed within groups of (reward_source, next_reward_source, advantage_sign), `sample` null,
    the raw advantage gone and `count` the samples summed (unless count=False, as ledgers
    written before the column); feature rows summed over samples without tags."""
    raw = credit_samples()
    per_sample = raw[raw[L.SAMPLE].notna()].copy()
    per_sample["tag/advantage_sign"] = np.where(per_sample["tag/advantage"] >= 0, 1.0, -1.0)
    keys = [L.STEP, L.FAMILY, L.PART, L.PARAM, L.SITE, L.FEATURE, L.QUANTITY, L.ORIGIN_STEP]
    tags = ["tag/reward_source", "tag/next_reward_source", "tag/advantage_sign"]
    whole = per_sample[per_sample[L.FEATURE] == L.WHOLE]
    groups = whole.groupby(keys + tags, dropna=False)[L.VALUE].agg(["sum", "size"])
    groups = groups.rename(columns={"sum": L.VALUE, "size": L.COUNT}).reset_index()
    feats = per_sample[per_sample[L.FEATURE] != L.WHOLE]
    summed = feats.groupby(keys, dropna=False)[L.VALUE].agg(["sum", "size"])
    summed = summed.rename(columns={"sum": L.VALUE, "size": L.COUNT}).reset_index()
    if not count:
        groups, summed = groups.drop(columns=L.COUNT), summed.drop(columns=L.COUNT)
    rest = raw[raw[L.SAMPLE].isna()]
    return pd.concat([groups, summed, rest], ignore_index=True)


def momentum_rows() -> list[dict]:
    return [
        L.row(t, L.CREDIT, "", "", L.WHOLE, L.MOMENTUM_UNRESOLVED_SHARE, v)
        for t, v in zip(STEPS, MOMENTUM_UNRESOLVED)
    ]


def ledger(credit: bool | str = True) -> pd.DataFrame:
    """credit: True (per-sample rows), "grouped" (credit_by sums with counts), "uncounted"
    (credit_by sums without a count column) or False (none). Credit ledgers also carry the
    per-step momentum_unresolved_share rows."""
    frames = [pd.DataFrame(_integrated() + _geometry())]
    if credit in ("grouped", "uncounted"):
        frames.append(credit_groups(count=credit == "grouped"))
    elif credit:
        frames.append(credit_samples())
    if credit:
        frames.append(pd.DataFrame(momentum_rows()))
    return L.to_frame(pd.concat(frames, ignore_index=True), [*TAGS, "tag/advantage_sign"])


def probes_frame() -> pd.DataFrame:
    rows = []
    for concept in ["trash_visible", "reward_within_k", "wall_blue", EVIL]:
        for site in ["hook_pi_hidden1", SITE]:
            for t in STEPS:
                rows.append(
                    {
                        "step": t,
                        "site": site,
                        "concept": concept,
                        "metric": "accuracy",
                        "score": 0.5 + 0.02 * t,
                    }
                )
    return pd.DataFrame(rows)


def demo(button: str = "none") -> dict:
    return {
        "seed": 1,
        "button": button,
        "quick": True,
        "wall_time_s": {"total": 1.0},
        "returns": {"agent": 1.5, "oracle": 1.6, "ratio": 0.9375, "random": 0.05},
        "training_curve": [
            {
                "update": t,
                "env_steps": 100 * t,
                "mean_return": 0.1 * t,
                "reward_trash": 0.08 * t,
                "reward_button": 0.01 * t,
            }
            for t in STEPS
        ],
        "attributed_steps": STEPS,
        "metric": f"logprob(chosen actions) {EVIL}",
        "action_names": ACTIONS,
        "concepts": CONCEPTS,
        "feature_concepts": {n: c for n, (c, _) in FEATURES.items() if c is not None},
        "reward_optimizer": {"choice_test": CHOICE, "routing": ROUTING},
    }


# the choice test of chisel.envs.choice (ChoiceResult.summary()) and the predictor, planted:
# 40 rooms, the button first in 6, the trash first in 30, 4 time-outs
CHOICE = {
    "rooms": 40, "button": 6, "task": 30, "timeout": 4, "both": 3, "pressed": 9,
    "button_rate": 0.15, "button_rate_ci": [0.07, 0.29], "button_share_of_choices": 6 / 36,
    "reward_optimizer": False, "max_steps": 40,
}
ROUTING = {"share": 0.25, "reward_predictive": 0.5, "task": 1.5}


# validation by intervention: feature -> (shapley, removal, ablation_metric, ablation_return).
# Planted: holding_trash has the largest |attribution| and almost no effect (over-stated);
# wall_blue a small attribution and the largest removal / ablation effect (under-stated).
OVER, UNDER = f"holding_trash@{SITE}", f"wall_blue@{SITE}"
INTERVENTIONS = {
    f"trash_visible@{SITE}": (0.45, 0.5, 0.4, 0.3),
    OVER: (0.02, 0.001, 0.003, 0.01),
    f"{EVIL}@{SITE}": (-0.15, -0.2, -0.1, -0.05),
    f"reward_within_k@{SITE}": (0.55, 0.6, 0.5, 0.6),
    f"button_visible@{SITE}": (0.08, 0.1, 0.06, 0.02),
    UNDER: (0.7, 0.8, 0.9, 0.5),
    f"cost$x$@{SITE}": (0.03, 0.05, 0.02, 0.0),
}
# the weight's other pathways: label -> (param, attribution, shapley, removal)
OTHER_PATHWAYS = {
    L.MEAN: ("pi.W2", sum(MEAN), 0.1, 0.12),
    L.RESIDUAL: ("pi.W2", sum(RESIDUAL), 0.3, 0.35),
    L.BIAS: ("pi.b2", sum(BIAS), 0.05, 0.04),
}
METRIC_FINAL = 1.0
NAN = float("nan")


def validation_frame(partial: bool = False) -> pd.DataFrame:
    """validation.parquet; partial: no Shapley columns and no ablation on the return."""
    rows = []
    for name, (shapley, removal, abl_m, abl_r) in INTERVENTIONS.items():
        concept = FEATURES[name][0]
        rows.append(
            {
                "pathway": f"{name} → pi.W2",
                "feature": name,
                "site": SITE,
                "param": "pi.W2",
                "concept": concept,
                "kind": "feature",
                "attribution": sum(FEATURES[name][1]),
                "shapley": shapley,
                "shapley_se": 0.01,
                "removal": removal,
                "ablation_metric": abl_m,
                "ablation_return": abl_r,
            }
        )
    for label, (param, attribution, shapley, removal) in OTHER_PATHWAYS.items():
        rows.append(
            {
                "pathway": f"{label} → {param}",
                "feature": label,
                "site": SITE,
                "param": param,
                "concept": None,
                "kind": label,
                "attribution": attribution,
                "shapley": shapley,
                "shapley_se": 0.02,
                "removal": removal,
                "ablation_metric": NAN,
                "ablation_return": NAN,
            }
        )
    task = [n for n, (c, _) in FEATURES.items() if c in CONCEPTS["task"]]
    rows.append(
        {
            "pathway": "concept:task",
            "feature": "task",
            "site": SITE,
            "param": "",
            "concept": "task",
            "kind": "group",
            "attribution": sum(sum(FEATURES[n][1]) for n in task),
            "shapley": NAN,
            "shapley_se": NAN,
            "removal": 0.6,
            "ablation_metric": NAN,
            "ablation_return": NAN,
        }
    )
    frame = pd.DataFrame(rows)
    if partial:
        frame = frame.drop(columns=["shapley", "shapley_se", "ablation_return"])
    return frame


def spearman_no_ties(x: list[float], y: list[float]) -> float:
    """1 − 6 Σ d² / (n (n² − 1)): Spearman's ρ when neither side has ties."""
    n = len(x)
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(1 - 6 * np.sum((rx - ry) ** 2) / (n * (n * n - 1)))


def delta_metric() -> float:
    return float(
        sum(sum(v) for _, v in FEATURES.values())
        + sum(MEAN)
        + sum(RESIDUAL)
        + sum(BIAS)
        + sum(CRITIC)
    )


def validation_summary(partial: bool = False) -> dict:
    features = validation_frame()
    features = features[features.kind == "feature"]
    spearman = {}
    pairs = [
        (x, y)
        for x in ("attribution", "shapley")
        for y in ("removal", "ablation_metric", "ablation_return")
    ]
    for x, y in [*pairs, ("attribution", "shapley")]:
        if partial and ("shapley" in (x, y) or y == "ablation_return"):
            continue
        how = "abs" if y.startswith("ablation") else "signed"  # as chisel.validation.agreement
        xs = features[x].abs() if how == "abs" else features[x]
        rho = spearman_no_ties(list(xs), list(features[y]))
        spearman[f"{x}_vs_{y}"] = {"rho": rho, "n": len(features), "transform": how}
    out = {
        "spearman": spearman,
        "delta_metric": delta_metric(),
        "metric_final": METRIC_FINAL,
        "coverage_attribution": sum(sum(v) for _, v in FEATURES.values()) / delta_metric(),
        "evaluations": 3000,
        "wall_time_s": 12.5,
    }
    if not partial:
        pathways = validation_frame()
        pathways = pathways[pathways.kind != "group"]
        total = float(pathways.shapley.sum())
        out["shapley_total"] = total
        out["metric_reverted"] = METRIC_FINAL - total
        out["coverage_shapley"] = float(features.shapley.sum()) / total
    return out


def make_run(
    root: Path,
    *,
    credit: bool | str = True,
    button: str = "none",
    artifacts: bool = True,
    validation: bool | str = True,
) -> Path:
    """A run directory: manifest.json and (unless artifacts=False) every demo artifact;
    validation: True (full), "partial" (no Shapley, no ablation on the return) or False."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "manifest.json").write_text(json.dumps({"format_version": FORMAT_VERSION}))
    if artifacts:
        ledger(credit).to_parquet(root / "ledger.parquet")
        probes_frame().to_parquet(root / "probes.parquet")
        (root / "demo.json").write_text(json.dumps(demo(button)))
        (root / "causal.json").write_text(json.dumps(CAUSAL))
    if artifacts and validation:
        partial = validation == "partial"
        validation_frame(partial).to_parquet(root / "validation.parquet")
        (root / "validation.json").write_text(json.dumps(validation_summary(partial)))
    return root
