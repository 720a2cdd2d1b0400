"""`pathway_effects`: revert one pathway's learned change (or a group's) and measure the metric."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pandas as pd
import torch
from torch import nn

from chisel.store.reader import Run
from chisel.validation import _common as C
from chisel.validation.game import Metric, ReversionGame

GROUP_BY = ("concept", "site")

Groups = Sequence[str] | Mapping[str, Iterable[str]] | None


def pathway_effects(
    run: Run | str | os.PathLike,
    model: nn.Module,
    features: C.Features,
    metric: Metric,
    *,
    steps: Iterable[int] | None = None,
    centred: bool = True,
    groups: Groups = None,
    data: Any = None,
    params: Sequence[str] | None = None,
) -> pd.DataFrame:
    """What the final network owes to each pathway's learned change, by reverting it.

    For every recorded Linear weight W with features at its input, each feature pathway
    (ΔW d_j e_jᵀ, dual basis of all features there), `<residual>` (the off-span change),
    `<mean>` (the change acting on the mean input; centred only) and `<bias>` is reverted alone
    from the run's final θ, and the metric measured (float64, eval mode, on a copy: the model
    passed is never changed). See `chisel.validation.game` for the algebra.

    Args:
        run: a `chisel.Run` or its directory.
        model: the trained architecture; parameter values come from the run.
        features: a non-empty `probes.FeatureSet` (or features).
        metric: `model -> scalar tensor` (see `chisel.metrics`).
        steps: a contiguous window of steps whose learned change is reverted (θ_end − θ_start);
            default: the whole run. The evaluation point is always the run's final θ.
        centred: keep each reverted pathway's mean contribution (bias compensation with x̄,
            the mean input of W over the metric's states at the final θ) and give the mean its
            own `<mean>` pathway; False reverts ΔW d_j e_jᵀ plainly.
        groups: pathways reverted together, besides the single ones: "concept" (all feature
            pathways of a concept, `feature.metadata["concept"]`) and/or "site" (all feature
            pathways at a site); or {group name: feature names}. Default: both built-in kinds;
            a group needs two or more pathways. `()` for none.
        data: inputs of `model(data)` over which x̄ is averaged instead of the metric's states.
        params: restrict to these weight params (e.g. the actor's); default every recorded
            Linear weight with features at its input.

    Returns:
        One row per pathway, then per group: pathway (unique id "feature→param"; groups
        "concept=…" / "site=…" / the given name), feature, site, param, concept, kind
        ("feature" | "<mean>" | "<residual>" | "<bias>" | "group"), members, effect
        (= m(final) − m(final with it reverted): positive when the change helps the metric
        now), metric_final, metric_without, metric_all_reverted (every pathway reverted).
        `.attrs` holds "evaluations" and "window" (start, end).
    """
    game = ReversionGame(
        run, model, features, metric, steps=steps, centred=centred, data=data, params=params,
        what="pathway_effects",
    )
    rows = [_player_row(p) for p in game.players]
    masks = [torch.eye(len(game), dtype=torch.float64)]
    for name, members, fields in _groups(game, groups):
        mask = torch.zeros(1, len(game), dtype=torch.float64)
        mask[0, members] = 1.0
        masks.append(mask)
        rows.append({**fields, C.PATHWAY: name, C.KIND: C.KIND_GROUP, C.MEMBERS: len(members)})
    ends = torch.stack([torch.zeros(len(game)), torch.ones(len(game))]).double()
    values = game.values(torch.cat([ends, *masks]))
    final, reverted, without = float(values[0]), float(values[1]), values[2:].tolist()
    table = pd.DataFrame(rows)
    table[C.EFFECT] = [final - v for v in without]
    table[C.METRIC_FINAL] = final
    table[C.METRIC_WITHOUT] = without
    table[C.METRIC_REVERTED] = reverted
    table.attrs.update(evaluations=game.evaluations, window=(game.start, game.end))
    return table


def _player_row(p) -> dict:
    return {
        C.PATHWAY: p.id, C.FEATURE: p.feature, C.SITE: p.site, C.PARAM: p.param,
        C.CONCEPT: p.concept, C.KIND: p.kind, C.MEMBERS: 1,
    }


def _groups(game: ReversionGame, groups: Groups) -> list[tuple[str, list[int], dict]]:
    """(name, member player indices, row fields) of each group."""
    feats = [(i, p) for i, p in enumerate(game.players) if p.kind == C.KIND_FEATURE]
    if isinstance(groups, Mapping):
        out = []
        known = {p.feature for _, p in feats}
        for name, names in groups.items():
            names = list(names)
            missing = [n for n in names if n not in known]
            if missing or not names:
                raise C.ValidationError(
                    f"pathway_effects: group {name!r} names features {missing or names} that have "
                    f"no pathway; features with pathways: {sorted(known)[:10]}."
                )
            members = [i for i, p in feats if p.feature in set(names)]
            out.append((str(name), members, {C.FEATURE: "", C.SITE: "", C.PARAM: "", C.CONCEPT: ""}))
        return out
    kinds = GROUP_BY if groups is None else tuple(groups)
    bad = set(kinds) - set(GROUP_BY)
    if bad:
        raise C.ValidationError(
            f"pathway_effects: groups {sorted(bad)} are unknown; use any of {GROUP_BY}, or a "
            "mapping {group name: feature names}."
        )
    out = []
    for kind in kinds:
        key = (lambda p: p.concept) if kind == "concept" else (lambda p: p.site)
        for value in dict.fromkeys(key(p) for _, p in feats):
            members = [i for i, p in feats if key(p) == value]
            if value and len(members) >= 2:
                fields = {C.FEATURE: "", C.SITE: value if kind == "site" else "", C.PARAM: "",
                          C.CONCEPT: value if kind == "concept" else ""}
                out.append((f"{kind}={value}", members, fields))
    return out
