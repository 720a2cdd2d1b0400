"""Credit grouped by per-sample tags: each origin step's tag columns and tag groups, and whole
rows summed within the groups of tags (`credit_rows(by=...)`, `credit_by`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from torch import Tensor

from chisel.attribution import ledger as L
from chisel.attribution.credit_frame import ORDER, PART, Columns
from chisel.attribution.credit_parts import CreditError
from chisel.attribution.credit_split import CreditSession

# the keys rows are summed within, besides the tags
GROUP_KEYS = (L.STEP, L.FAMILY, L.PART, L.PARAM, L.SITE, L.FEATURE, L.QUANTITY, L.ORIGIN_STEP)
_FIX = ("Groups need one number per sample: tag it at every step, and map strings to codes "
        "(e.g. a tensor of ints).")


def tag_columns(tags: dict[str, Any], n: int) -> Columns:
    """Tags of a step as ledger columns for its n samples: per-sample arrays and numeric scalars."""
    out = {}
    for name, value in tags.items():
        if isinstance(value, Tensor) and value.ndim == 1 and value.shape[0] == n:
            out[L.TAG_PREFIX + name] = value.double().numpy()
        elif isinstance(value, (bool, int, float)):
            out[L.TAG_PREFIX + name] = np.full(n, float(value))
    return out


@dataclass(frozen=True)
class TagGroups:
    """The samples of one origin step grouped by the `by` tags, groups in order of first
    appearance (a missing or NaN tag its own group)."""

    codes: np.ndarray  # [n] each sample's group
    keys: Columns  # {tag column: [groups] its value}
    counts: np.ndarray  # [groups] sizes


class OriginTags:
    """Per origin step: its tag columns, one value per sample (computed once per call)."""

    def __init__(self, session: CreditSession, by: Sequence[str] | None) -> None:
        self.session, self.by = session, None if by is None else [L.TAG_PREFIX + b for b in by]
        self._columns: dict[int, Columns] = {}
        self.seen: set[str] = set()

    def columns(self, s: int, n: int) -> Columns:
        if s not in self._columns:
            factors = self.session.factors(s)
            self._columns[s] = tag_columns(factors.tags if factors else {}, n)
            self.seen.update(self._columns[s])
        return self._columns[s]

    def groups(self, s: int, n: int) -> TagGroups:
        """Step s's samples grouped by the `by` tags (kept by the session with its factors)."""
        assert self.by is not None
        self.columns(s, n)  # the tags seen (for `check`)
        return self.session.cached(s, ("tag groups", tuple(self.by)), lambda: self._groups(s, n))

    def _groups(self, s: int, n: int) -> TagGroups:
        assert self.by is not None
        cols = self.columns(s, n)
        values = [cols[c] if c in cols else np.full(n, np.nan) for c in self.by]
        codes = np.zeros(n, dtype=np.int64)
        for v in values:
            c, uniq = pd.factorize(v, use_na_sentinel=False)
            codes = codes * max(1, len(uniq)) + c
        codes, _ = pd.factorize(codes)
        first = np.unique(codes, return_index=True)[1]
        keys = {c: v[first] for c, v in zip(self.by, values, strict=True)}
        return TagGroups(codes, keys, np.bincount(codes, minlength=len(first)))

    def check(self) -> None:
        """The `by` tags must be per-sample numeric tags of the samples credited at this step."""
        assert self.by is not None
        missing = [c for c in self.by if c not in self.seen]
        if missing:
            raise CreditError(
                f"credit_by: no per-sample numeric tag {missing} at this step (numeric tags "
                f"here: {sorted(self.seen)}). {_FIX}"
            )


