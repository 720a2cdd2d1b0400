"""Each feature's geometry, live: how every update moved the weights along it.

For a weight W (out × in) whose input carries a feature's site (unit read direction d) and whose
output carries another's (unit direction u), one optimizer step's ΔW gives

    geometry/read/<feature>@<param>  = ‖ΔW d‖       (how the layer's use of the feature changed)
    geometry/write/<feature>@<param> = ‖uᵀ ΔW‖      (how what the layer writes along u changed)

as in the geometry family of `chisel.attribute`, but while training. Which weight reads or writes
which site is found by tensor identity during the first training forward pass (passive hooks,
removed at the first optimizer step); the numbers are computed on chisel's writer thread from the
update it writes, so the training thread does no extra work.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

import probes
from chisel.attribution.weights import LinearWeight, SiteWatch, linear_weights

READ, WRITE = "geometry/read/", "geometry/write/"


@dataclass(frozen=True)
class _Side:
    param: str
    names: tuple[str, ...]
    directions: Tensor  # [F, d] unit rows, float64
    transposed: bool  # HF Conv1D stores in × out
    reads: bool  # True: ‖ΔW d‖ at the input; False: ‖uᵀ ΔW‖ at the output


class LiveGeometry:
    """Binds `features` at the first training forward pass; gives each step's geometry scalars.

    Owns its hooks: `remove()` (the live view calls it on close) removes what is still attached.
    """

    def __init__(self, model: nn.Module, features: Any) -> None:
        """Checks the features' sites now (an unknown site is an error before anything starts);
        hooks nothing until `attach`."""
        self.features = _feature_set(features)
        self._model = model
        self._weights: list[LinearWeight] = []
        self._sites = [f.site for f in self.features]
        self._resolved = [probes.resolve_site(model, s) for s in dict.fromkeys(self._sites)]
        self._watch: SiteWatch | None = None
        self._step_hook: Any = None
        self.sides: list[_Side] | None = None  # set at the first optimizer step

    def attach(self, optimizer: Any, recorded: Iterable[str]) -> None:
        """Watch the next forward pass; bind at the first optimizer step. `recorded`: the names
        of the parameters the run records (the ones whose updates the writer hands over)."""
        self._weights = linear_weights(self._model, set(recorded))
        self._watch = SiteWatch(self._model, self._resolved, self._weights)
        self._step_hook = optimizer.register_step_pre_hook(lambda *_: self._bind())

    def _bind(self) -> None:
        """First optimizer step: the forward pass has run; keep the binding, drop the hooks."""
        if self._watch is None:
            return
        watch, self._watch = self._watch, None
        try:
            bound = watch.bound(self._weights, self._sites)
        finally:
            watch.remove()
            self._step_hook.remove()
            self._step_hook = None
        covered = {s for w in bound for s in (*w.in_sites, *w.out_sites)}
        missing = [s for s in dict.fromkeys(self._sites) if s not in covered]
        if missing:  # the training goes on; the view says what it cannot show
            warnings.warn(
                f"chisel: the TensorBoard view shows no geometry for the features at {missing}: "
                "no recorded Linear weight read or wrote those sites in the first forward pass. "
                "Put features at a site a weight reads or writes (e.g. a Linear's ':in').",
                RuntimeWarning,
                stacklevel=2,
            )
        self.sides = [side for w in bound for side in self._sides_of(w)]

    def _sides_of(self, w: LinearWeight) -> list[_Side]:
        out = []
        for sites, reads in ((w.in_sites, True), (w.out_sites, False)):
            feats = [f for s in sites for f in self.features.at(s)]
            if not feats:
                continue
            dirs = torch.stack([f.read.double() / f.read.double().norm() for f in feats])
            out.append(_Side(w.param, tuple(f.name for f in feats), dirs, w.transposed, reads))
        return out

    def scalars(self, deltas: Mapping[str, Tensor]) -> dict[str, float]:
        """{name: value} for one step; `deltas` maps each weight param to its update."""
        out: dict[str, float] = {}
        for side in self.sides or []:
            delta = deltas.get(side.param)
            if delta is None:
                continue
            m = delta.double()
            m = m.T if side.transposed else m  # [out, in]
            if side.reads:
                values, prefix = torch.linalg.vector_norm(m @ side.directions.T, dim=0), READ
            else:
                values, prefix = torch.linalg.vector_norm(side.directions @ m, dim=1), WRITE
            for name, value in zip(side.names, values.tolist()):
                out[f"{prefix}{name}@{side.param}"] = value
        return out

    def remove(self) -> None:
        if self._watch is not None:
            self._watch.remove()
            self._watch = None
        if self._step_hook is not None:
            self._step_hook.remove()
            self._step_hook = None


def _feature_set(features: Any) -> probes.FeatureSet:
    if isinstance(features, probes.FeatureSet):
        return features
    if isinstance(features, probes.Feature):
        return probes.FeatureSet([features])
    return probes.FeatureSet(list(features))
