"""Sparse autoencoders as feature dictionaries: SAELens' on-disk format or plain matrices.

SAELens saves a directory with ``cfg.json`` and ``sae_weights.safetensors`` holding ``W_enc``
``[d_in, d_sae]``, ``b_enc`` ``[d_sae]``, ``W_dec`` ``[d_sae, d_in]``, ``b_dec`` ``[d_in]``
(and ``threshold`` ``[d_sae]`` for JumpReLU). The hook name is ``cfg["metadata"]["hook_name"]``
(SAELens 6; also ``cfg["meta"]``), or ``cfg["hook_name"]`` / ``cfg["hook_point"]`` in older
releases. The files are read directly: ``sae-lens`` itself need not be installed.

Encoding follows SAELens: ``pre = (x - b_dec * apply_b_dec_to_input) @ W_enc + b_enc``, then
``relu(pre)`` (standard), ``relu(pre) * (pre > threshold)`` (jumprelu) or the top ``k`` of
``pre`` through relu (topk).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file
from torch import Tensor

from probes.errors import FeatureFileError, ProbesError
from probes.features import Feature, FeatureSet

Architecture = Literal["standard", "jumprelu", "topk"]
SAE_CFG_FILE = "cfg.json"
SAE_WEIGHTS_FILE = "sae_weights.safetensors"
_UNSUPPORTED_NORMS = ("expected_average_only_in", "constant_norm_rescale", "layer_norm")


@dataclass(frozen=True, eq=False)
class SAE:
    """An SAE dictionary. Build it with :func:`load_sae` or :meth:`SAE.from_matrices`.

    Attributes:
        W_enc: ``[d_in, d_sae]``; b_enc: ``[d_sae]``; W_dec: ``[d_sae, d_in]``; b_dec: ``[d_in]``.
        site: the site whose activations it reads (needed for :meth:`features`).
        architecture: ``"standard"``, ``"jumprelu"`` (needs ``threshold [d_sae]``) or
            ``"topk"`` (needs ``k``).
        apply_b_dec_to_input: subtract ``b_dec`` before encoding (SAELens default True).
        name: prefix of the feature names (``"{name}/{latent}"``).
    """

    W_enc: Tensor
    b_enc: Tensor
    W_dec: Tensor
    b_dec: Tensor
    site: str | None = None
    architecture: Architecture = "standard"
    threshold: Tensor | None = None
    k: int | None = None
    apply_b_dec_to_input: bool = True
    name: str = "sae"

    def __post_init__(self) -> None:
        d_in, d_sae = self.W_enc.shape if self.W_enc.ndim == 2 else (-1, -1)
        expected = {
            "W_enc": (d_in, d_sae),
            "b_enc": (d_sae,),
            "W_dec": (d_sae, d_in),
            "b_dec": (d_in,),
        }
        if self.threshold is not None:
            expected["threshold"] = (d_sae,)
        for key, shape in expected.items():
            got = tuple(getattr(self, key).shape)
            if got != shape or self.W_enc.ndim != 2:
                hint = " (it looks transposed)" if got == shape[::-1] else ""
                raise ProbesError(
                    f"SAE {key} has shape {got}, expected {shape}{hint}; SAELens layout is "
                    "W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in]."
                )
        if self.architecture not in ("standard", "jumprelu", "topk"):
            raise ProbesError(
                f"SAE architecture {self.architecture!r} is not supported; "
                "use 'standard', 'jumprelu' or 'topk'"
            )
        if self.architecture == "jumprelu" and self.threshold is None:
            raise ProbesError("a jumprelu SAE needs threshold [d_sae]")
        if self.architecture == "topk" and not (isinstance(self.k, int) and 0 < self.k <= d_sae):
            raise ProbesError(f"a topk SAE needs an integer k in [1, {d_sae}], got {self.k!r}")

    @classmethod
    def from_matrices(
        cls,
        W_dec: Tensor,
        W_enc: Tensor | None = None,
        b_enc: Tensor | None = None,
        b_dec: Tensor | None = None,
        **kwargs: Any,
    ) -> SAE:
        """An SAE from plain matrices: ``W_dec [d_sae, d_in]``; the encoder defaults to
        ``W_dec.T`` and the biases to zero. ``kwargs`` go to :class:`SAE`."""
        W_dec = torch.as_tensor(W_dec).detach()
        if W_dec.ndim != 2:
            raise ProbesError(f"W_dec must be [d_sae, d_in], got shape {tuple(W_dec.shape)}")
        W_enc = W_dec.T.clone() if W_enc is None else torch.as_tensor(W_enc).detach()
        d_in, d_sae = W_enc.shape if W_enc.ndim == 2 else W_dec.T.shape
        return cls(
            W_enc=W_enc,
            b_enc=W_dec.new_zeros(d_sae) if b_enc is None else torch.as_tensor(b_enc).detach(),
            W_dec=W_dec,
            b_dec=W_dec.new_zeros(d_in) if b_dec is None else torch.as_tensor(b_dec).detach(),
            **kwargs,
        )

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    def pre_activations(self, x: Tensor) -> Tensor:
        """``[..., d_in] -> [..., d_sae]`` before the nonlinearity."""
        x = x.to(self.W_enc.dtype)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def encode(self, x: Tensor) -> Tensor:
        """Codes of activations: ``[..., d_in] -> [..., d_sae]``."""
        pre = self.pre_activations(x)
        if self.architecture == "jumprelu":
            return torch.relu(pre) * (pre > self.threshold)
        if self.architecture == "topk":
            top = pre.topk(self.k, dim=-1)
            return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
        return torch.relu(pre)

    def decode(self, codes: Tensor) -> Tensor:
        """Reconstruction: ``[..., d_sae] -> [..., d_in]``."""
        return codes.to(self.W_dec.dtype) @ self.W_dec + self.b_dec

    def features(
        self, latents: list[int] | None = None, *, prefix: str | None = None
    ) -> FeatureSet:
        """Latents as features ``"{prefix}/{i}"`` at :attr:`site`.

        ``read`` is the unit encoder column, ``write`` the unit decoder row, and ``bias`` is
        such that ``score(x) * metadata["encoder_norm"]`` equals the latent's pre-activation.
        Dead latents with a zero column keep a zero vector.
        """
        if self.site is None:
            raise ProbesError(
                "this SAE has no site: pass site='blocks.0.hook_resid_post' (for example) to "
                "load_sae or SAE.from_matrices."
            )
        idx = list(range(self.d_sae)) if latents is None else [int(i) for i in latents]
        enc_norm = self.W_enc.norm(dim=0)
        dec_norm = self.W_dec.norm(dim=1)
        offset = self.b_dec @ self.W_enc if self.apply_b_dec_to_input else 0 * self.b_enc
        feats = []
        for i in idx:
            en, dn = enc_norm[i].item(), dec_norm[i].item()
            meta = {
                "sae": self.name,
                "latent": i,
                "architecture": self.architecture,
                "encoder_norm": en,
                "decoder_norm": dn,
            }
            if self.threshold is not None:
                meta["threshold"] = self.threshold[i].item()
            feats.append(
                Feature(
                    name=f"{prefix or self.name}/{i}",
                    site=self.site,
                    read=self.W_enc[:, i] / (en or 1.0),
                    write=self.W_dec[i] / (dn or 1.0),
                    bias=(self.b_enc[i] - offset[i]).item() / (en or 1.0),
                    source="sae",
                    metadata=meta,
                )
            )
        return FeatureSet(feats)


def load_sae(path: str | Path, *, site: str | None = None, name: str | None = None) -> SAE:
    """Read an SAE from disk.

    ``path`` is a SAELens directory (``cfg.json`` + ``sae_weights.safetensors``; the site
    defaults to the cfg's hook name) or a ``.safetensors`` file of plain matrices (``W_dec``
    required; ``W_enc``, ``b_enc``, ``b_dec`` optional; pass ``site``).
    """
    path = Path(path)
    if path.is_file():
        tensors = _load_weights(path)
        if "W_dec" not in tensors:
            raise FeatureFileError(f"{path} has no 'W_dec' tensor; found {sorted(tensors)}")
        parts = {k: tensors.get(k) for k in ("W_enc", "b_enc", "b_dec")}
        return SAE.from_matrices(tensors["W_dec"], **parts, site=site, name=name or path.stem)
    cfg = _load_cfg(path / SAE_CFG_FILE)
    tensors = _load_weights(path / SAE_WEIGHTS_FILE)
    missing = [k for k in ("W_enc", "b_enc", "W_dec", "b_dec") if k not in tensors]
    arch = _architecture(cfg)
    if arch == "jumprelu" and "threshold" not in tensors:
        missing.append("threshold")
    if missing:
        raise FeatureFileError(f"{path / SAE_WEIGHTS_FILE} lacks tensors {missing}")
    for key, dim in (("d_in", 0), ("d_sae", 1)):
        if key in cfg and cfg[key] != tensors["W_enc"].shape[dim]:
            raise FeatureFileError(
                f"{path}: cfg.json says {key} = {cfg[key]} but W_enc has shape "
                f"{tuple(tensors['W_enc'].shape)}: the files do not belong together."
            )
    try:
        return SAE(
            W_enc=tensors["W_enc"],
            b_enc=tensors["b_enc"],
            W_dec=tensors["W_dec"],
            b_dec=tensors["b_dec"],
            site=site or _hook_name(cfg),
            architecture=arch,
            threshold=tensors.get("threshold") if arch == "jumprelu" else None,
            k=_topk(cfg) if arch == "topk" else None,
            apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
            name=name or "sae",
        )
    except ProbesError as err:
        raise FeatureFileError(f"{path}: {err}") from None


def _load_cfg(file: Path) -> dict[str, Any]:
    try:
        cfg = json.loads(file.read_text())
    except FileNotFoundError:
        raise FeatureFileError(
            f"{file} not found: a SAELens SAE is a directory with {SAE_CFG_FILE} and "
            f"{SAE_WEIGHTS_FILE}; for plain matrices pass the .safetensors file."
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise FeatureFileError(f"{file} is not valid JSON: {err}") from None
    if not isinstance(cfg, dict):
        raise FeatureFileError(f"{file} must hold a JSON object")
    norm = cfg.get("normalize_activations") or "none"
    if norm in _UNSUPPORTED_NORMS:
        raise FeatureFileError(
            f"{file}: normalize_activations={norm!r} is not supported; fold the scaling into "
            "the weights (SAELens fold_activation_norm_scaling_factor) and save again."
        )
    if (cfg.get("reshape_activations") or "none") != "none" or _meta(cfg, "hook_head_index"):
        raise FeatureFileError(f"{file}: hook_z / per-head SAEs are not supported yet")
    return cfg


def _load_weights(file: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(file))
    except FileNotFoundError:
        raise FeatureFileError(f"{file} not found") from None
    except Exception as err:  # safetensors raises several types on a damaged header
        raise FeatureFileError(f"{file} is not a readable safetensors file: {err}") from None


def _meta(cfg: dict[str, Any], key: str) -> Any:
    for block in ("metadata", "meta"):
        if isinstance(cfg.get(block), dict) and cfg[block].get(key) is not None:
            return cfg[block][key]
    return cfg.get(key)


def _hook_name(cfg: dict[str, Any]) -> str | None:
    return _meta(cfg, "hook_name") or cfg.get("hook_point")


def _architecture(cfg: dict[str, Any]) -> Architecture:
    arch = cfg.get("architecture") or cfg.get("activation_fn_str") or "standard"
    arch = {"relu": "standard", "jumprelu": "jumprelu", "topk": "topk"}.get(arch, arch)
    if arch not in ("standard", "jumprelu", "topk"):
        raise FeatureFileError(
            f"SAE architecture {arch!r} is not supported (standard, jumprelu, topk are)"
        )
    return arch


def _topk(cfg: dict[str, Any]) -> int | None:
    kwargs = cfg.get("activation_fn_kwargs") or {}
    k = cfg.get("k", kwargs.get("k"))
    return int(k) if k is not None else None
