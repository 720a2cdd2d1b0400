"""The ledger: one tidy table of attribution rows, streamed to parquet step by step."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from chisel.errors import ChiselError


class LedgerNotFoundError(ChiselError, FileNotFoundError):
    """A ledger directory without parquet parts."""


# columns every row has
STEP, FAMILY, PARAM, SITE, FEATURE, QUANTITY, VALUE = (
    "step", "family", "param", "site", "feature", "quantity", "value",
)
COLUMNS = [STEP, FAMILY, PARAM, SITE, FEATURE, QUANTITY, VALUE]
# columns of credit rows (null elsewhere); per-sample tags follow as "tag/<name>"
PART, SAMPLE, ORIGIN_STEP = "part", "sample", "origin_step"
# credit rows summed over a group of samples (`credit_by`): how many sample rows were summed
COUNT = "count"
TAG_PREFIX = "tag/"

# families
GEOMETRY, INTEGRATED, CREDIT = "geometry", "integrated", "credit"
FAMILIES = (GEOMETRY, INTEGRATED, CREDIT)

# quantities
ATTRIBUTION = "attribution"  # ⟨part, ḡ⟩: a share of m(θ_{t+1}) − m(θ_t), split by input features
# the same layer share split by the features at the weight's *output* (the computation that
# produces them): features + <residual> of these rows also sum to the param's share
WRITE_ATTRIBUTION = "attribution_write"
# credit: the share of the update's momentum part left unresolved (beyond the horizon), per step
MOMENTUM_UNRESOLVED_SHARE = "momentum_unresolved_share"
READ, WRITE, CIRCUIT, CIRCUIT_REL, SPAN_SHARE = "read", "write", "circuit", "circuit_rel", "span_share"
DELTA_METRIC, METRIC_BEFORE, TOTAL = "delta_metric", "metric_before", "attribution_total"
COMPLETENESS_ERROR, COMPLETENESS_REL = "completeness_error", "completeness_rel"
PIECES, EVALUATIONS = "pieces", "evaluations"

# feature labels that are not feature names
RESIDUAL, BIAS, SPAN, WHOLE = "<residual>", "<bias>", "<span>", ""
# centred splits: the part of a weight's share carried by the mean input over the metric's states
MEAN = "<mean>"
# the label of per-step diagnostic rows that are not shares of Δm (momentum_unresolved_share), so
# that summing the rows with feature "" still gives the step's total
DIAGNOSTIC = "<diagnostic>"
NOT_FEATURES = (WHOLE, RESIDUAL, BIAS, SPAN, MEAN, DIAGNOSTIC)
ARROW = "→"

_BASE_SCHEMA = [
    (STEP, pa.int64()),
    (FAMILY, pa.string()),
    (PARAM, pa.string()),
    (SITE, pa.string()),
    (FEATURE, pa.string()),
    (QUANTITY, pa.string()),
    (VALUE, pa.float64()),
    (PART, pa.string()),  # credit: weight_decay, momentum, gradient, … (null elsewhere)
    (SAMPLE, pa.int64()),
    (ORIGIN_STEP, pa.int64()),
    (COUNT, pa.int64()),  # credit rows summed over samples (credit_by): how many (null elsewhere)
]


def row(step: int, family: str, param: str, site: str, feature: str, quantity: str, value: float) -> dict[str, Any]:
    return {STEP: step, FAMILY: family, PARAM: param, SITE: site, FEATURE: feature, QUANTITY: quantity, VALUE: float(value)}


def schema(tag_columns: list[str]) -> pa.Schema:
    return pa.schema(_BASE_SCHEMA + [(c, pa.float64()) for c in tag_columns])


def to_frame(rows: list[dict[str, Any]] | pd.DataFrame, tag_columns: list[str]) -> pd.DataFrame:
    """Rows in the ledger's column order, with nulls where a column does not apply."""
    frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows)
    frame = frame.reindex(columns=[c for c, _ in _BASE_SCHEMA] + tag_columns)
    frame[STEP] = frame[STEP].astype("int64")
    frame[VALUE] = frame[VALUE].astype("float64")
    for col in (SAMPLE, ORIGIN_STEP, COUNT):
        frame[col] = frame[col].astype("Int64")
    for col in (FAMILY, PARAM, SITE, FEATURE, QUANTITY):
        frame[col] = frame[col].fillna("").astype(str)
    frame[PART] = frame[PART].astype("string")
    for col in tag_columns:
        frame[col] = pd.to_numeric(frame[col], errors="coerce").astype("float64")
    return frame


class LedgerWriter:
    """Appends each step's rows to one parquet file; the file is complete once closed."""

    def __init__(self, path: str | os.PathLike, tag_columns: list[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f".tmp-{self.path.name}")
        self._schema = schema(tag_columns)
        self._writer = pq.ParquetWriter(str(self._tmp), self._schema)

    def write(self, frame: pd.DataFrame) -> None:
        if len(frame):
            self._writer.write_table(pa.Table.from_pandas(frame, schema=self._schema, preserve_index=False))

    def close(self) -> None:
        """Finish the file and rename it into place."""
        self._writer.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        """Drop a partial ledger (an error stopped the attribution): nothing appears at `path`."""
        self._writer.close()
        self._tmp.unlink(missing_ok=True)


def load_ledger(path: str | os.PathLike) -> pd.DataFrame:
    """Read a ledger written by `chisel.attribute(..., out=...)`: a parquet file, or a directory
    of parquet parts (`engine="ray"`), read as one table sorted by step."""
    path = Path(path)
    if not path.is_dir():
        return pd.read_parquet(path)
    parts = sorted(path.glob("*.parquet"))  # dot-named files are parts still being written
    parts = [p for p in parts if not p.name.startswith((".", "_"))]
    if not parts:
        raise LedgerNotFoundError(
            f"{path} holds no ledger parts (*.parquet); write them with "
            "chisel.attribute(..., engine='ray', out=...)."
        )
    frame = pd.read_parquet([str(p) for p in parts])
    return frame.sort_values(STEP, kind="stable", ignore_index=True)
