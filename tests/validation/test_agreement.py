"""The ledger join and the rank correlations, on tables whose answers are known."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import chisel
from chisel.attribution import ledger as L
from chisel.validation import spearman


def test_spearman_against_hand_ranks():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 45]) == (pytest.approx(1.0), 4)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == (pytest.approx(-1.0), 4)
    # ties share their average rank: x ranks [1, 2.5, 2.5, 4]
    rx, ry = np.array([1, 2.5, 2.5, 4]), np.array([1, 2, 3, 4])
    want = np.corrcoef(rx, ry)[0, 1]
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4])[0] == pytest.approx(want, abs=1e-15)
    rho, n = spearman([1, np.nan, 3, 4, 5], [1, 2, np.inf, 4, 3])
    assert n == 3 and rho == pytest.approx(0.5)
    assert np.isnan(spearman([1, 2], [1, 2])[0]) and np.isnan(spearman([1, 1, 1], [1, 2, 3])[0])


def _ledger() -> pd.DataFrame:
    rows = []
    for step in (0, 1):
        for param, feature, value in (
            ("fc.weight", "a", 1.0 + step),  # Σ = 3
            ("fc.weight", "b", -0.5),  # Σ = -1
            ("fc.weight", L.RESIDUAL, 0.25),  # Σ = 0.5
            ("fc.bias", L.BIAS, 0.1),  # Σ = 0.2
            ("fc.weight", L.WHOLE, 99.0),  # the param's whole share: not a pathway
        ):
            rows.append(L.row(step, L.INTEGRATED, param, "s", feature, L.ATTRIBUTION, value))
        rows.append(L.row(step, L.CREDIT, "fc.weight", "s", "a", L.ATTRIBUTION, 50.0))  # ignored
    return L.to_frame(rows, [])


def _pathways() -> pd.DataFrame:
    rows = [
        ("a→fc.weight", "a", "fc.weight", "feature", 0.9),
        ("b→fc.weight", "b", "fc.weight", "feature", -0.2),
        ("c→fc.weight", "c", "fc.weight", "feature", 0.05),
        ("<residual>→fc.weight", L.RESIDUAL, "fc.weight", L.RESIDUAL, 0.4),
        ("<mean>→fc.weight", L.MEAN, "fc.weight", L.MEAN, 0.3),
        ("<bias>→fc.bias", L.BIAS, "fc.bias", L.BIAS, 0.1),
        ("concept=x", "", "", "group", 1.0),
    ]
    return pd.DataFrame(
        [{"pathway": p, "feature": f, "site": "s", "param": q, "concept": "", "kind": k, "effect": e}
         for p, f, q, k, e in rows]
    )


def test_the_table_sums_the_ledger_by_param_and_feature():
    shapley = pd.DataFrame({"pathway": ["a→fc.weight", "b→fc.weight"], "shapley": [0.8, -0.1],
                            "shapley_se": [0.01, 0.02]})
    ablation = pd.DataFrame({"feature": ["a", "b", "c", "a"], "score": ["metric"] * 3 + ["return"],
                             "effect": [0.3, 0.2, 0.1, 0.7]})
    table = chisel.validation_table(_ledger(), _pathways(), shapley, ablation).set_index("pathway")
    assert "concept=x" not in table.index
    assert table.attribution.to_dict() == pytest.approx({
        "a→fc.weight": 3.0, "b→fc.weight": -1.0, "c→fc.weight": np.nan,
        "<residual>→fc.weight": 0.5, "<mean>→fc.weight": np.nan, "<bias>→fc.bias": 0.2,
    }, nan_ok=True)
    assert table.removal["a→fc.weight"] == 0.9
    assert table.shapley["b→fc.weight"] == -0.1 and np.isnan(table.shapley["c→fc.weight"])
    assert table.ablation_metric["c→fc.weight"] == 0.1 and np.isnan(table.ablation_metric[L.RESIDUAL + "→fc.weight"])
    assert table.ablation_return["a→fc.weight"] == 0.7 and np.isnan(table.ablation_return["b→fc.weight"])


def test_agreement_is_signed_for_removal_and_absolute_for_ablation():
    table = pd.DataFrame({
        "pathway": list("pqrst"), "kind": ["feature"] * 4 + [L.RESIDUAL],
        "attribution": [-4.0, 3.0, -2.0, 1.0, 100.0],
        "removal": [-4.0, 3.0, -2.0, 1.0, -100.0],  # signed: perfect agreement
        "ablation_metric": [4.0, 3.0, 2.0, 1.0, 0.0],  # follows |attribution| only
    })
    got = chisel.agreement(table).set_index(["x", "y"])
    assert got.loc[("attribution", "removal"), "rho"] == pytest.approx(1.0)
    assert got.loc[("attribution", "removal"), "n"] == 4  # the <residual> row is left out
    assert got.loc[("attribution", "ablation_metric"), "rho"] == pytest.approx(1.0)
    assert got.loc[("attribution", "ablation_metric"), "transform"] == "abs"
    assert got.loc[("attribution", "removal"), "transform"] == "signed"
    assert ("shapley", "removal") not in got.index  # no shapley column: no pair
    every = chisel.agreement(table, kinds=("feature", L.RESIDUAL)).set_index(["x", "y"])
    assert every.loc[("attribution", "removal"), "n"] == 5
