"""This agent's allow-list of peers that may see activations (``--privacy trusted``).

A JSON file in the data dir (mode 0600, written atomically): peer ids with a name, plus
whether every member of the configured private swarm counts as trusted. The Python API
(``TrustList``) and the CLI (``edge-agent trust add|list|remove|swarm``) mirror each other.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Optional

import typer

from edge_agent.options import DataDirOpt

TRUST_FILE = "trusted_peers.json"
_PEER_ID = re.compile(r"^[0-9a-f]{64}$")  # hex Ed25519 public key, as `keys show` and `peers` print it
_MAX_BYTES = 1 << 20


class TrustError(ValueError):
    """A malformed id or trust file (one line for the user)."""


def check_peer_id(peer_id: str) -> str:
    pid = peer_id.strip().lower()
    if not _PEER_ID.match(pid):
        raise TrustError(f"not a peer id: {peer_id!r} (64 hex digits, as `edge-agent peers` or `keys show` prints)")
    return pid


class TrustList:
    """Trusted peer ids of the agent whose data dir is ``data_dir``."""

    def __init__(self, data_dir: Path):
        self.path = Path(data_dir) / TRUST_FILE

    def _load(self) -> dict:
        if not self.path.exists():
            return {"peers": {}, "private_swarm": False}
        if self.path.stat().st_size > _MAX_BYTES:
            raise TrustError(f"{self.path} is larger than {_MAX_BYTES} bytes")
        try:
            data = json.loads(self.path.read_text())
            peers = {check_peer_id(k): {"name": str(v.get("name") or ""), "added": float(v.get("added") or 0)}
                     for k, v in dict(data.get("peers") or {}).items()}
            return {"peers": peers, "private_swarm": bool(data.get("private_swarm", False))}
        except (ValueError, TypeError, AttributeError) as exc:
            raise TrustError(f"{self.path} is not a valid trust file ({exc}); fix or remove it") from None

    def _save(self, data: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".trust-", dir=self.path.parent)  # created 0600
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, self.path)

    def peers(self) -> dict[str, dict]:
        """{peer id: {"name", "added"}}"""
        return self._load()["peers"]

    def ids(self) -> frozenset[str]:
        return frozenset(self.peers())

    def add(self, peer_id: str, name: str = "") -> str:
        data = self._load()
        pid = check_peer_id(peer_id)
        data["peers"][pid] = {"name": name, "added": round(time.time(), 3)}
        self._save(data)
        return pid

    def remove(self, peer_id: str) -> bool:
        data = self._load()
        found = data["peers"].pop(check_peer_id(peer_id), None) is not None
        if found:
            self._save(data)
        return found

    @property
    def private_swarm(self) -> bool:
        """True: every member of the configured private swarm is trusted too."""
        return self._load()["private_swarm"]

    def set_private_swarm(self, on: bool) -> None:
        data = self._load()
        data["private_swarm"] = on
        self._save(data)


def privacy_policy(level: str, k: int, m: int, data_dir: Path, swarm_key: str | None = None):
    """The ``PrivacyPolicy`` of ``--privacy level`` for the agent in ``data_dir``: under ``trusted``,
    the allow-list, or every peer of the private swarm when ``trust swarm --on`` and a swarm key
    (``--swarm-key``, $EDGE_AGENT_SWARM_KEY or <data dir>/swarm.key) is configured."""
    from edge_agent.discovery.identity import SwarmKey
    from edge_agent.split.policy import PrivacyPolicy

    if level != "trusted":
        return PrivacyPolicy.for_level(level, k, m)
    trust = TrustList(data_dir)
    if trust.private_swarm:
        if SwarmKey.resolve(swarm_key, data_dir).is_open:
            raise TrustError("`trust swarm --on` needs a private swarm key (the open swarm trusts no one)")
        return PrivacyPolicy.for_level(level, k, m, trusted=None)
    return PrivacyPolicy.for_level(level, k, m, trusted=trust.ids())


trust_app = typer.Typer(help="Peers allowed to see this agent's activations (`run --privacy trusted`).", no_args_is_help=True)


def _trust(data_dir: Optional[Path]) -> TrustList:
    from edge_agent.config import data_dir as resolve_data_dir

    return TrustList(resolve_data_dir(data_dir))


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@trust_app.command("add")
def trust_add(peer_id: str = typer.Argument(..., help="The peer's id (64 hex digits)."),
              name: str = typer.Option("", "--name", help="A label for people."),
              data_dir: Optional[Path] = DataDirOpt) -> None:
    """Trust a peer with activations."""
    try:
        pid = _trust(data_dir).add(peer_id, name)
    except TrustError as exc:
        _fail(str(exc))
    typer.echo(f"trusted {pid[:12]}" + (f" ({name})" if name else ""))


@trust_app.command("remove")
def trust_remove(peer_id: str = typer.Argument(...), data_dir: Optional[Path] = DataDirOpt) -> None:
    """Stop trusting a peer."""
    try:
        found = _trust(data_dir).remove(peer_id)
    except TrustError as exc:
        _fail(str(exc))
    if not found:
        _fail(f"{peer_id[:12]} is not on the trust list (see `edge-agent trust list`)")
    typer.echo(f"removed {peer_id[:12]}")


@trust_app.command("list")
def trust_list(as_json: bool = typer.Option(False, "--json"), data_dir: Optional[Path] = DataDirOpt) -> None:
    """The trusted peers."""
    try:
        t = _trust(data_dir)
        peers, swarm = t.peers(), t.private_swarm
    except TrustError as exc:
        _fail(str(exc))
    if as_json:
        typer.echo(json.dumps({"peers": [{"id": k, **v} for k, v in sorted(peers.items())], "private_swarm": swarm}))
        return
    for pid, v in sorted(peers.items()):
        typer.echo(f"{pid}  {v['name']}")
    if not peers:
        typer.echo("no trusted peers (add one with `edge-agent trust add ID --name NAME`)")
    if swarm:
        typer.echo("every member of the configured private swarm is trusted too")


@trust_app.command("swarm")
def trust_swarm(on: bool = typer.Option(..., "--on/--off", help="Trust every member of the private swarm (needs a swarm key)."),
                data_dir: Optional[Path] = DataDirOpt) -> None:
    """Trust (or stop trusting) every member of this agent's private swarm."""
    try:
        _trust(data_dir).set_private_swarm(on)
    except TrustError as exc:
        _fail(str(exc))
    typer.echo("private swarm members are " + ("trusted" if on else "no longer trusted as a group"))
