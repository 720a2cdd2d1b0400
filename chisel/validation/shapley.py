"""`pathway_shapley`: Shapley values of the pathway-reversion game, by antithetic permutations.

Players are all pathways of the bound weights (features, `<mean>`, `<residual>`, `<bias>`); the
value of a coalition S is u(S) = m(θ_final) − m(θ_final with S's learned changes reverted). A
sampled permutation adds the players one by one; the marginals telescope to u(all), so every
permutation, and therefore the estimate, sums exactly (to float64 rounding) to
m(final) − m(all reverted). Each permutation is paired with its reverse (antithetic sampling:
a player early in one is late in the other, which cancels much of the order effect); the
standard error is over the pairs.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from torch import nn

from chisel.store.reader import Run
from chisel.validation import _common as C
from chisel.validation.game import Metric, ReversionGame

PLAYERS = ("all", "features")


def pathway_shapley(
    run: Run | str | os.PathLike,
    model: nn.Module,
    features: C.Features,
    metric: Metric,
    *,
    permutations: int = 150,
    seed: int = 0,
    centred: bool = True,
    steps: Iterable[int] | None = None,
    data: Any = None,
    params: Sequence[str] | None = None,
    players: Literal["all", "features"] = "all",
) -> pd.DataFrame:
    """Shapley value of every pathway in the game of reverting learned changes.

    Args:
        run, model, features, metric, steps, centred, data, params: as in
            `chisel.pathway_effects`.
        permutations: sampled permutations, counting each one's reverse (rounded up to even).
            Cost: permutations × (players − 1) + 2 metric evaluations, batched with vmap.
        seed: seeds the permutations (numpy's default_rng).
        players: "all" (default): every pathway is a player, so the values share out the whole
            m(final) − m(θ_start of the bound weights); "features": only the feature pathways
            play (`<mean>`, `<residual>`, `<bias>` stay learned), so the values share out
            m(final) − m(all feature pathways reverted).

    Returns:
        One row per player: pathway, feature, site, param, concept, kind, shapley,
        shapley_se (standard error over antithetic pairs; NaN with a single pair).
        `.attrs`: "total" (= m(final) − m(all players reverted) = Σ shapley), "metric_final",
        "metric_all_reverted", "evaluations", "permutations", "window".
    """
    if players not in PLAYERS:
        raise C.ValidationError(f"pathway_shapley: players={players!r}; use one of {PLAYERS}.")
    if not isinstance(permutations, int) or permutations < 1:
        raise C.ValidationError(f"pathway_shapley: permutations={permutations!r}; need an int >= 1.")
    game = ReversionGame(
        run, model, features, metric, steps=steps, centred=centred, data=data, params=params,
        what="pathway_shapley",
    )
    if players == "features":
        game.restrict([C.KIND_FEATURE])
    n_players, pairs = len(game), math.ceil(permutations / 2)
    rng = np.random.default_rng(seed)
    orders = np.stack([rng.permutation(n_players) for _ in range(pairs)])  # [pairs, P]
    orders = np.concatenate([orders, orders[:, ::-1]])  # [2 pairs, P]: antithetic partners
    ends = game.values(torch.stack([torch.zeros(n_players), torch.ones(n_players)]))
    values = _walks(game, orders, ends)  # [n, P + 1]: m after reverting the first k players
    marginal = values[:, :-1] - values[:, 1:]  # [n, P]: u(first k+1) − u(first k), in order
    phi = np.zeros_like(marginal)
    np.put_along_axis(phi, orders, marginal, axis=1)  # [n, P] by player
    paired = (phi[:pairs] + phi[pairs:]) / 2  # [pairs, P]
    se = paired.std(0, ddof=1) / math.sqrt(pairs) if pairs > 1 else np.full(n_players, np.nan)
    table = pd.DataFrame([
        {C.PATHWAY: p.id, C.FEATURE: p.feature, C.SITE: p.site, C.PARAM: p.param,
         C.CONCEPT: p.concept, C.KIND: p.kind} for p in game.players
    ])
    table[C.SHAPLEY] = paired.mean(0)
    table[C.SHAPLEY_SE] = se
    final, reverted = float(ends[0]), float(ends[1])
    table.attrs.update(
        total=final - reverted, metric_final=final, metric_all_reverted=reverted,
        evaluations=game.evaluations, permutations=2 * pairs, window=(game.start, game.end),
    )
    return table


def _walks(game: ReversionGame, orders: np.ndarray, ends: torch.Tensor) -> np.ndarray:
    """m with the first k players of each order reverted, k = 0..P: [n, P + 1].

    The endpoints (nothing / everything reverted) are the same two evaluations for every
    order, so each row telescopes to the same total."""
    n, n_players = orders.shape
    values = np.empty((n, n_players + 1))
    values[:, 0], values[:, -1] = float(ends[0]), float(ends[1])
    if n_players > 1:
        rank = torch.as_tensor(np.argsort(orders, axis=1))  # [n, P]: position of each player
        k = torch.arange(1, n_players)  # interior coalition sizes
        masks = (rank[:, None, :] < k[None, :, None]).double()  # [n, P − 1, P]
        inner = game.values(masks.reshape(-1, n_players)).reshape(n, n_players - 1)
        values[:, 1:-1] = inner.numpy()
    return values
