"""The split client's view of the swarm: peers from the peer table, links to them.

``PeerDirectory`` implements ``split.peersource.PeerSource`` on top of a running ``node.Agent``:
capabilities for the planner (only peers whose arithmetic settings equal the client's, each
with its standing in this agent's ledger, ``planner_reputation``), the ones kept off every
path with the reason (other arithmetic, or a reputation below ``ledger.accounts.MIN_REPUTATION``),
which peers are on probation (``on_probation``), which serve speculative steps (their
record's ``fx`` entry), and live links (TLS where the peer is reachable directly, else
WebRTC). ``fetch_weights``: a layer range's weights from a peer that shares them (a node
started without the model file).
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from edge_agent.discovery.capabilities import FEATURE_SPECULATION
from edge_agent.ledger.accounts import MIN_REPUTATION, Account, reputation_of
from edge_agent.runtime.engine import Arithmetic
from edge_agent.split.peersource import IncompatiblePeer
from edge_agent.split.links import PeerLink
from edge_agent.split.planner import PeerCapability
from edge_agent.split.protocol import ErrorCode, HopFailed
from edge_agent.transport import TransportError

if TYPE_CHECKING:
    from edge_agent.node import Agent

log = logging.getLogger(__name__)
# decode steps on record that make a peer established: until then a staked peer is a newcomer
# that batch requests try (docs/discovery.md, "Rule for newcomers and Sybils": 50 good steps)
HISTORY_STEPS = 50
STRANGER = reputation_of(0.0, 0.0, 0, 0)  # the ledger's (and the planner's) reputation of a peer it knows nothing of


def planner_reputation(account: Account | None) -> float | None:
    """What the planner is told of a peer: None (a newcomer: trials on batch requests) for one
    with stake and under ``HISTORY_STEPS`` of history; else its reputation, a stranger's for a
    peer the ledger has never seen (never tried on purpose: stake is what earns trials, and
    identities cost nothing; the client keeps such peers on probation, ``on_probation``)."""
    if account is None:
        return STRANGER
    if account.stake > 0 and account.deadlines_met + account.deadlines_missed < HISTORY_STEPS:
        return None
    return account.reputation


def without_standing(account: Account | None) -> bool:
    """Neither stake nor history (under ``HISTORY_STEPS`` decode deadlines on record): on
    probation, what a fresh identity is and so what a Sybil is (docs/discovery.md)."""
    return account is None or (account.stake <= 0 and account.deadlines_met + account.deadlines_missed < HISTORY_STEPS)


def arithmetic_mismatch(mine: Arithmetic | None, advertised: str | None) -> str | None:
    """Why a peer's advertised arithmetic settings keep it off our paths (None: they match)."""
    if mine is None:
        return None
    try:
        theirs = Arithmetic.from_text(advertised or "")
    except ValueError:
        return "it does not advertise valid arithmetic settings (an older or foreign node)"
    return "; ".join(mine.differences(theirs)) or None


