"""The run store: an append-only run directory, its writer and its reader."""
