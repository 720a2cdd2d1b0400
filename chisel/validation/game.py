"""The pathway-reversion game: the metric of the final network with some learned changes undone.

For a Linear W [out, in] (bias b) whose input carries features with unit read vectors
D [F, in] (all features bound there, FeatureSet order), the dual basis is E = Dᵀ(DDᵀ)⁺ [in, F]
(column e_j) and P = Σ_j d_j e_jᵀ = Dᵀ(DDᵀ)⁺D the projector on span D. Over a window of steps the
weight changed by ΔW = W_end − W_start (runs telescope exactly). Its pathways:

    feature j     ΔW_j = ΔW d_j e_jᵀ          revert: W ← W − ΔW_j,        b ← b + ΔW_j x̄
    <residual>    ΔW (I − P)                  revert: W ← W − ΔW(I − P),   b ← b + ΔW(I − P) x̄
    <mean>        ΔW x̄ (centred only)         revert: b ← b − ΔW x̄
    <bias>        Δb                          revert: b ← b − Δb

with x̄ the mean input of W over the metric's states at the final weights. The compensations
keep each reverted pathway's mean contribution, so a feature pathway is charged only for how
its change acts on the feature's *variation*; the mean part is the `<mean>` pathway. Reverting
all pathways of W gives back (W_start, b_start) exactly. Without a bias the compensation is an
output offset (a forward hook on the private copy). `centred=False`: no `<mean>`, no
compensation.

Every reversion is linear in θ: a coalition S of pathways evaluates m(θ_final − Σ_{p∈S} R_p),
so batches of coalitions are one tensordot of a 0/1 mask with the stacked R_p, evaluated with
`torch.func.vmap` over `functional_call` (a loop when the metric cannot be vmapped).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from chisel.attribution import ledger as L
from chisel.attribution.binding import bind
from chisel.attribution.copying import private_copy
from chisel.attribution.functional import MetricCall, input_means
from chisel.attribution.weights import LinearWeight
from chisel.errors import StepOutOfRangeError
from chisel.store.reader import Run, load
from chisel.validation._common import (
    KIND_FEATURE,
    Features,
    ValidationError,
    concept,
    feature_set,
    resolve_sites,
    scalar,
)
from probes.sites import module_at

Metric = Any  # model -> scalar tensor
OFFSET = "<offset>:"  # + module path: an output offset for a Linear without a bias parameter
DTYPE = torch.float64


@dataclass(frozen=True)
class Pathway:
    """One player of the game: a part of a weight's learned change, and how to revert it."""

    id: str  # "at_can@hook_obs→pi_fc1.weight", "<mean>→pi_fc1.weight", "<bias>→pi_fc1.bias"
    feature: str  # the feature's name, or "<mean>" / "<residual>" / "<bias>"
    site: str
    param: str
    concept: str
    kind: str  # "feature" | "<mean>" | "<residual>" | "<bias>"
    revert: dict[str, Tensor]  # {param name or OFFSET+module: amount subtracted}, float64


def window(run: Run, steps: Iterable[int] | None) -> tuple[int, int]:
    """(start, end): the learned change of the window is θ_end − θ_start (end exclusive)."""
    n = len(run)
    if n == 0:
        raise ValidationError(f"the run {run.path} has no complete step: nothing was learned yet.")
    if steps is None:
        return 0, n
    chosen = sorted(set(steps if not isinstance(steps, int) else [steps]))
    bad = [t for t in chosen if not (isinstance(t, int) and 0 <= t < n)]
    if bad or not chosen:
        raise StepOutOfRangeError(
            f"steps {bad[:5] or '(none)'} do not select steps of the run ({n} steps: 0..{n - 1})."
        )
    if chosen != list(range(chosen[0], chosen[-1] + 1)):
        raise ValidationError(
            f"steps must be a contiguous window (e.g. range({chosen[0]}, {chosen[-1] + 1})); got "
            f"{len(chosen)} steps with gaps. The reverted change is θ_end − θ_start of the window."
        )
    return chosen[0], chosen[-1] + 1


