"""Features (named directions at sites) and ordered FeatureSets."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, overload

import torch
from torch import Tensor, nn

from probes.errors import FeatureDimensionError, FeatureFileError, ProbesError
from probes.files import JSON_FILE, TENSOR_FILE, read_feature_dir, write_feature_dir

Source = Literal["probe", "sae", "neuron", "pca", "custom"]
SOURCES: tuple[str, ...] = get_args(Source)


@dataclass(frozen=True, eq=False)
class Feature:
    """A named direction at a site.

    Attributes:
        name: unique within a FeatureSet.
        site: the site string, e.g. ``"torso.2:out"`` or ``"blocks.0.hook_resid_post"``.
        read: ``[d]`` direction read from the activation (probe weights, SAE encoder column).
            Built-in sources store it unit-norm; ``score`` is then a signed distance.
        write: optional ``[d]`` direction the feature writes (SAE decoder row).
        bias: added to ``acts @ read`` by :meth:`score`.
        source: one of ``"probe", "sae", "neuron", "pca", "custom"``.
        metadata: JSON-serialisable facts (concept, held-out accuracy, ...).
    """

    name: str
    site: str
    read: Tensor
    write: Tensor | None = None
    bias: float = 0.0
    source: Source = "custom"
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ProbesError(f"a feature name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.site, str) or not self.site:
            raise ProbesError(f"feature {self.name!r}: site must be a non-empty string")
        if self.source not in SOURCES:
            raise ProbesError(
                f"feature {self.name!r}: source must be one of {SOURCES}, got {self.source!r}"
            )
        object.__setattr__(self, "read", _vector(self.name, "read", self.read))
        if self.write is not None:
            write = _vector(self.name, "write", self.write)
            if write.shape != self.read.shape:
                raise FeatureDimensionError(
                    f"feature {self.name!r}: write has dimension {write.shape[0]} but read has "
                    f"{self.read.shape[0]}; both live at the same site and must match."
                )
            object.__setattr__(self, "write", write)
        bias = float(self.bias)
        if not math.isfinite(bias):
            raise ProbesError(f"feature {self.name!r}: bias must be finite, got {bias}")
        object.__setattr__(self, "bias", bias)
        metadata = dict(self.metadata)
        try:
            json.dumps(metadata)
        except (TypeError, ValueError) as err:
            raise ProbesError(
                f"feature {self.name!r}: metadata must be JSON-serialisable (numbers, strings, "
                f"lists, dicts); convert tensors with .tolist(). ({err})"
            ) from None
        object.__setattr__(self, "metadata", metadata)

    @property
    def dim(self) -> int:
        """Dimension ``d`` of the site this feature lives at."""
        return self.read.shape[0]

    def score(self, acts: Tensor) -> Tensor:
        """``acts @ read + bias``: ``[..., d] -> [...]``."""
        return acts @ self.read.to(acts.dtype) + self.bias

    def __repr__(self) -> str:
        write = ", write" if self.write is not None else ""
        return f"Feature({self.name!r}, site={self.site!r}, d={self.dim}, {self.source}{write})"


def _vector(name: str, what: str, value: Any) -> Tensor:
    vec = torch.as_tensor(value).detach().clone()
    if vec.ndim != 1 or vec.numel() == 0 or not vec.is_floating_point():
        raise ProbesError(
            f"feature {name!r}: {what} must be a non-empty 1-D float tensor [d], got "
            f"shape {tuple(vec.shape)} and dtype {vec.dtype}"
        )
    if not torch.isfinite(vec).all():
        raise ProbesError(f"feature {name!r}: {what} contains NaN or inf")
    return vec


class FeatureSet:
    """An ordered collection of features with unique names.

    ``FeatureSet([f1, f2])``; nested FeatureSets are flattened. Index by position or name,
    select by site with :meth:`at`, save with :meth:`save` and reload with :meth:`load`.
    """

    def __init__(self, features: Iterable[Feature | FeatureSet] = ()) -> None:
        flat: list[Feature] = []
        for item in features:
            if isinstance(item, FeatureSet):
                flat.extend(item)
            elif isinstance(item, Feature):
                flat.append(item)
            else:
                raise TypeError(f"FeatureSet holds Feature objects, got {type(item).__name__}")
        index: dict[str, int] = {}
        for i, feat in enumerate(flat):
            if feat.name in index:
                raise ProbesError(
                    f"duplicate feature name {feat.name!r} (positions {index[feat.name]} and "
                    f"{i}); names must be unique: rename one of them."
                )
            index[feat.name] = i
        self._features: tuple[Feature, ...] = tuple(flat)
        self._index = index

    def __len__(self) -> int:
        return len(self._features)

    def __iter__(self) -> Iterator[Feature]:
        return iter(self._features)

    def __contains__(self, name: object) -> bool:
        return name in self._index

    @overload
    def __getitem__(self, key: int | str) -> Feature: ...
    @overload
    def __getitem__(self, key: slice) -> FeatureSet: ...
    def __getitem__(self, key: int | str | slice) -> Feature | FeatureSet:
        if isinstance(key, slice):
            return FeatureSet(self._features[key])
        if isinstance(key, str):
            if key not in self._index:
                raise KeyError(f"no feature named {key!r}; names: {self.names[:10]}")
            return self._features[self._index[key]]
        return self._features[key]

    def __add__(self, other: FeatureSet) -> FeatureSet:
        return FeatureSet([self, other])

    def __repr__(self) -> str:
        return f"FeatureSet({len(self)} features at sites {self.sites})"

    @property
    def names(self) -> list[str]:
        return [f.name for f in self._features]

    @property
    def sites(self) -> list[str]:
        """Sites used, in first-appearance order."""
        return list(dict.fromkeys(f.site for f in self._features))

    def at(self, site: str) -> FeatureSet:
        """The features at ``site``, in order."""
        return FeatureSet(f for f in self._features if f.site == site)

    def read_matrix(self, site: str) -> Tensor:
        """Read directions at ``site`` stacked: ``[k, d]``."""
        return self._stack(site, "read")

    def write_matrix(self, site: str) -> Tensor:
        """Write directions at ``site`` stacked: ``[k, d]`` (every feature needs one)."""
        return self._stack(site, "write")

    def _stack(self, site: str, attr: str) -> Tensor:
        feats = self.at(site)
        if not len(feats):
            raise ProbesError(f"no features at site {site!r}; sites: {self.sites}")
        missing = [f.name for f in feats if getattr(f, attr) is None]
        if missing:
            raise ProbesError(f"features {missing[:5]} at {site!r} have no {attr} direction")
        _check_same_dim(feats)
        return torch.stack([getattr(f, attr) for f in feats])

    def check(self, model: nn.Module, inputs: Any = None) -> None:
        """Check every feature's site exists in ``model`` and its dimension matches.

        Dimensions are read from the module when it fixes them (Linear, Embedding, LayerNorm);
        otherwise pass ``inputs`` (one example is enough) to run the model once.

        Raises:
            UnknownSiteError: a site is missing (closest names listed).
            FeatureDimensionError: a dimension differs (both sizes named).
        """
        from probes.check import check_features

        check_features(self, model, inputs)

    def save(self, path: str | Path) -> Path:
        """Save into directory ``path`` (``features.json`` + ``features.safetensors``, see
        `probes.files`); returns the path."""
        tensors = {}
        for i, feat in enumerate(self):
            tensors[f"read.{i}"] = feat.read.contiguous().cpu()
            if feat.write is not None:
                tensors[f"write.{i}"] = feat.write.contiguous().cpu()
        return write_feature_dir(path, [_entry(f) for f in self], tensors)

    @classmethod
    def load(cls, path: str | Path) -> FeatureSet:
        """Load a directory written by :meth:`save`, validating every field; no pickle involved."""
        path = Path(path)
        entries, tensors = read_feature_dir(path)
        features = [_feature_from_entry(path, i, e, tensors) for i, e in enumerate(entries)]
        expected = {f"read.{i}" for i in range(len(features))} | {
            f"write.{i}" for i, e in enumerate(entries) if e["has_write"]
        }
        if set(tensors) != expected:
            extra = sorted(set(tensors) - expected)
            raise FeatureFileError(f"{path / TENSOR_FILE} has tensors not listed in json: {extra}")
        try:
            return cls(features)
        except ValueError as err:
            raise FeatureFileError(f"{path / JSON_FILE}: {err}") from None


def _check_same_dim(feats: Iterable[Feature]) -> None:
    dims: dict[int, str] = {}
    for f in feats:
        dims.setdefault(f.dim, f.name)
    if len(dims) > 1:
        desc = ", ".join(f"{name!r} has {d}" for d, name in dims.items())
        raise FeatureDimensionError(f"features at one site disagree on dimension: {desc}")


# -- on disk -----------------------------------------------------------------------------------
_ENTRY_KEYS = {"name", "site", "source", "bias", "metadata", "dim", "dtype", "has_write"}


def _entry(feat: Feature) -> dict[str, Any]:
    """A feature's line in ``features.json`` (everything but its vectors)."""
    return {
        "name": feat.name,
        "site": feat.site,
        "source": feat.source,
        "bias": feat.bias,
        "metadata": feat.metadata,
        "dim": feat.dim,
        "dtype": str(feat.read.dtype).removeprefix("torch."),
        "has_write": feat.write is not None,
    }


