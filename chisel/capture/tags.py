"""Values attached to the coming optimizer step by `Recorder.tag`."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from chisel.errors import TagError

TagValue = Any  # a scalar, or one value per sample (tensor, array, list)


def _as_array(name: str, value: TagValue) -> torch.Tensor | list[str] | float | int | bool:
    """A scalar (python number/bool), a 1-D CPU tensor, or a list of strings."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.ndim == 0:
            return value.item()
        value = (value.float() if value.dtype == torch.bfloat16 else value).numpy()
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, numbers.Number) and not isinstance(value, complex):
        return value.item() if isinstance(value, np.generic) else value  # type: ignore[union-attr]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return list(value)
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError) as err:
        raise TagError(f"tag {name!r}: cannot turn a {type(value).__name__} into an array.") from err
    if arr.dtype.kind not in "biuf" or arr.ndim == 0:
        if arr.ndim == 0 and arr.dtype.kind in "biuf":
            return arr.item()
        raise TagError(
            f"tag {name!r}: values of dtype {arr.dtype} are not supported; give numbers, booleans, "
            "a list of strings, or a scalar."
        )
    if arr.ndim > 1 and arr.shape[1:] != (1,) * (arr.ndim - 1):
        raise TagError(
            f"tag {name!r} has shape {arr.shape}; give one value per sample (a 1-D array)."
        )
    return torch.from_numpy(arr.reshape(-1).copy())  # a copy: the caller may reuse its buffer


@dataclass
class TagBuffer:
    """Collects one step's tags; several calls for one name (micro-batches) concatenate."""

    values: dict[str, Any] = field(default_factory=dict)
    batch_sizes: list[int] = field(default_factory=list)
    token_counts: list[int] = field(default_factory=list)

    def saw_batch(self, size: int, tokens: int | None) -> None:
        self.batch_sizes.append(size)
        if tokens is not None:
            self.token_counts.append(tokens)

    def add(self, **values: TagValue) -> None:
        merged = dict(self.values)
        for name, value in values.items():
            if not name.isidentifier():
                raise TagError(f"tag name {name!r} must be an identifier, like 'advantage'.")
            arr = _as_array(name, value)
            old = merged.get(name)
            if old is None or not isinstance(arr, (torch.Tensor, list)):
                merged[name] = arr
            elif isinstance(old, torch.Tensor) and isinstance(arr, torch.Tensor):
                merged[name] = torch.cat([old, arr.to(old.dtype)])
            elif isinstance(old, list) and isinstance(arr, list):
                merged[name] = old + arr
            else:
                raise TagError(f"tag {name!r} was given a scalar and per-sample values in one step.")
        self.check(merged)  # nothing is kept from a call that fails
        self.values = merged

    def _valid_lengths(self) -> set[int]:
        sizes = set(self.batch_sizes) | set(self.token_counts)
        if self.batch_sizes:
            sizes.add(sum(self.batch_sizes))
        if self.token_counts:
            sizes.add(sum(self.token_counts))
        return sizes

    def check(self, values: dict[str, Any] | None = None) -> None:
        """Raise TagError if a per-sample tag's length matches no batch of this step."""
        if not self.batch_sizes:
            return  # no forward pass seen yet (or the model is called around the hook)
        valid = self._valid_lengths()
        for name, value in (self.values if values is None else values).items():
            if isinstance(value, (torch.Tensor, list)) and len(value) not in valid:
                raise TagError(
                    f"tag {name!r} has {len(value)} values, but this step's forward passes had "
                    f"batch sizes {self.batch_sizes} (total {sum(self.batch_sizes)}). Give one "
                    "value per sample of a batch, or a scalar."
                )

    def take(self) -> dict[str, Any]:
        out = self.values
        self.values = {}
        self.batch_sizes = []
        self.token_counts = []
        return out
