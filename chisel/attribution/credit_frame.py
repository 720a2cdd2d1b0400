"""Credit rows as column chunks (numpy arrays, one chunk per block or part) and the one
DataFrame a step's chunks become, sorted by their `ORDER` keys."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from chisel.attribution import ledger as L

PART = L.PART  # ledger column: which leaf of the split a credit row belongs to
# a chunk's sort key column (dropped from the frame): the rows of block i sit at i · SLOTS
# (its whole rows) and i · SLOTS + 1 + j (its rows split by side j of kernels)
ORDER, SLOTS = "_order", 64
Columns = dict[str, np.ndarray]  # ledger column -> [n] values of a chunk of n rows


def columns(
    t: int,
    part: str,
    param: str,
    site: str | np.ndarray,
    feature: str | np.ndarray,
    value: np.ndarray,
    sample: np.ndarray | None = None,
    origin: int | None = None,
    tags: Columns | None = None,
    quantity: str = L.ATTRIBUTION,
) -> Columns:
    """Columns of n rows as numpy arrays (one DataFrame is built per step, not per block)."""
    n = len(value)

    def full(v: Any) -> np.ndarray:
        return v if isinstance(v, np.ndarray) else np.full(n, v, dtype=object)

    cols: Columns = {
        L.STEP: np.full(n, t, dtype=np.int64),
        L.FAMILY: full(L.CREDIT),
        PART: full(part),
        L.PARAM: full(param),
        L.SITE: full(site),
        L.FEATURE: full(feature),
        L.QUANTITY: full(quantity),
        L.VALUE: np.asarray(value, dtype=np.float64),
        L.SAMPLE: np.asarray(sample, dtype=np.float64) if sample is not None else np.full(n, np.nan),
        L.ORIGIN_STEP: np.full(n, np.nan if origin is None else float(origin)),
    }
    cols.update(tags or {})
    return cols


def frame_of(chunks: list[Columns]) -> pd.DataFrame:
    """One DataFrame from column chunks; a column a chunk lacks is null there. Rows are stably
    sorted by an `ORDER` column when the chunks have one (it is dropped)."""
    names = list(dict.fromkeys(k for c in chunks for k in c))
    data = {}
    for name in names:
        parts = []
        for c in chunks:
            n = len(c[L.VALUE])
            parts.append(c[name] if name in c else np.full(n, np.nan))
        data[name] = np.concatenate(parts) if parts else np.zeros(0)
    order = data.pop(ORDER, None)
    if order is not None:
        perm = np.argsort(order, kind="stable")
        data = {name: v[perm] for name, v in data.items()}
    frame = pd.DataFrame(data)
    for col in (L.SAMPLE, L.ORIGIN_STEP, L.COUNT):
        if col in frame:
            frame[col] = frame[col].astype("Int64")
    return frame


def ordered(chunks: list[Columns], key: float) -> list[Columns]:
    """The chunks, each given the sort key `key` for all its rows (-1: first, inf: last)."""
    for chunk in chunks:
        chunk[ORDER] = np.full(len(chunk[L.VALUE]), key)
    return chunks
