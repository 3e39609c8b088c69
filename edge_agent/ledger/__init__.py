"""Signed receipts, reputation, credits and stake: the next wave.

The seam is already in place: every hop's work passes through one observer
(``edge_agent.split`` calls ``on_hop_result``), which the ledger will subscribe to.
"""
