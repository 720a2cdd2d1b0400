"""Metrics for `chisel.attribute`: scalar behaviour measures `model -> Tensor[]`.

    >>> metric = chisel.metrics.logprob(obs, actions)   # doctest: +SKIP
"""

from chisel.attribution.metrics import (
    Metric,
    action_logit,
    action_prob,
    as_input,
    kl_to,
    logprob,
    value,
)

__all__ = ["Metric", "action_logit", "action_prob", "as_input", "kl_to", "logprob", "value"]
