"""The online ledger: geometry, first-order integrated and ghost per-sample credit rows,
computed during training for runs whose updates are too large to keep (docs/online-ledger.md)."""

from chisel.online.parts import OnlineLedgerError
from chisel.online.session import OnlineLedger, online_ledger
from chisel.online.writer import FIRST_ORDER, ORDER

__all__ = ["FIRST_ORDER", "ORDER", "OnlineLedger", "OnlineLedgerError", "online_ledger"]