def _feature_from_entry(path: Path, i: int, entry: Any, tensors: dict) -> Feature:
    where = f"{path / JSON_FILE}, feature #{i}"
    if not isinstance(entry, dict) or set(entry) != _ENTRY_KEYS:
        keys = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
        raise FeatureFileError(f"{where}: expected keys {sorted(_ENTRY_KEYS)}, found {keys}")
    bias = entry["bias"]
    if not isinstance(bias, (int, float)) or isinstance(bias, bool):
        raise FeatureFileError(f"{where}: bias {bias!r} is not a number")
    if entry["source"] not in SOURCES:
        raise FeatureFileError(f"{where}: source {entry['source']!r} is not one of {SOURCES}")
    read = tensors.get(f"read.{i}")
    write = tensors.get(f"write.{i}") if entry["has_write"] else None
    if read is None or (entry["has_write"] and write is None):
        raise FeatureFileError(f"{where}: its vectors are missing from {TENSOR_FILE}")
    for vec in (read, write):
        if vec is None:
            continue
        if tuple(vec.shape) != (entry["dim"],) or str(vec.dtype) != f"torch.{entry['dtype']}":
            raise FeatureFileError(
                f"{where} ({entry['name']!r}): json says dim {entry['dim']} {entry['dtype']}, "
                f"the tensor file has shape {tuple(vec.shape)} {vec.dtype}. The files disagree: "
                "undo the hand edit or save again."
            )
    if not bool(read.ne(0).any()):
        raise FeatureFileError(
            f"{where} ({entry['name']!r}): its read vector is all zeros, so it reads nothing; the "
            "file was damaged or the feature was saved before it was fitted. Save it again."
        )
    try:
        return Feature(
            name=entry["name"],
            site=entry["site"],
            read=read,
            write=write,
            bias=entry["bias"],
            source=entry["source"],
            metadata=entry["metadata"],
        )
    except (ValueError, TypeError) as err:
        raise FeatureFileError(f"{where}: {err}") from None
