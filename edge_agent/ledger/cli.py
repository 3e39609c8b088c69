"""``edge-agent ledger ...``: each command is one call into the Python API (store, sync, jsonl)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from edge_agent.options import DataDirOpt

ledger_app = typer.Typer(help="This agent's ledger of signed receipts and commitments.", no_args_is_help=True)
MaxMbOpt = typer.Option(None, "--ledger-max-mb", help="Bound on the ledger's size, remembered in the ledger (join and run keep it); "
                        "old commitments are pruned, receipts and chain heads stay.")


def _fail(message: str, hint: str | None = None, code: int = 2) -> None:
    """One line and a hint (default: the command's --help), exit ``code``."""
    if code == 2:
        from edge_agent.cli_errors import fail

        fail(message, hint)
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    if hint:
        typer.secho(f"hint: {hint}", err=True)
    raise typer.Exit(code)


def _store(data_dir: Optional[Path], max_mb: Optional[float] = None, create: bool = True):
    from edge_agent.config import data_dir as default_data_dir
    from edge_agent.ledger.store import DB_FILE, LedgerStore

    root = data_dir or default_data_dir()
    if not create and not (Path(root) / DB_FILE).is_file():
        _fail(f"no ledger at {Path(root) / DB_FILE}", "give --data-dir of an agent that ran `join` or `run`")
    try:
        return LedgerStore.open(root, max_mb)
    except Exception as exc:  # noqa: BLE001 - unreadable file, newer schema: one line, not a traceback
        _fail(f"cannot open the ledger: {exc}", "`edge-agent ledger verify` checks it; docs/ledger.md")
    raise AssertionError


@ledger_app.command("show")
def show(data_dir: Optional[Path] = DataDirOpt, as_json: bool = typer.Option(False, "--json", help="JSON lines."),
         peer: Optional[str] = typer.Option(None, "--peer", help="Only receipts where this agent id (or a prefix) is node or client."),
         request: Optional[str] = typer.Option(None, "--request", help="Only this request id (or a prefix)."),
         limit: int = typer.Option(1000, "--limit")) -> None:
    """Receipts, oldest first."""
    from edge_agent.ledger.jsonl import describe
    from edge_agent.ledger.store import receipt_from_row

    store = _store(data_dir, create=False)
    try:
        for row in store.receipts(peer=peer, request=request, limit=limit):
            f = describe(receipt_from_row(row))
            if as_json:
                typer.echo(json.dumps({"id": row["id"].hex(), **f}))
            else:
                typer.echo(f"{row['id'].hex()[:16]}  request {f['request_id'][:12]}  node {f['node'][:12]}  client {f['client'][:12]}"
                           f"  layers {f['layer_start']}:{f['layer_end']}  steps {f['steps']}  chunks {f['chunks']}"
                           f"  deadlines {f['deadlines_met']}/{f['deadlines_met'] + f['deadlines_missed']}")
    finally:
        store.close()


@ledger_app.command("evidence")
def evidence(data_dir: Optional[Path] = DataDirOpt, as_json: bool = typer.Option(False, "--json", help="JSON lines."),
             accused: Optional[str] = typer.Option(None, "--accused", help="Only evidence against this agent id.")) -> None:
    """Evidence against nodes (failed audits, equivocation), each re-verified (docs/accountability.md)."""
    from edge_agent.ledger.report import evidence_entry

    store = _store(data_dir, create=False)
    try:
        rows = store.evidence(accused)
    finally:
        store.close()
    for row in rows:
        out = evidence_entry(row)
        if as_json:
            typer.echo(json.dumps(out))
        else:
            extra = f"  distance {out['distance']:.3f} > {out['tolerance']:.3f}" if "distance" in out else ""
            typer.echo(f"{out['id'][:16]}  {out['kind']}  accused {out['accused'][:12]}{extra}  "
                       f"{'valid' if out['valid'] else 'INVALID: ' + out['problem']}")


@ledger_app.command("verify")
def verify(data_dir: Optional[Path] = DataDirOpt, as_json: bool = typer.Option(False, "--json")) -> None:
    """Re-check every signature, column and chain link; each bad row with its reason; exit 1 if any."""
    store = _store(data_dir, create=False)
    try:
        bad = store.verify()
        integrity = store.db.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        store.close()
    if as_json:
        typer.echo(json.dumps({"ok": not bad and integrity == "ok", "integrity_check": integrity,
                               "bad": [{"table": t, "id": i, "reason": r} for t, i, r in bad]}))
        if bad or integrity != "ok":
            raise typer.Exit(1)
        return
    for table, rid, reason in bad:
        typer.echo(f"{table} {rid}: {reason}")
    if integrity != "ok":
        typer.echo(f"sqlite integrity_check: {integrity}")
    if bad or integrity != "ok":
        raise typer.Exit(1)
    typer.echo("ok")


@ledger_app.command("stats")
def stats(data_dir: Optional[Path] = DataDirOpt, as_json: bool = typer.Option(False, "--json"), max_mb: Optional[float] = MaxMbOpt) -> None:
    """Row counts, chain heads, size on disk, schema version (``--ledger-max-mb`` sets the bound)."""
    store = _store(data_dir, max_mb)
    try:
        s = store.stats()
    finally:
        store.close()
    typer.echo(json.dumps(s, indent=2) if as_json else "\n".join(f"{k:>15}: {v}" for k, v in s.items()))


@ledger_app.command("export")
def export(data_dir: Optional[Path] = DataDirOpt, output: Optional[Path] = typer.Option(None, "-o", "--output", help="File (default: stdout).")) -> None:
    """Every record as JSON lines (signed bytes + decoded fields)."""
    from edge_agent.ledger.jsonl import export_lines

    store = _store(data_dir, create=False)
    out = open(output, "w") if output else sys.stdout
    try:
        for line in export_lines(store):
            out.write(line + "\n")
    finally:
        store.close()
        if output:
            out.close()


@ledger_app.command("import")
def import_(file: Path = typer.Argument(..., help="JSON lines from `ledger export`."), data_dir: Optional[Path] = DataDirOpt,
            as_json: bool = typer.Option(False, "--json")) -> None:
    """Verify and add records; refused ones are listed with their reason (exit 1 unless all were duplicates)."""
    from edge_agent.ledger.jsonl import import_lines

    if not file.is_file():
        _fail(f"{file}: no such file")
    store = _store(data_dir)
    try:
        with open(file, encoding="utf-8", errors="replace") as f:
            result = import_lines(store, f)
    finally:
        store.close()
    if as_json:
        typer.echo(json.dumps({"imported": result.accepted, "refused": [{"line": n, "id": i, "reason": r}
                                                                     for n, i, r in result.refused]}))
    else:
        for lineno, rid, reason in result.refused:
            typer.echo(f"line {lineno}: refused {rid[:16]} {reason}".replace("  ", " "))
        typer.echo(f"imported {result.accepted} receipts, refused {len(result.refused)}")
    if any(not reason.startswith("duplicate") for _, _, reason in result.refused):
        raise typer.Exit(1)


def _host_port(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        _fail(f"--peer {value!r}: expected HOST:PORT (the TLS port a node prints in its ready line)")
    return host, int(port)


@ledger_app.command("sync")
def sync(peer: str = typer.Option(..., "--peer", help="HOST:PORT of the peer's TLS listener."), data_dir: Optional[Path] = DataDirOpt,
         swarm_key: Optional[str] = typer.Option(None, "--swarm-key", envvar="EDGE_AGENT_SWARM_KEY"),
         max_mb: Optional[float] = MaxMbOpt) -> None:
    """Exchange receipts with one peer now (both ways); prints what moved, as JSON."""
    import asyncio

    from edge_agent import progress
    from edge_agent.config import data_dir as default_data_dir
    from edge_agent.discovery.identity import Identity, SwarmKey
    from edge_agent.ledger.service import sync_peer
    from edge_agent.ledger.sync import SyncError
    from edge_agent.transport import TransportError

    host, port = _host_port(peer)
    root = data_dir or default_data_dir()
    store = _store(root, max_mb)
    try:
        with progress.activity(f"syncing the ledger with {peer}"):
            report = asyncio.run(sync_peer(Identity.load_or_create(root), SwarmKey.resolve(swarm_key, root), host, port, store))
            store.flush()
    except (SyncError, TransportError, OSError, TimeoutError) as exc:
        _fail(f"sync with {peer} failed: {exc}", "is the peer running? `edge-agent peers` lists TLS ports", 1)
    finally:
        store.close()
    typer.echo(json.dumps(report.to_dict()))


@ledger_app.command("serve")
def serve(data_dir: Optional[Path] = DataDirOpt, host: str = typer.Option("127.0.0.1", "--host"), port: int = typer.Option(0, "--port"),
          swarm_key: Optional[str] = typer.Option(None, "--swarm-key", envvar="EDGE_AGENT_SWARM_KEY"),
          max_mb: Optional[float] = MaxMbOpt) -> None:
    """Answer ledger sync from peers (no hops served) until SIGTERM; prints a ready line with the port."""
    import asyncio

    from edge_agent.config import data_dir as default_data_dir
    from edge_agent.discovery.identity import Identity, SwarmKey
    from edge_agent.ledger.service import serve_ledger

    root = data_dir or default_data_dir()
    store = _store(root, max_mb)
    try:
        asyncio.run(serve_ledger(Identity.load_or_create(root), SwarmKey.resolve(swarm_key, root), host, port, store,
                                 on_ready=lambda info: print(json.dumps({"ready": info}), flush=True)))
    finally:
        store.close()


def _prefix_match(ids, prefix: str) -> str:
    """The one agent id starting with ``prefix`` (ids are long; people paste 12 digits)."""
    hits = [i for i in ids if i.startswith(prefix.lower())]
    if len(hits) != 1:
        _fail(f"{'no' if not hits else len(hits)} agents in this ledger match {prefix!r}",
              "`edge-agent ledger reputation` lists them")
    return hits[0]


@ledger_app.command("balance")
def balance(agent: Optional[str] = typer.Argument(None, help="Agent id or its prefix (default: this agent)."),
            data_dir: Optional[Path] = DataDirOpt, as_json: bool = typer.Option(False, "--json")) -> None:
    """Credits earned and spent, bond, stake, slashing and balance of one agent (docs/accountability.md)."""
    from edge_agent.config import data_dir as default_data_dir
    from edge_agent.discovery.identity import Identity
    from edge_agent.ledger.accounts import Accounts

    root = data_dir or default_data_dir()
    store = _store(root)
    try:
        accounts = Accounts(store)
        known = accounts.accounts()
        if agent is None:
            agent_id = Identity.load_or_create(root).agent_id
        else:
            agent_id = agent.lower() if agent.lower() in known else _prefix_match(known, agent)
        acc = accounts.account(agent_id).to_dict()
    finally:
        store.close()
    typer.echo(json.dumps(acc) if as_json else "\n".join(f"{k:>17}: {v}" for k, v in acc.items()))


@ledger_app.command("reputation")
def reputation(data_dir: Optional[Path] = DataDirOpt, as_json: bool = typer.Option(False, "--json", help="JSON lines.")) -> None:
    """Every agent the ledger knows: reputation (the planner's input), stake, offences, work served."""
    from edge_agent.ledger.accounts import Accounts
    from edge_agent.ledger.report import routing

    store = _store(data_dir, create=False)
    try:
        rows = sorted(Accounts(store).accounts().values(), key=lambda a: (-a.reputation, a.agent_id))
    finally:
        store.close()
    for a in rows:
        route = routing(a)
        if as_json:
            typer.echo(json.dumps({**a.to_dict(), **route}))
        else:
            flag = "" if route["routable"] else f"  (not routed to: {route['not_routable_because']})"
            typer.echo(f"{a.agent_id[:12]}  reputation {a.reputation:.3f}  stake {a.stake}  offences {a.offences}  "
                       f"layer-tokens {a.layer_tokens}{flag}")


@ledger_app.command("bond")
def bond(amount: int = typer.Argument(..., help="Credits to lock as stake (whole credits, from what this agent earned)."),
         data_dir: Optional[Path] = DataDirOpt) -> None:
    """Lock earned credits as stake: a signed entry that every sync carries; forfeited on verified evidence."""
    import time

    from edge_agent.config import data_dir as default_data_dir
    from edge_agent.discovery.identity import Identity
    from edge_agent.ledger.accounts import Accounts
    from edge_agent.ledger.stake import Bond

    root = data_dir or default_data_dir()
    identity = Identity.load_or_create(root)
    try:
        record = Bond.sign(identity, amount, int(time.time() * 1000))
    except ValueError as exc:
        _fail(str(exc))
    store = _store(root)
    try:
        store.add(bonds=[record]).result(30)
        acc = Accounts(store).account(identity.agent_id)
    finally:
        store.close()
    typer.echo(json.dumps({"bond": record.id.hex(), "amount": amount, "bonded": acc.bonded, "stake": acc.stake}))
    if acc.stake < acc.bonded:
        typer.echo(f"note: only {acc.stake} of {acc.bonded} bonded counts as stake: this agent has "
                   f"{acc.earned - acc.spent} net credits", err=True)
