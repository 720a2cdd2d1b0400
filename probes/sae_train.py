"""Train a small standard (ReLU) sparse autoencoder on activations, in-process, on CPU.

The SAE follows SAELens' standard architecture (``apply_b_dec_to_input``):
``f = relu((x - b_dec) @ W_enc + b_enc)``, ``x̂ = f @ W_dec + b_dec``. Training runs on the
activations centred by their mean and scaled to unit mean squared norm, so the reconstruction
term is the fraction of variance left unexplained and one ``l1`` works at any site; the scale is
folded back at the end, so the returned SAE reads raw activations and its codes are in the
activation's own units (decoder rows have unit norm).

Loss per minibatch: ``mean_n |x_n - x̂_n|² + l1 * mean_n Σ_i f_ni`` (normalised units), Adam,
decoder rows kept at unit norm (the gradient's radial part is removed before each step and the
rows are renormalised after it). The encoder starts tied to the decoder (``W_enc = W_decᵀ``),
the decoder bias at the data mean. Latents silent over a stretch of training are re-initialised
towards the worst-reconstructed states (up to ``resample_until``); a latent still never active on
the data at the end is reported in :attr:`SAEStats.dead`. Everything random draws from one
``torch.Generator`` seeded with ``seed``: same data, seed and thread count, same SAE.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from probes.errors import ProbeFitError, ProbesError
from probes.features import FeatureSet
from probes.sae import SAE

_RESAMPLE_EVERY = 250  # steps between dead-latent checks
_RESAMPLE_UNTIL = 0.5  # fraction of the steps after which latents are left alone
_ENCODE_CHUNK = 16384


@dataclass(frozen=True)
class SAEStats:
    """How a trained SAE fits the activations it was trained on (all of them, after training).

    Attributes:
        variance_explained: ``1 - Σ_n |x_n - x̂_n|² / Σ_n |x_n - x̄|²``.
        l0: mean number of active latents (code > 0) per state.
        frequency: per latent, the fraction of states where it is active ``[d_sae]``.
        dead: latents never active on the data (frequency 0).
        n_states: rows of the training activations.
        steps, batch_size, l1, lr, seed: the training settings.
        resampled: how many times a silent latent was re-initialised during training.
    """

    variance_explained: float
    l0: float
    frequency: tuple[float, ...]
    dead: tuple[int, ...]
    n_states: int
    steps: int
    batch_size: int
    l1: float
    lr: float
    seed: int
    resampled: int

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["frequency"], out["dead"] = list(self.frequency), list(self.dead)
        return out


@dataclass(frozen=True, eq=False)
class TrainedSAE(SAE):
    """An :class:`SAE` from :func:`train_sae`, with its fit in :attr:`stats`.

    :meth:`features` adds to each latent's metadata its ``frequency`` on the training data and
    the SAE's ``variance_explained``, ``l0`` and ``dead_latents`` (indices).
    """

    stats: SAEStats = field(kw_only=True)

    def features(
        self, latents: list[int] | None = None, *, prefix: str | None = None
    ) -> FeatureSet:
        feats = super().features(latents, prefix=prefix)
        s = self.stats
        return FeatureSet(
            dataclasses.replace(
                f,
                metadata={
                    **f.metadata,
                    "frequency": s.frequency[f.metadata["latent"]],
                    "variance_explained": s.variance_explained,
                    "l0": s.l0,
                    "dead_latents": list(s.dead),
                },
            )
            for f in feats
        )


def train_sae(
    acts: Tensor,
    n_latents: int,
    *,
    site: str,
    name: str = "sae",
    l1: float = 0.1,
    steps: int = 2000,
    lr: float = 3e-3,
    seed: int = 0,
    batch_size: int = 256,
) -> TrainedSAE:
    """Train a standard ReLU SAE with ``n_latents`` latents on ``acts``.

    Args:
        acts: ``[n, d]`` activations of one site (e.g. ``probes.capture(...)[site]``); float,
            finite, not all equal. Trained in float32.
        n_latents: dictionary size ``d_sae >= 1``.
        site, name: the site the SAE reads and the prefix of its features (see :class:`SAE`).
        l1: sparsity coefficient on the codes, in the normalised units described in the
            module docstring (larger: fewer active latents, worse reconstruction).
        steps: Adam steps, each on ``batch_size`` rows drawn with replacement.
        lr: Adam learning rate.
        seed: seeds the initialisation, the minibatches and the resampling.

    Returns:
        A :class:`TrainedSAE` (an :class:`SAE`, ``architecture="standard"``) whose
        :attr:`~TrainedSAE.stats` hold the variance explained, L0, latent frequencies and
        dead latents on ``acts``. ``sae.features()`` gives one feature per latent: ``read``
        the unit encoder column, ``write`` the decoder row.

    Raises:
        ProbeFitError: ``acts`` is not ``[n, d]`` float, holds NaN/inf, or is constant.
        ProbesError: a setting is out of range.
    """
    x = _validate(acts)
    _check_settings(n_latents, l1, steps, lr, batch_size)
    mu = x.mean(0)  # [d]
    scale = (x - mu).pow(2).sum(1).mean().sqrt().item()
    if not scale > 0:
        raise ProbeFitError(
            "acts are the same in every row: there is no variation for an SAE to explain"
        )
    gen = torch.Generator().manual_seed(seed)
    params, resampled = _fit((x - mu) / scale, n_latents, l1, steps, lr, batch_size, gen)
    w_enc, b_enc, w_dec, b_dec = (p.detach() for p in params)
    # fold the normalisation back: codes in raw units, decoder rows still unit norm
    sae = SAE(
        W_enc=w_enc.clone(),
        b_enc=b_enc * scale,
        W_dec=w_dec.clone(),
        b_dec=mu + b_dec * scale,
        site=site,
        architecture="standard",
        apply_b_dec_to_input=True,
        name=name,
    )
    stats = _stats(sae, x, seed, steps, batch_size, l1, lr, resampled)
    fields = {f.name: getattr(sae, f.name) for f in dataclasses.fields(SAE)}
    return TrainedSAE(**fields, stats=stats)


def _validate(acts: Any) -> Tensor:
    x = torch.as_tensor(acts).detach()
    if x.ndim != 2 or not x.is_floating_point():
        raise ProbeFitError(
            f"acts must be a float tensor [n, d], got shape {tuple(x.shape)} {x.dtype}. For "
            "sequence sites pick positions in capture(positions=...) or flatten to [n*pos, d]."
        )
    if x.shape[0] < 2 or x.shape[1] < 1:
        raise ProbeFitError(f"acts need at least 2 rows and 1 column, got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ProbeFitError("acts contain NaN or inf; drop those rows first")
    return x.cpu().float()


def _check_settings(n_latents: int, l1: float, steps: int, lr: float, batch_size: int) -> None:
    for key, value in (("n_latents", n_latents), ("steps", steps), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ProbesError(f"train_sae: {key} must be an integer >= 1, got {value!r}")
    if not (math.isfinite(l1) and l1 >= 0):
        raise ProbesError(f"train_sae: l1 must be finite and >= 0, got {l1!r}")
    if not (math.isfinite(lr) and lr > 0):
        raise ProbesError(f"train_sae: lr must be finite and > 0, got {lr!r}")


def _fit(
    x: Tensor,  # [n, d] centred, unit mean squared norm
    n_latents: int,
    l1: float,
    steps: int,
    lr: float,
    batch_size: int,
    gen: Tensor | torch.Generator,
) -> tuple[list[Tensor], int]:
    n, d = x.shape
    w_dec = _unit_rows(torch.randn(n_latents, d, generator=gen))  # [d_sae, d]
    params = [
        w_dec.T.clone().requires_grad_(),  # W_enc [d, d_sae]
        torch.zeros(n_latents, requires_grad=True),  # b_enc [d_sae]
        w_dec.requires_grad_(),  # W_dec [d_sae, d]
        torch.zeros(d, requires_grad=True),  # b_dec [d] (data is centred)
    ]
    w_enc, b_enc, w_dec, b_dec = params
    opt = torch.optim.Adam(params, lr=lr, foreach=True)
    fired = torch.zeros(n_latents, dtype=torch.bool)
    resampled = 0
    rows = torch.randint(n, (steps, batch_size), generator=gen)  # [steps, B]
    for step in range(steps):
        batch = x[rows[step]]  # [B, d]
        codes = torch.relu((batch - b_dec) @ w_enc + b_enc)  # [B, d_sae]
        recon = codes @ w_dec + b_dec
        loss = (recon - batch).pow(2).sum(1).mean() + l1 * codes.sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            # keep decoder rows on the unit sphere: drop the radial part of their gradient
            w_dec.grad -= (w_dec.grad * w_dec).sum(1, keepdim=True) * w_dec
            opt.step()
            w_dec.copy_(_unit_rows(w_dec))
            fired |= (codes > 0).any(0)
            if (step + 1) % _RESAMPLE_EVERY == 0:
                if step + 1 <= _RESAMPLE_UNTIL * steps and not fired.all():
                    resampled += _resample(x, params, opt, ~fired, gen)
                fired.zero_()
    return params, resampled


def _resample(
    x: Tensor, params: list[Tensor], opt: torch.optim.Adam, silent: Tensor, gen: torch.Generator
) -> int:
    """Point silent latents at states drawn in proportion to their squared reconstruction error
    (the usual dead-neuron resampling); their Adam moments restart from zero."""
    w_enc, b_enc, w_dec, b_dec = params
    idx = silent.nonzero().squeeze(1)  # [k]
    err = (_reconstruct(x, params) - x).pow(2).sum(1)  # [n]
    if not err.sum() > 0:
        return 0
    rows = torch.multinomial(err, len(idx), replacement=False, generator=gen)
    direction = _unit_rows(x[rows] - b_dec)  # [k, d]
    alive = w_enc[:, ~silent]
    enc_norm = alive.norm(dim=0).mean().item() if alive.numel() else 1.0
    w_dec[idx] = direction
    w_enc[:, idx] = direction.T * (0.2 * enc_norm)
    b_enc[idx] = 0.0
    for p, dim in ((w_dec, 0), (w_enc, 1), (b_enc, 0)):
        for moment in opt.state[p].values():
            if torch.is_tensor(moment) and moment.shape == p.shape:
                moment.index_fill_(dim, idx, 0.0)
    return len(idx)


def _reconstruct(x: Tensor, params: list[Tensor]) -> Tensor:
    w_enc, b_enc, w_dec, b_dec = params
    return torch.relu((x - b_dec) @ w_enc + b_enc) @ w_dec + b_dec


def _unit_rows(w: Tensor) -> Tensor:
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def _stats(
    sae: SAE, x: Tensor, seed: int, steps: int, batch_size: int, l1: float, lr: float, res: int
) -> SAEStats:
    sse, active, count = 0.0, torch.zeros(sae.d_sae, dtype=torch.float64), 0.0
    for chunk in x.split(_ENCODE_CHUNK):
        codes = sae.encode(chunk)  # [c, d_sae]
        sse += (sae.decode(codes) - chunk).double().pow(2).sum().item()
        on = codes > 0
        active += on.double().sum(0)
        count += on.double().sum().item()
    sst = (x.double() - x.double().mean(0)).pow(2).sum().item()
    frequency = (active / len(x)).tolist()
    return SAEStats(
        variance_explained=1.0 - sse / sst,
        l0=count / len(x),
        frequency=tuple(frequency),
        dead=tuple(i for i, f in enumerate(frequency) if f == 0),
        n_states=len(x),
        steps=steps,
        batch_size=batch_size,
        l1=l1,
        lr=lr,
        seed=seed,
        resampled=res,
    )
