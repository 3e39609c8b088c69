"""Export and import as JSON lines: one signed record per line, verified again on import.

A line is ``{"type": "receipt" | "commitment", "id": hex, "record": hex of the signed bytes,
"fields": {...}}``. Only ``record`` is trusted on import (``fields`` is for people and
tools reading the file), so an edited ``fields`` changes nothing and an edited ``record``
is refused.
"""

from __future__ import annotations

import json
from typing import Iterable, Iterator

from edge_agent.ledger.encoding import COMMITMENT_WIRE_SIZE, RECEIPT_WIRE_SIZE, EncodingError
from edge_agent.ledger.records import Commitment, Receipt
from edge_agent.ledger.store import LedgerStore, commitment_from_row, receipt_from_row
from edge_agent.ledger.sync import IngestResult, ingest

MAX_LINE = 4096


def describe(record: Receipt | Commitment) -> dict:
    """Decoded fields, bytes as hex: for `ledger show --json` and exports."""
    f = record.fields
    return {k: (v.hex() if isinstance(v, bytes) else v) for k, v in vars(f).items()}


def export_lines(store: LedgerStore) -> Iterator[str]:
    for table, kind, from_row in (("receipts", "receipt", receipt_from_row), ("commitments", "commitment", commitment_from_row)):
        for row in store.iter_rows(table):
            rec = from_row(row)
            try:
                fields = describe(rec)
            except EncodingError as exc:
                fields = {"malformed": exc.reason}
            yield json.dumps({"type": kind, "id": row["id"].hex(), "record": rec.to_bytes().hex(), "fields": fields})


def import_lines(store: LedgerStore, lines: Iterable[str]) -> IngestResult:
    """Verify and store records; refused ones come back with line numbers (1-based) and reasons."""
    receipts: list[tuple[int, bytes]] = []
    commitments: list[Commitment] = []
    refused: list[tuple[int, str, str]] = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            if len(line) > MAX_LINE:
                raise ValueError("line too long")
            obj = json.loads(line)
            kind, raw = obj["type"], bytes.fromhex(obj["record"])
            if kind == "receipt" and len(raw) == RECEIPT_WIRE_SIZE:
                receipts.append((lineno, raw))
            elif kind == "commitment" and len(raw) == COMMITMENT_WIRE_SIZE:
                c = Commitment.from_bytes(raw)
                problem = c.problem()
                if problem:
                    raise ValueError(problem)
                commitments.append(c)
            else:
                raise ValueError(f"unknown type or wrong size: {kind!r}, {len(raw)} bytes")
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            refused.append((lineno, "", str(exc) if not isinstance(exc, KeyError) else f"missing {exc}"))
    result, stored = ingest(store, [raw for _, raw in receipts])
    result.refused = sorted(refused + [(receipts[i][0], rid, reason) for i, rid, reason in result.refused])
    held = store.existing("commitments", [c.id for c in commitments])
    store.add(commitments=[c for c in commitments if c.id not in held]).result()
    stored.result()
    return result