class PeerDirectory:
    """The split client's view of the swarm (implements ``split.peersource.PeerSource``).

    Only peers whose arithmetic settings equal ``arithmetic`` (the client's) are offered to
    the planner; the others are listed by ``incompatible()`` with the reason.
    ``layer_bytes_mb``: KV memory one layer of one request needs (planner's memory check).
    ``account``: agent id -> its ``ledger.accounts.Account`` or None (never seen), e.g.
    ``Accounts.known``; None: no ledger (every peer a stranger).
    """

    def __init__(self, agent: Agent, model_hash: str, arithmetic: Arithmetic | None = None,
                 layer_bytes_mb: float | None = None, account: Callable[[str], Account | None] | None = None):
        self.agent = agent
        self.model_hash = model_hash
        self.arithmetic = arithmetic
        self.layer_bytes_mb = layer_bytes_mb
        self.account = account
        self._links: dict[str, PeerLink] = {}

    def _serving(self):
        """(entry, ranges) of every peer serving this model."""
        for entry in self.agent.table.peers():
            c = entry.caps
            ranges = tuple((s, e) for h, s, e in c.shards if self.model_hash.startswith(h))
            if ranges and c.role == "peer":
                yield entry, ranges

    def _kept_off(self, caps) -> str | None:
        """Why a serving peer is never routed to (None: it may be)."""
        reason = arithmetic_mismatch(self.arithmetic, caps.arithmetic)
        if reason is not None:
            return reason
        account = self.account(caps.agent_id) if self.account is not None else None
        if account is not None and account.reputation < MIN_REPUTATION:
            return f"reputation {account.reputation:.2f} is below {MIN_REPUTATION} (`edge-agent ledger reputation`)"
        return None

    def capabilities(self) -> list[PeerCapability]:
        caps = []
        for entry, ranges in self._serving():
            c = entry.caps
            if self._kept_off(c) is not None:
                continue
            link = self._links.get(c.agent_id)
            rtt = link.rtt_ms if link is not None and link.rtt_ms is not None else 1.0
            account = self.account(c.agent_id) if self.account is not None else None
            caps.append(PeerCapability(c.agent_id, ranges, float(c.free_mem_mb), max(c.ms_per_layer, 0.001), rtt,
                                       layer_bytes_mb=self.layer_bytes_mb, reputation=planner_reputation(account)))
        return caps

    def on_probation(self, peer_id: str) -> bool:
        """True for a peer without standing in this agent's ledger, in an open swarm. Nobody is
        with the ledger off (no stake exists, so no peer could earn its way out: behaviour as
        before) nor in a private swarm (its key already vets who may join: docs/discovery.md)."""
        if self.account is None or not self.agent.swarm.is_open:
            return False
        return without_standing(self.account(peer_id))

    def speculates(self, peer_id: str) -> bool:
        """True when the peer's record says it serves speculative steps (REWIND, DRAFT): a node
        older than them refuses the flags, which would read as a failure."""
        entry = self.agent.table.get(peer_id)
        return entry is not None and entry.caps.has_feature(FEATURE_SPECULATION)

    def incompatible(self) -> list[IncompatiblePeer]:
        out = []
        for entry, ranges in self._serving():
            reason = self._kept_off(entry.caps)
            if reason is not None:
                out.append(IncompatiblePeer(entry.caps.agent_id, ranges, reason))
        return out

    def address(self, peer_id: str) -> tuple[str, int]:
        entry = self.agent.table.get(peer_id)
        if entry is None or not entry.caps.tls_port:
            raise HopFailed(peer_id, "no direct (TLS) address for chain forwarding", ErrorCode.UNREACHABLE)
        return (entry.addresses or ["127.0.0.1"])[0], entry.caps.tls_port

    async def wait_for_coverage(self, n_layer: int, policy, timeout_s: float) -> bool:
        """Wait (bounded) until the discovered peers the policy admits cover the remote layers."""
        from edge_agent.split.joining import coverage

        lo, hi = policy.remote_range(n_layer)
        if policy.trusted is not None and not policy.trusted:
            return False  # no peer may take them (--privacy local, or an empty trust list)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            cov = coverage(n_layer, [c for c in self.capabilities() if policy.admits(c.peer_id)])
            if all(c > 0 for c in cov[lo:hi]):
                return True
            await asyncio.sleep(0.2)
        return False

    async def link(self, peer_id: str) -> PeerLink:
        link = self._links.get(peer_id)
        if link is not None and link.alive:
            return link
        entry = self.agent.table.get(peer_id)
        if entry is None:
            raise HopFailed(peer_id, "peer is no longer in the peer table", ErrorCode.PEER_LOST)
        channel = await self._connect(entry)
        link = PeerLink(peer_id, channel, on_traffic=self.agent.table.heartbeat)
        try:
            info = await link.info(timeout_s=5.0)  # measures the RTT the planner uses
        except Exception as exc:  # noqa: BLE001 - surfaced as a failed hop by the caller
            log.info("info from %s failed: %s", peer_id[:12], exc)
            info = {}
        reason = self._served_mismatch(info)
        if reason is not None:
            await link.close()
            raise HopFailed(peer_id, f"other arithmetic settings: {reason}", ErrorCode.INCOMPATIBLE)
        self._links[peer_id] = link
        return link

    def _served_mismatch(self, info: dict) -> str | None:
        """What the node says it runs must match too (its advert could be stale)."""
        for shard in info.get("shards") or []:
            if isinstance(shard, dict) and self.model_hash.startswith(str(shard.get("model_hash", ""))[:16]):
                reason = arithmetic_mismatch(self.arithmetic, shard.get("arith"))
                if reason is not None:
                    return reason
        return None

    async def _connect(self, entry):
        from edge_agent.transport import relay, tls, webrtc

        c, mode = entry.caps, self.agent.config.transport
        routes = relay.routes(self.agent.table, c) if mode in ("auto", "tls") else []  # last resort: a relay member
        limit = {"timeout": relay.DIRECT_TIMEOUT_S} if routes else {}  # a dead address must not stall it long
        errors = []
        for host in entry.addresses or ["127.0.0.1"]:
            if mode in ("auto", "tls") and c.tls_port:
                try:
                    return await tls.connect(self.agent.identity, self.agent.swarm, host, c.tls_port, expect_peer_id=c.agent_id,
                                             **limit)
                except (TransportError, OSError) as exc:
                    errors.append(f"tls {host}:{c.tls_port}: {exc}")
            if mode in ("auto", "webrtc") and c.signal_port:
                try:
                    return await webrtc.connect(self.agent.identity, self.agent.swarm, host, c.signal_port,
                                                ice_servers=self.agent.config.ice_servers, expect_peer_id=c.agent_id, **limit)
                except (TransportError, OSError) as exc:
                    errors.append(f"webrtc {host}:{c.signal_port}: {exc}")
        for relay_id, host, port in routes:
            try:
                return await relay.dial(self.agent.identity, self.agent.swarm, host, port, relay_id, c.agent_id)
            except (TransportError, OSError) as exc:
                errors.append(f"relay {relay_id[:12]} at {host}:{port}: {exc}")
        raise HopFailed(entry.agent_id, "cannot connect: " + "; ".join(errors), "unreachable")

    async def close(self) -> None:
        for link in self._links.values():
            await link.close()


