"""The run store: an append-only run directory, its writer and its reader.

Other stages read a run through `chisel.load` (steps, updates, factors) or, when they only need
its description, `read_manifest` (the report does, so that a run with damaged steps still gets
a report).
"""

from chisel.store.layout import read_manifest

__all__ = ["read_manifest"]
