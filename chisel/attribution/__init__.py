"""Attribution: geometry, integrated and credit families, and the ledger they write."""
