"""Which recorded samples a counterfactual removes: a weight per sample of every step.

A selection turns a step's tags into weights w [n] (1: the sample's contribution is removed,
0: kept; fractions remove that fraction of it). Forms accepted by `chisel.counterfactual`:

- a `Selection` (`tag_in`, `episodes`, `samples`, `everything`, `nothing`, or your own),
- a callable `tags -> bool / float array [n]` over the step's tags ({name: Tensor [n] or a
  scalar}, plus "step": the step index),
- a mapping {step: sample indices} or an iterable of (step, sample) pairs,
- "all" or None (nothing).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from chisel.errors import ChiselError

STEP_KEY = "step"  # the step index, added to the tags a predicate sees


class CounterfactualError(ChiselError, ValueError):
    """The counterfactual asked for cannot be computed from this run or these inputs."""


class Selection(Protocol):
    """Weights [n] float64 for the n samples of one step (1 = removed)."""

    def weights(self, step: int, tags: dict[str, Any], n: int) -> Tensor: ...


def _as_weights(value: Any, n: int, what: str) -> Tensor:
    w = torch.as_tensor(np.asarray(value), dtype=torch.float64).reshape(-1)
    if w.numel() == 1 and n != 1:
        w = w.expand(n).clone()
    if w.shape != (n,):
        raise CounterfactualError(
            f"{what} gave {w.numel()} weights for a step of {n} samples; return one bool (or "
            "weight) per sample, e.g. tags['reward_source'] == 2."
        )
    if not torch.isfinite(w).all():
        raise CounterfactualError(f"{what} gave non-finite weights; return bools or finite numbers.")
    return w


def _tag(tags: dict[str, Any], name: str, n: int) -> np.ndarray:
    if name not in tags:
        known = sorted(k for k in tags if k != STEP_KEY)
        raise CounterfactualError(
            f"no tag {name!r} at this step (tags: {known}); tag it at every step with "
            f"rec.tag({name}=...) or select by another tag."
        )
    value = tags[name]
    arr = value.detach().cpu().numpy() if isinstance(value, Tensor) else np.asarray(value)
    return np.broadcast_to(arr.reshape(-1) if arr.ndim else arr, (n,))


@dataclass(frozen=True)
class Everything:
    """Every sample of every step."""

    def weights(self, step: int, tags: dict[str, Any], n: int) -> Tensor:
        return torch.ones(n, dtype=torch.float64)


@dataclass(frozen=True)
class Nothing:
    """No sample."""

    def weights(self, step: int, tags: dict[str, Any], n: int) -> Tensor:
        return torch.zeros(n, dtype=torch.float64)


@dataclass(frozen=True)
class TagIn:
    """Samples whose tag `name` takes one of `values` (and, if given, whose tag `also` does too:
    `also` is a tuple of (name, values) pairs, all of which must hold)."""

    name: str
    values: tuple[float, ...]
    also: tuple[tuple[str, tuple[float, ...]], ...] = ()

    def weights(self, step: int, tags: dict[str, Any], n: int) -> Tensor:
        keep = np.ones(n, dtype=bool)
        for name, values in ((self.name, self.values), *self.also):
            keep &= np.isin(_tag(tags, name, n), np.asarray(values, dtype=np.float64))
        return torch.from_numpy(keep.astype(np.float64))


def tag_in(name: str, *values: float, **also: float | Iterable[float]) -> TagIn:
    """Samples whose tag `name` is one of `values`; keyword tags narrow it further.

    >>> tag_in("next_reward_source", 2)  # advantage about the button
    TagIn(name='next_reward_source', values=(2.0,), also=())
    >>> tag_in("next_reward_source", 1, wall_blue=1).also  # about trash, wall blue
    (('wall_blue', (1.0,)),)
    """
    if not values:
        raise CounterfactualError(f"tag_in({name!r}) needs at least one value to match.")
    more = tuple(
        (k, tuple(float(x) for x in (v if isinstance(v, Iterable) else (v,))))
        for k, v in also.items()
    )
    return TagIn(name, tuple(float(v) for v in values), more)


def _unit_hash(ids: np.ndarray, seed: int) -> np.ndarray:
    """A fixed pseudo-random number in [0, 1) per (id, seed): splitmix64 of the pair."""
    with np.errstate(over="ignore"):
        z = ids.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(seed * 2 + 1)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(2**53)


@dataclass(frozen=True)
class Episodes:
    """A pseudo-random `fraction` of episodes, by their id: the same ids in any run (so a
    retrained run drops the episodes with the same ids). `tag` holds the episode id."""

    fraction: float
    seed: int = 0
    tag: str = "episode_id"

    def __post_init__(self) -> None:
        if not 0.0 <= self.fraction <= 1.0:
            raise CounterfactualError(f"episodes(fraction={self.fraction}): give a fraction in [0, 1].")

    def chosen(self, ids: np.ndarray) -> np.ndarray:
        """bool per id: is this episode in the subset."""
        return _unit_hash(np.asarray(ids, dtype=np.int64), self.seed) < self.fraction

    def weights(self, step: int, tags: dict[str, Any], n: int) -> Tensor:
        return torch.from_numpy(self.chosen(_tag(tags, self.tag, n)).astype(np.float64))


def episodes(fraction: float, seed: int = 0, *, tag: str = "episode_id") -> Episodes:
    """A random `fraction` of the episodes (chosen by a hash of the episode id and `seed`)."""
    return Episodes(float(fraction), int(seed), tag)


@dataclass(frozen=True)
class Samples:
    """Explicit samples: {step: sample indices}."""

    by_step: Mapping[int, tuple[int, ...]]

    def weights(self, step: int, tags: dict[str, Any], n: int) -> Tensor:
        w = torch.zeros(n, dtype=torch.float64)
        idx = self.by_step.get(step, ())
        if idx and (max(idx) >= n or min(idx) < -n):
            raise CounterfactualError(
                f"sample {max(idx)} of step {step} does not exist: that step has {n} samples."
            )
        w[list(idx)] = 1.0
        return w


def samples(chosen: Mapping[int, Iterable[int]] | Iterable[tuple[int, int]]) -> Samples:
    """Explicit samples, as {step: [i, …]} or as (step, i) pairs."""
    by_step: dict[int, set[int]] = {}
    pairs = (
        ((s, i) for s, idx in chosen.items() for i in idx)
        if isinstance(chosen, Mapping)
        else chosen
    )
    for pair in pairs:
        try:
            s, i = pair
        except (TypeError, ValueError):
            raise CounterfactualError(
                f"sample set entry {pair!r}: give (step, sample) pairs or {{step: [samples]}}."
            ) from None
        by_step.setdefault(int(s), set()).add(int(i))
    return Samples({s: tuple(sorted(v)) for s, v in by_step.items()})


@dataclass(frozen=True)
class Predicate:
    """A user callable over the step's tags."""

    fn: Callable[[dict[str, Any]], Any]

    def weights(self, step: int, tags: dict[str, Any], n: int) -> Tensor:
        return _as_weights(self.fn({**tags, STEP_KEY: step}), n, f"the predicate {self.fn!r}")


def everything() -> Everything:
    return Everything()


def nothing() -> Nothing:
    return Nothing()


def resolve(remove: Any) -> Selection:
    """Any accepted form of `remove` as a Selection."""
    if remove is None:
        return Nothing()
    if isinstance(remove, str):
        if remove == "all":
            return Everything()
        raise CounterfactualError(
            f"remove={remove!r}: give 'all', None, a tag predicate (tags -> mask), "
            "chisel.counterfactual.tag_in(...) / episodes(...), or a sample set."
        )
    if hasattr(remove, "weights") and callable(remove.weights):
        return remove
    if callable(remove):
        return Predicate(remove)
    if isinstance(remove, (Mapping, Iterable)):
        return samples(remove)
    raise CounterfactualError(
        f"remove={type(remove).__name__}: give a tag predicate, a Selection or a sample set."
    )
