"""Validation by intervention: does what the ledger ranks hold when the network is changed?

- `pathway_effects`: revert one pathway's learned change (or a group's) from the final weights
  and measure the metric (the attribution's own claim: same metric, same states);
- `pathway_shapley`: Shapley values of that reversion game (interactions included; they sum
  exactly to m(final) − m(all reverted));
- `ablation_effects`: project a feature out of its site (centred) and measure any scores
  (does the network rely on it?);
- `validation_table` / `agreement`: join with the ledger and rank-correlate.
"""

from chisel.validation._common import ValidationError
from chisel.validation.ablation import ablation_effects
from chisel.validation.agreement import (
    agreement,
    cumulative_attribution,
    spearman,
    validation_table,
)
from chisel.validation.pathways import pathway_effects
from chisel.validation.shapley import pathway_shapley

__all__ = [
    "ValidationError",
    "ablation_effects",
    "agreement",
    "cumulative_attribution",
    "pathway_effects",
    "pathway_shapley",
    "spearman",
    "validation_table",
]