class ReversionGame:
    """v(mask) = m(θ_final − Σ_p mask_p R_p), on a float64 eval-mode copy of the model.

    θ_final is the run's last θ (`run.params(len(run))`) whatever the window: reverting a
    window's change asks what the final network owes to what was learned in that window.
    """

    def __init__(
        self,
        run: Run | str | os.PathLike,
        model: nn.Module,
        features: Features,
        metric: Metric,
        *,
        steps: Iterable[int] | None = None,
        centred: bool = True,
        data: Any = None,
        params: Sequence[str] | None = None,
        what: str = "pathway_effects",
        batch_bytes: int = 64 * 2**20,
    ) -> None:
        run = run if isinstance(run, Run) else load(run)
        self.what = what
        self.features = feature_set(features, what)
        self.start, self.end = window(run, steps)
        self.copy = _private_copy(run, model)
        self.device = next((p.device for p in self.copy.parameters()), torch.device("cpu"))
        self.metric = metric
        self._call = MetricCall(self.copy, metric)
        self.evaluations = 0
        self.use_vmap = True
        self._offsets: dict[str, Tensor] = {}
        with torch.no_grad(), _explain_dtype(what, metric):
            self.evaluations += 1
            scalar(metric(self.copy), f"{what}: the metric {_describe(metric)}")
        resolve_sites(self.copy, self.features.sites, what)
        bound = self._bind(run, params)
        x_mean = self._mean_inputs(bound, data)
        self.evaluations += 2  # binding the sites and x̄ each ran the metric (or the data) once
        theta_s, theta_e = run.params(self.start), run.params(self.end)
        self.players: list[Pathway] = []
        for w in bound:
            self.players.extend(self._pathways(w, theta_s, theta_e, x_mean[w.module], centred))
        if not self.players:
            raise ValidationError(
                f"{what}: no recorded Linear weight reads the features' sites "
                f"{self.features.sites}, so there is no pathway to revert. Put features at the "
                "input of a recorded Linear (its ':in' site, or the HookPoint feeding it)."
            )
        self._batch_bytes = batch_bytes
        self._prepare(batch_bytes)

    # -- construction ----------------------------------------------------------------------------
    def _bind(self, run: Run, params: Sequence[str] | None) -> list[LinearWeight]:
        """The weights with features at their input, bound as `chisel.attribute` binds them (the
        same unit directions and dual basis: a pathway here is a ledger row there)."""
        binding = bind(
            self.copy, lambda: self.metric(self.copy), DTYPE, set(run.param_names), self.features,
            centred=False,
        )
        self._blocks = {p: ins for p, (ins, _) in binding.blocks.items() if ins is not None}
        weights = [binding.by_param[p] for p in self._blocks]
        if params is not None:
            known = set(binding.by_param)
            unknown = [p for p in params if p not in known]
            if unknown:
                raise ValidationError(
                    f"{self.what}: params {unknown} are not recorded Linear weights of the model; "
                    f"choose among {sorted(known)}."
                )
            weights = [w for w in weights if w.param in set(params)]
        return weights

    def _mean_inputs(self, weights: list[LinearWeight], data: Any) -> dict[str, Tensor]:
        """x̄ per weight: mean input over the metric's states (or `data`) at the final θ
        (zero for a weight the forward pass never runs)."""
        if data is None:
            run = lambda: self.metric(self.copy)  # noqa: E731
        elif isinstance(data, tuple | list):
            run = lambda: self.copy(*(_float64(x) for x in data))  # noqa: E731
        else:
            run = lambda: self.copy(_float64(data))  # noqa: E731
        means = input_means(self.copy, [w.module for w in weights], run)
        zeros = lambda w: torch.zeros(w.d_in, dtype=DTYPE, device=self.device)  # noqa: E731
        return {w.module: means[w.module].to(DTYPE) if w.module in means else zeros(w) for w in weights}

    def _pathways(
        self, w: LinearWeight, theta_s: dict, theta_e: dict, x_mean: Tensor, centred: bool
    ) -> list[Pathway]:
        block = self._blocks[w.param]
        feats = [self.features[n] for n in block.names]
        d = block.directions.to(self.device, DTYPE)  # [F, in]: unit (stream features: their images)
        dual = block.dual().to(self.device, DTYPE)  # E [in, F]
        proj = dual @ d  # P [in, in], symmetric
        dev = {"device": self.device, "dtype": DTYPE}
        delta = w.matrix(theta_e[w.param].to(**dev) - theta_s[w.param].to(**dev))  # ΔW [out, in]
        reads = delta @ d.T  # [out, F]: column j is ΔW d_j
        as_param = (lambda m: m.T.contiguous()) if w.transposed else (lambda m: m)
        comp = self._compensation_key(w)
        site, arrow = feats[0].site, L.ARROW

        def revert(part: Tensor | None, shift: Tensor | None) -> dict[str, Tensor]:
            out = {} if part is None else {w.param: as_param(part)}
            if centred and shift is not None:
                out[comp] = shift
            return out

        out = []
        for j, f in enumerate(feats):
            part = torch.outer(reads[:, j], dual[:, j])  # ΔW_j [out, in]
            out.append(Pathway(
                f"{f.name}{arrow}{w.param}", f.name, f.site, w.param, concept(f), KIND_FEATURE,
                revert(part, -part @ x_mean),
            ))
        rest = delta - delta @ proj
        out.append(Pathway(
            f"{L.RESIDUAL}{arrow}{w.param}", L.RESIDUAL, site, w.param, "", L.RESIDUAL,
            revert(rest, -rest @ x_mean),
        ))
        if centred:
            out.append(Pathway(
                f"{L.MEAN}{arrow}{w.param}", L.MEAN, site, w.param, "", L.MEAN,
                {comp: delta @ x_mean},
            ))
        if w.bias is not None:
            db = theta_e[w.bias].to(**dev) - theta_s[w.bias].to(**dev)
            out.append(Pathway(
                f"{L.BIAS}{arrow}{w.bias}", L.BIAS, site, w.bias, "", L.BIAS, {w.bias: db}
            ))
        return out

    def _compensation_key(self, w: LinearWeight) -> str:
        if w.bias is not None:
            return w.bias
        module = module_at(self.copy, w.module)
        if isinstance(getattr(module, "bias", None), nn.Parameter):
            return f"{w.module}.bias" if w.module else "bias"
        return OFFSET + w.module

    def _prepare(self, batch_bytes: int) -> None:
        own = dict(self.copy.named_parameters())
        keys = list(dict.fromkeys(k for p in self.players for k in p.revert))
        self.base: dict[str, Tensor] = {}
        self.stacked: dict[str, Tensor] = {}  # [P, *shape]
        for k in keys:
            if k.startswith(OFFSET):
                shape = next(p.revert[k] for p in self.players if k in p.revert).shape
                self.base[k] = torch.zeros(shape, dtype=DTYPE, device=self.device)
            else:
                self.base[k] = own[k].detach()
            self.stacked[k] = torch.stack(
                [p.revert.get(k, torch.zeros_like(self.base[k])) for p in self.players]
            )
        per = sum(v.numel() for v in self.base.values()) * 8 * 3
        # small batches measured as fast as large ones on CPU (a tiny MLP: cache-bound)
        self.chunk = int(min(32, max(1, batch_bytes // max(per, 1))))

    def restrict(self, kinds: Iterable[str]) -> None:
        """Keep only the players of these kinds; the others stay at their final values."""
        kinds = set(kinds)
        self.players = [p for p in self.players if p.kind in kinds]
        if not self.players:
            raise ValidationError(f"{self.what}: no pathway of kinds {sorted(kinds)}.")
        self._prepare(self._batch_bytes)

    # -- evaluation --------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.players)

    def params_at(self, masks: Tensor) -> dict[str, Tensor]:
        """θ_final − masks @ R for the touched tensors: {key: [B, *shape]}; masks [B, P]."""
        masks = masks.to(self.device, DTYPE)
        return {k: self.base[k] - torch.tensordot(masks, self.stacked[k], dims=1) for k in self.base}

    def values(self, masks: Tensor) -> Tensor:
        """The metric for each row of `masks` [B, P] (1 = reverted): [B], float64, on the CPU."""
        masks = torch.as_tensor(masks, dtype=DTYPE)
        parts = []
        with self._offset_hooks(), torch.no_grad():
            for start in range(0, len(masks), self.chunk):
                chunk = masks[start : start + self.chunk]
                parts.append(self._run(self.params_at(chunk)))
                self.evaluations += len(chunk)
        out = torch.cat(parts).cpu() if parts else torch.zeros(0, dtype=DTYPE)
        if not torch.isfinite(out).all():
            raise ValidationError(
                f"{self.what}: the metric {_describe(self.metric)} is not finite with some "
                "pathways reverted (check for log(0) or a division by zero)."
            )
        return out

    def _one(self, batched: dict[str, Tensor]) -> Tensor:
        self._offsets = {k[len(OFFSET):]: v for k, v in batched.items() if k.startswith(OFFSET)}
        params = {f"model.{k}": v for k, v in batched.items() if not k.startswith(OFFSET)}
        out = functional_call(self._call, params, ())
        if not isinstance(out, Tensor) or out.numel() != 1:
            raise ValidationError(
                f"{self.what}: the metric {_describe(self.metric)} must return a scalar tensor."
            )
        return out.reshape(()).to(DTYPE)

    def _run(self, batched: dict[str, Tensor]) -> Tensor:
        if self.use_vmap:
            try:
                return vmap(self._one)(batched)
            except ValidationError:
                raise
            except Exception as err:  # an op vmap cannot trace (.item(), data-dependent flow…)
                warnings.warn(
                    f"chisel: evaluating the metric with torch.func.vmap failed ({err!r:.200}); "
                    "falling back to one evaluation per coalition (slower, same result).",
                    stacklevel=4,
                )
                self.use_vmap = False
        n = len(next(iter(batched.values())))
        return torch.stack([self._one({k: v[i] for k, v in batched.items()}) for i in range(n)])

    @contextlib.contextmanager
    def _offset_hooks(self):
        handles = []
        try:
            for key in self.base:
                if key.startswith(OFFSET):
                    name = key[len(OFFSET):]

                    def hook(mod: nn.Module, args: tuple, out: Tensor, name: str = name) -> Tensor:
                        return out + self._offsets[name]

                    handles.append(module_at(self.copy, name).register_forward_hook(hook))
            yield
        finally:
            for h in handles:
                h.remove()
            self._offsets = {}


def _private_copy(run: Run, model: nn.Module) -> nn.Module:
    """A float64, eval-mode deep copy holding the run's final θ; the user's model is not touched."""
    shapes = {p["name"]: tuple(p["shape"]) for p in run.manifest["params"]}
    have = {n: tuple(p.shape) for n, p in model.named_parameters()}
    wrong = [f"{n}: run {s}, model {have.get(n, 'missing')}" for n, s in shapes.items() if have.get(n) != s]
    if wrong:
        raise ValidationError(
            f"the model does not match the run's parameters ({'; '.join(wrong[:4])}). Pass a model "
            "of the architecture that was trained; its parameter values do not matter."
        )
    copied = private_copy(model).to(DTYPE).eval()
    final = run.params(len(run))
    with torch.no_grad():
        for name, p in copied.named_parameters():
            p.requires_grad_(False)
            if name in final:
                p.copy_(final[name].to(DTYPE))
    return copied


@contextlib.contextmanager
def _explain_dtype(what: str, metric: Metric):
    try:
        yield
    except RuntimeError as err:
        if "dtype" not in str(err) and "scalar type" not in str(err):
            raise
        raise ValidationError(
            f"{what}: the metric {_describe(metric)} failed on the model in float64: {err}. "
            "Interventions run a float64 copy of the model; move the metric's data to the "
            "model's dtype with chisel.metrics.as_input(x, model)."
        ) from err


def _float64(x: Any) -> Any:
    return x.to(DTYPE) if isinstance(x, Tensor) and x.is_floating_point() else x


def _describe(metric: Metric) -> str:
    return getattr(metric, "description", None) or getattr(metric, "__name__", None) or repr(metric)
