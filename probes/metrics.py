"""Held-out scores for probes, in torch: accuracy, balanced accuracy, ROC AUC, R²."""

from __future__ import annotations

import torch
from torch import Tensor


def accuracy(pred: Tensor, target: Tensor) -> float:
    """Fraction of equal entries of two ``[n]`` tensors."""
    return (pred == target).double().mean().item()


def balanced_accuracy(pred: Tensor, target: Tensor) -> float:
    """Mean over classes present in ``target`` of the per-class recall."""
    recalls = [(pred[target == c] == c).double().mean() for c in target.unique()]
    return torch.stack(recalls).mean().item()


def roc_auc(scores: Tensor, positive: Tensor) -> float:
    """Area under the ROC curve of ``scores [n]`` for boolean ``positive [n]``.

    Mann-Whitney form with average ranks for ties; NaN when only one class is present.
    """
    positive = positive.bool()
    n_pos = int(positive.sum())
    n_neg = positive.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    sorted_scores, order = scores.double().sort()
    _, inverse, counts = torch.unique_consecutive(
        sorted_scores, return_inverse=True, return_counts=True
    )
    last_rank = counts.cumsum(0).double()
    mean_rank = last_rank - (counts.double() - 1) / 2  # 1-based average rank of each tie group
    ranks = mean_rank[inverse]
    rank_sum = ranks[positive[order]].sum().item()
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def r2_score(pred: Tensor, target: Tensor) -> float:
    """Coefficient of determination ``1 - SS_res / SS_tot`` of ``[n]`` tensors."""
    target = target.double()
    ss_res = (target - pred.double()).pow(2).sum()
    ss_tot = (target - target.mean()).pow(2).sum()
    return (1 - ss_res / ss_tot).item() if ss_tot > 0 else float("nan")
