"""One description of an account's routing and of a piece of evidence, shared by
``edge-agent ledger reputation|evidence`` and the dashboard's Accounts panel, so the two
never disagree."""

from __future__ import annotations

from edge_agent.ledger.accounts import MIN_REPUTATION, Account
from edge_agent.ledger.evidence import Evidence


def routing(account: Account) -> dict:
    """Whether the client plans hops on this agent, and why not (only an offence puts it below the floor)."""
    if account.reputation >= MIN_REPUTATION:
        return {"routable": True, "not_routable_because": None}
    return {"routable": False, "not_routable_because": f"{account.offences} offence(s) on record: reputation "
                                                        f"{account.reputation:.3f} < {MIN_REPUTATION}"}


def evidence_entry(row: dict) -> dict:
    """A stored evidence row, re-verified: what it claims (request, chunk; distance vs tolerance for a
    failed audit) only when it proves it."""
    ev = Evidence(row["body"])
    problem = ev.problem()
    out = {"id": row["id"].hex(), "kind": row["kind"], "accused": row["accused"], "stored_ms": row["stored_ms"],
           "valid": problem is None, "problem": problem}
    if problem is None:
        commitment = ev.commitments()[0].fields
        out.update(request=commitment.request_id.hex(), chunk=commitment.chunk)
        if ev.kind == "failed-audit":
            auditor, _, _, dist, tol, _, _ = ev.statement().fields
            out.update(auditor=auditor.hex(), distance=dist / 1e6, tolerance=tol / 1e6)
    return out


def newest_evidence(store, limit: int) -> tuple[list[dict], int]:
    """The ``limit`` most recently stored pieces of evidence, newest first, and how many are stored."""
    total = store.db.execute("SELECT count(*) FROM evidence").fetchone()[0]
    rows = store.db["evidence"].rows_where(order_by="stored_ms DESC, rowid DESC", limit=limit)
    return [evidence_entry(row) for row in rows], total
