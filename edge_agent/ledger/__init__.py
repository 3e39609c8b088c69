"""The control plane's memory: signed commitments and receipts, a SQLite ledger, sync.

The seam is ``split/observe.py``: the hop server and the client report each hop's work as
a ``HopRecord``; the recorders here turn those into signed commitments (node, per chunk of
32 steps) and one countersigned receipt per (request, node). The inference plane never
waits for any of it. Byte-level formats: docs/ledger.md.

Python API (the CLI, ``edge-agent ledger ...``, mirrors it):
  ``LedgerStore.open(data_dir, max_mb)``: ``receipts()``, ``stats()``, ``verify()``, ``add()``
  ``jsonl.export_lines(store)`` / ``jsonl.import_lines(store, lines)``
  ``service.sync_peer(identity, swarm, host, port, store)``
  ``background.Ledger``: store + service + recorders + background sync, wired by node.py
"""