async def fetch_weights(agent: Agent, model_hash: str, layers: tuple[int, int], dest: Path, on_progress=None,
                        timeout_s: float = 30.0) -> Path:
    """Find a peer that shares this model's weights and fetch ``layers`` from it (verified tensor by tensor)."""
    from edge_agent.split.weights import WeightsError, fetch_shard

    a, b = layers
    final = dest / f"{model_hash[:16]}-{a}-{b}.gguf"
    if final.is_file():
        return final  # fetched (and verified) before

    directory = PeerDirectory(agent, model_hash)
    deadline = time.monotonic() + timeout_s
    failures: dict[str, str] = {}
    try:
        while time.monotonic() < deadline:
            for entry in agent.table.peers():
                c = entry.caps
                if c.agent_id in failures or dict(c.extra).get("w") != "1":
                    continue
                if not any(model_hash.startswith(h) for h, _, _ in c.shards):
                    continue
                try:
                    link = await directory.link(c.agent_id)
                    return await fetch_shard(link, model_hash, a, b, dest, on_progress)
                except (HopFailed, WeightsError) as exc:  # a dead or lying peer: try the next one
                    failures[c.agent_id] = str(exc)
                    log.warning("weights from %s refused: %s", c.agent_id[:12], exc)
            await asyncio.sleep(0.2)
    finally:
        await directory.close()
    if failures:
        raise WeightsError("no peer gave verifiable weights: " + "; ".join(f"{k[:12]}: {v}" for k, v in failures.items()))
    raise TimeoutError(f"no peer sharing the weights of model {model_hash[:16]} was found in {timeout_s:.0f} s")
