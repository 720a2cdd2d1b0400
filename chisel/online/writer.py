"""The online ledger's parquet file: the offline ledger's columns plus `order`, written in
batches of steps while training runs (the file is complete once closed)."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
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


def to_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows in the online ledger's column order and types."""
    order = frame[ORDER] if ORDER in frame else pd.Series(pd.NA, index=frame.index)
    out = L.to_frame(frame.drop(columns=[ORDER], errors="ignore"), [])
    out[ORDER] = pd.array(order.to_numpy(), dtype="Int64")
    return out


class OnlineWriter:
    """Appends frames to one parquet file (a hidden temporary until `close`)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f".tmp-{self.path.name}")
        self._schema = schema()
        self._writer = pq.ParquetWriter(str(self._tmp), self._schema)

    def write(self, frame: pd.DataFrame) -> None:
        if len(frame):
            table = pa.Table.from_pandas(frame, schema=self._schema, preserve_index=False)
            self._writer.write_table(table)

    def close(self) -> None:
        self._writer.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        """An error stopped training: keep what was written, renamed as `<name>.partial`."""
        self._writer.close()
        os.replace(self._tmp, self.path.with_name(self.path.name + ".partial"))
