"""Probe accuracy per checkpoint, site and concept: the what-when-where table."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from probes.capture import Inputs, Positions, capture
from probes.errors import ProbeFitError
from probes.features import FeatureSet
from probes.fit import fit_probe

if TYPE_CHECKING:
    import pandas as pd

COLUMNS = ("step", "site", "concept", "metric", "score")


def probe_over_training(
    model: nn.Module,
    checkpoints: Iterable[tuple[int, Mapping[str, Tensor]]] | Mapping[int, Mapping[str, Tensor]],
    inputs: Inputs,
    labels: Mapping[str, Tensor],
    sites: str | Sequence[str],
    *,
    batch_size: int | None = None,
    positions: Positions = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    l2: float = 1e-4,
) -> pd.DataFrame:
    """Fit one probe per (checkpoint, site, concept) and tabulate its held-out score.

    Args:
        model: the architecture; each checkpoint's ``state_dict`` is loaded into it in turn,
            and the model's own state is restored afterwards (also on error).
        checkpoints: ``(step, state_dict)`` pairs, or a mapping ``{step: state_dict}``.
        inputs: as for :func:`probes.capture`, ``N`` examples.
        labels: ``{concept: Tensor[N]}`` (or ``[N, pos]`` for sequence sites with all
            positions); bool/int labels give logistic probes scored by held-out accuracy,
            float labels ridge probes scored by held-out R².
        sites: where to probe.
        batch_size, positions: passed to :func:`probes.capture`.
        test_fraction, seed, l2: passed to :func:`probes.fit_probe` (one seed: every
            checkpoint is scored on the same held-out examples).

    Returns:
        A tidy DataFrame with columns ``step, site, concept, metric, score`` (``metric`` is
        ``"accuracy"`` or ``"r2"``), one row per (step, site, concept), in input order.
    """
    import pandas as pd

    site_list = [sites] if isinstance(sites, str) else list(sites)
    items = checkpoints.items() if isinstance(checkpoints, Mapping) else checkpoints
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    rows: list[tuple[Any, ...]] = []
    try:
        for step, state in items:
            model.load_state_dict(state)
            acts = capture(model, inputs, site_list, batch_size=batch_size, positions=positions)
            for site in site_list:
                for concept, y in labels.items():
                    x, yy = _rows(acts[site], torch.as_tensor(y), site, concept)
                    probe = fit_probe(
                        x,
                        yy,
                        name=concept,
                        site=site,
                        test_fraction=test_fraction,
                        seed=seed,
                        l2=l2,
                    )
                    meta = (probe[0] if isinstance(probe, FeatureSet) else probe).metadata
                    rows.append((step, site, concept, meta["score_name"], meta["score"]))
    finally:
        model.load_state_dict(original)
    return pd.DataFrame(rows, columns=list(COLUMNS))


def _rows(acts: Tensor, labels: Tensor, site: str, concept: str) -> tuple[Tensor, Tensor]:
    """Activations ``[N, d]`` or ``[N, pos, d]`` and labels to probe rows ``[n, d]``, ``[n]``."""
    if acts.ndim == 2 and labels.shape == acts.shape[:1]:
        return acts, labels
    if acts.ndim == 3 and labels.shape == acts.shape[:2]:
        return acts.flatten(0, 1), labels.flatten()
    raise ProbeFitError(
        f"labels of concept {concept!r} have shape {tuple(labels.shape)} but activations at "
        f"{site!r} have shape {tuple(acts.shape)}. Give labels [N] for [N, d] sites, [N, pos] "
        "for [N, pos, d] sites, or pick one position with positions=..."
    )
