"""The online ledger's parquet file: the offline ledger's columns plus `order`, written in
batches of steps while training runs (the file is complete once closed)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from chisel.attribution import ledger as L

# 1 on rows whose value is a first-order Taylor term (⟨part, ∇m(θ_t)⟩ instead of the exact path
# average ḡ); null on exact rows (geometry, metric_before, delta_metric, diagnostics)
ORDER = "order"
FIRST_ORDER = 1
# the parquet file's key-value metadata says what the file is
METADATA = {
    b"chisel.ledger": b"online",
    b"chisel.order": (
        b"rows with order=1 are first-order: <part, grad m(theta_t)> at the parameters before "
        b"each step, not the path-averaged gradient of the offline ledger"
    ),
}


def schema() -> pa.Schema:
    base = L.schema([])
    return base.append(pa.field(ORDER, pa.int64())).with_metadata(METADATA)


@dataclass(frozen=True)
class Coded:
    """A string column as labels and one index per row (built without a Python loop)."""

    labels: tuple[str, ...]
    indices: np.ndarray  # [rows] int


_NUMERIC = {L.STEP, L.VALUE, L.SAMPLE, L.ORIGIN_STEP, L.COUNT, ORDER}


class Columns:
    """Rows buffered as numpy column chunks (no DataFrame per step: pandas costs more than the
    attribution on a small model); `table()` builds one arrow table of them all."""

    def __init__(self) -> None:
        self.chunks: list[dict[str, np.ndarray]] = []
        self.steps = 0

    def add_rows(self, rows: list[dict[str, Any]]) -> None:
        if rows:
            names = list(dict.fromkeys(k for r in rows for k in r))
            chunk = {k: [r.get(k) for r in rows] for k in names}
            self.chunks.append({k: np.array([np.nan if v is None else v for v in col])
                                if k in _NUMERIC else np.array(col, dtype=object)
                                for k, col in chunk.items()})

    def add(self, columns: dict[str, np.ndarray]) -> None:
        self.chunks.append(columns)

    def table(self) -> pa.Table:
        target = schema()
        arrays = []
        for field in target:
            parts = [_column(c, field.name, field.type) for c in self.chunks]
            arrays.append(pa.concat_arrays(parts) if parts else pa.array([], field.type))
        return pa.Table.from_arrays(arrays, schema=target)


def _column(chunk: dict[str, Any], name: str, kind: pa.DataType) -> pa.Array:
    """One chunk's column as arrow: a value may be one scalar for the whole chunk (a constant
    string repeated through a one-entry dictionary, no Python loop over rows) or an array;
    strings "" where absent (`part` null), numbers null where absent or NaN."""
    n = len(chunk[L.VALUE])
    value = chunk.get(name)
    if value is None:
        value = None if name == L.PART or not pa.types.is_string(kind) else ""
    if isinstance(value, Coded):
        indices = pa.array(value.indices.astype(np.int32))
        return pa.DictionaryArray.from_arrays(indices, pa.array(list(value.labels), kind)).cast(kind)
    if value is None or isinstance(value, (str, int, float)):
        if value is None:
            return pa.nulls(n, kind)
        indices = pa.array(np.zeros(n, dtype=np.int32))
        return pa.DictionaryArray.from_arrays(indices, pa.array([value], kind)).cast(kind)
    if pa.types.is_string(kind):
        return pa.array(np.asarray(value, dtype=object), type=kind)
    values = np.asarray(value, dtype=np.float64)
    nulls = np.isnan(values)
    dense = np.where(nulls, 0.0, values)
    dense = dense.astype(np.int64) if pa.types.is_integer(kind) else dense
    return pa.array(dense, type=kind, mask=nulls if nulls.any() else None)


class OnlineWriter:
    """Appends frames to one parquet file (a hidden temporary until `close`)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f".tmp-{self.path.name}")
        self._schema = schema()
        self._writer = pq.ParquetWriter(str(self._tmp), self._schema)

    def write(self, columns: Columns) -> None:
        table = columns.table()
        if table.num_rows:
            self._writer.write_table(table)

    def close(self) -> None:
        self._writer.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        """An error stopped training: keep what was written, renamed as `<name>.partial`."""
        self._writer.close()
        os.replace(self._tmp, self.path.with_name(self.path.name + ".partial"))