def sum_by_tags(chunks: list[Columns], by: list[str]) -> Columns | None:
    """Whole rows (chunks with `ORDER` keys; per sample, or per tag group with a `count`)
    summed within the groups of the tag columns `by` and of the other keys, as
    `aggregate_samples` sums the rows in block order: groups in order of first appearance, a
    NaN tag its own group, each group summed in row order."""
    if not chunks:
        return None
    n = [len(c[L.VALUE]) for c in chunks]
    order = np.argsort(np.concatenate([c[ORDER] for c in chunks]), kind="stable")
    codes, columns = _group_codes(chunks, n, order, by)
    first = np.unique(codes, return_index=True)[1]
    at = order[first]  # each group's first row, as an index into the chunks' rows
    chunk_of = np.searchsorted(np.cumsum(n), at, side="right")
    out = {}
    for k in GROUP_KEYS:  # constant within a chunk, but the origin step
        if k == L.ORIGIN_STEP:
            out[k] = np.concatenate([c[k] for c in chunks])[at]
            continue
        per_chunk = np.empty(len(chunks), dtype=chunks[0][k].dtype)
        per_chunk[:] = [c[k][0] for c in chunks]
        out[k] = per_chunk[chunk_of]
    out.update({name: v[first] for name, v in columns.items()})
    values = np.concatenate([c[L.VALUE] for c in chunks])[order]
    out[L.VALUE] = np.bincount(codes, weights=values)
    out[L.SAMPLE] = np.full(len(first), np.nan)
    counts = np.concatenate([c[L.COUNT] if L.COUNT in c else np.ones(m) for c, m in zip(chunks, n, strict=True)])
    out[L.COUNT] = np.bincount(codes, weights=counts[order])  # rows already summed count theirs
    return out


def _group_codes(
    chunks: list[Columns], n: list[int], order: np.ndarray, by: list[str]
) -> tuple[np.ndarray, Columns]:
    """([rows] group codes by first appearance in `order`, {tag: [rows] values in order})."""
    ids: dict[tuple, int] = {}  # (part, param, site) of each chunk: constant within it
    key = np.repeat([ids.setdefault((c[PART][0], c[L.PARAM][0], c[L.SITE][0]), len(ids))
                     for c in chunks], n)[order]
    origin = np.concatenate([c[L.ORIGIN_STEP] for c in chunks])[order]
    codes, _ = pd.factorize(key * (int(origin.max()) + 1) + origin.astype(np.int64))
    columns = {}
    for name in by:  # a tag an origin step lacks is NaN there
        values = [c[name] if name in c else np.full(m, np.nan) for c, m in zip(chunks, n, strict=True)]
        columns[name] = np.concatenate(values)[order]
        tag_codes, uniq = pd.factorize(columns[name], use_na_sentinel=False)
        codes = codes * max(1, len(uniq)) + tag_codes
    codes, _ = pd.factorize(codes)  # renumbered by first appearance
    return codes, columns


def aggregate_samples(frame: pd.DataFrame, by: Sequence[str]) -> pd.DataFrame:
    """Per-sample rows summed within groups of the tags `by` (sample becomes null)."""
    tag_cols = [f"tag/{b}" for b in by]
    missing = [c for c in tag_cols if c not in frame.columns]
    if missing:
        raise CreditError(
            f"credit_by: no per-sample numeric tag {missing} at this step (numeric tags here: "
            f"{[c for c in frame.columns if c.startswith('tag/')]}). {_FIX}"
        )
    per_sample = frame[frame[L.SAMPLE].notna()]
    keys = [*GROUP_KEYS, *tag_cols]
    # groups in order of first appearance, each summed in row order (as `credit_rows(by=...)`)
    codes = per_sample.groupby(keys, dropna=False, sort=False).ngroup().to_numpy()
    first = np.unique(codes, return_index=True)[1]
    summed = per_sample.iloc[first][keys].reset_index(drop=True)
    summed[L.VALUE] = np.bincount(codes, weights=per_sample[L.VALUE].to_numpy(np.float64))
    summed[L.COUNT] = pd.array(np.bincount(codes), dtype="Int64")
    return pd.concat([frame[frame[L.SAMPLE].isna()], summed], ignore_index=True)
