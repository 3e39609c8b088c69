"""With node_join.py, the one place that wires engine + discovery + transport + planner.

``Agent`` is a running edge-agent: identity, swarm key, peer table (mDNS + manual peers),
transport listeners and, when it shares compute, a hop server. ``node_join.join`` builds a node
that serves layers; ``swarm_client`` builds an agent with a ``SwarmClient`` (what ``run`` and any
long-lived server use); ``directory.PeerDirectory`` is the client's view of the peer table.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
from contextlib import asynccontextmanager
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, AsyncIterator

from edge_agent.discovery.capabilities import Capabilities
from edge_agent.discovery.identity import Identity, SwarmKey
from edge_agent.discovery.dht import Dht
from edge_agent.discovery.membership import Membership
from edge_agent.discovery.peers import PeerTable
from edge_agent.directory import PeerDirectory
from edge_agent.runtime.compute_class import compute_class
from edge_agent.runtime.engine import EngineOptions
from edge_agent.split.links import PeerLink
from edge_agent.transport import relay

if TYPE_CHECKING:
    from edge_agent.split.thin import ThinModel

log = logging.getLogger(__name__)


@dataclass
class AgentConfig:
    data_dir: Path
    swarm_secret: str | None = field(default=None, repr=False)  # a secret: never in a repr or log line
    host: str = "0.0.0.0"  # where the TLS and signalling listeners bind
    tls_port: int = 0  # 0 = any free port
    signal_port: int = 0
    mdns: bool = True
    interfaces: list[str] | None = None  # zeroconf interfaces (None = all)
    manual_peers: list[tuple[str, int]] = field(default_factory=list)  # TLS host:port
    bootstrap: list[tuple[str, int]] = field(default_factory=list)  # TLS host:port of members: learn the swarm (gossip)
    membership: str = "gossip"  # or "dht": large swarms, a client learns only who serves its layers (discovery/dht.py)
    transport: str = "auto"  # auto | tls | webrtc
    ice_servers: list[str] = field(default_factory=list)  # STUN/TURN URLs, only if the user gives them
    relay: bool = False  # carry circuits for members nobody can dial (transport/relay.py; bounds: RelayLimits)
    relay_via: list[tuple[str, int]] = field(default_factory=list)  # TLS host:port of relays to keep a reservation at
    # signed commitments/receipts in <data_dir>/ledger.db, synced with peers (EDGE_AGENT_LEDGER=off: none)
    ledger: bool = field(default_factory=lambda: os.environ.get("EDGE_AGENT_LEDGER", "on") != "off")


class Agent:
    def __init__(self, config: AgentConfig):
        self.config = config
        self.identity = Identity.load_or_create(config.data_dir)
        self.swarm = SwarmKey.resolve(config.swarm_secret, config.data_dir)
        self.table = PeerTable(self.swarm, self_id=self.identity.agent_id)
        self.server = None  # HopServer when sharing compute
        self.caps: Capabilities | None = None
        self._closers: list = []
        self._browser = None
        self._advertiser = None
        gossip = config.membership == "gossip"
        self.membership = Membership(self.identity, self.swarm, self.table, self._connect_tls,
                                     bootstrap=config.bootstrap if gossip else ())
        self.dht = None if gossip else Dht(self.membership, bootstrap=config.bootstrap)  # rides gossip's listener hook
        self.relay = relay.RelayService() if config.relay else None
        self.reservations: list[relay.Reservation] = []
        self._unsealed: Capabilities | None = None  # what serve() advertises, before the relays are named
        self._addresses: list[str] = []

    async def _connect_tls(self, host: str, port: int, expect_peer_id: str | None):
        from edge_agent.transport import tls

        return await tls.connect(self.identity, self.swarm, host, port, expect_peer_id=expect_peer_id)

    async def start(self) -> None:
        await self.membership.start()  # silent until there is a bootstrap address or a gossiping peer
        if self.dht is not None:
            await self.dht.start()
        for host, port in self.config.manual_peers:
            self.table.add_manual_peer(host, port)
        self.table.start(probe=self._probe if self.config.manual_peers else None)
        if self.config.mdns:
            from edge_agent.discovery.mdns import MdnsBrowser

            self._browser = MdnsBrowser(self.table, interfaces=self.config.interfaces)
            await self._browser.start()

    async def serve(self, server, caps: Capabilities) -> Capabilities:
        """Share compute: listen on TLS and WebRTC, advertise ``caps`` (ports filled in).

        ``server`` is a HopServer built with ``info_extra=agent.info_extra`` and
        ``connect=agent.connect_next``."""
        from edge_agent.transport import tls, webrtc

        self.server = server
        await server.start()
        handler = self.membership.wrap(server.handle)  # membership exchanges are answered here
        tls_srv = await tls.listen(self.identity, self.swarm, self.config.host, self.config.tls_port,
                                   self.relay.wrap(handler) if self.relay else handler)
        rtc_srv = await webrtc.listen(self.identity, self.swarm, self.config.host, self.config.signal_port, server.handle,
                                      ice_servers=self.config.ice_servers)
        self._closers += [tls_srv.close, rtc_srv.close] + ([self.relay.close] if self.relay else [])
        self.reservations = [relay.Reservation(self.identity, self.swarm, h, p, handler, self._relays_changed)
                             for h, p in self.config.relay_via]  # circuits reach the hop server like listener channels
        for r in self.reservations:
            await r.start()
            self._closers.append(r.close)
        await asyncio.gather(*(r.wait_reserved(relay.RelayLimits.setup_timeout_s) for r in self.reservations))
        from edge_agent.discovery.mdns import local_addresses

        wildcard = self.config.host in ("0.0.0.0", "::")
        self._addresses = local_addresses(self.config.interfaces) if wildcard else [self.config.host]
        self._unsealed = caps.with_changes(tls_port=tls_srv.port, signal_port=rtc_srv.port)
        self.caps = self._with_relays()
        self.membership.advertise(self.caps, self._addresses)
        if self.config.mdns:
            from edge_agent.discovery.mdns import MdnsAdvertiser

            addresses = [self.config.host] if self.config.host not in ("0.0.0.0", "::") else None
            self._advertiser = MdnsAdvertiser(self.caps, interfaces=self.config.interfaces, addresses=addresses)
            await self._advertiser.start()
        return self.caps

    def _with_relays(self) -> Capabilities:
        """Our sealed record naming the relays that hold a reservation for us (as many as fit)."""
        n = relay.MAX_ADVERTISED
        while True:
            caps = relay.with_relays(self._unsealed, self.reservations, n).sealed(self.identity, self.swarm)
            try:
                caps.to_txt()  # within the record's size bound
                return caps
            except ValueError:
                if n == 0:
                    raise
                n -= 1

    def _relays_changed(self) -> None:
        """A reservation came up or went down: re-advertise (gossip and mDNS) what peers should dial."""
        if self._unsealed is None or self.caps is None:
            return  # serve() names them once it has waited for the first reservations
        caps = self._with_relays()
        if caps.extra != self.caps.extra:
            self.caps = caps
            self.membership.advertise(caps, self._addresses)
            if self._advertiser is not None:
                self._advert_update = asyncio.get_running_loop().create_task(self._advertiser.update(caps))

    async def connect_next(self, peer_id: str, host: str, port: int) -> PeerLink:
        """Chain mode: a hop opens its own authenticated link to the next hop."""
        from edge_agent.transport import tls

        return PeerLink(peer_id, await tls.connect(self.identity, self.swarm, host, port, expect_peer_id=peer_id))

    def open_ledger(self):
        """This agent's ledger (closed with the agent), or None when it keeps none."""
        if not self.config.ledger:
            return None
        from edge_agent.ledger.background import Ledger

        ledger = Ledger.open(self.config.data_dir, self.identity, self.swarm)
        self._closers.append(ledger.close)
        ledger.start_sync(lambda: [(e.caps.agent_id, (e.addresses or ["127.0.0.1"])[0], e.caps.tls_port)
                                   for e in self.table.peers() if e.caps.tls_port])
        return ledger

    def info_extra(self) -> dict:
        return {"caps": base64.b64encode(self.caps.to_txt()).decode()} if self.caps else {}

    async def _probe(self, host: str, port: int) -> Capabilities:
        """A manual peer (--peer HOST:PORT): ask it over TLS for its signed capability record."""
        from edge_agent.transport import tls

        ch = await tls.connect(self.identity, self.swarm, host, port)
        try:
            link = PeerLink(ch.peer_id, ch)
            info = await link.info(timeout_s=3.0)
            caps = Capabilities.from_txt(base64.b64decode(info.get("caps", "")))
            if caps.agent_id != ch.peer_id:
                raise ValueError("capability record of another agent")
            return caps
        finally:
            await ch.close()

    async def close(self) -> None:
        await self.membership.close()
        if self.dht is not None:
            await self.dht.close()
        if self._advertiser is not None:
            await self._advertiser.close()
        if self._browser is not None:
            await self._browser.close()
        await self.table.close()
        if self.server is not None:
            await self.server.stop()
        for close in self._closers:
            res = close()
            if asyncio.iscoroutine(res) or isinstance(res, asyncio.Future):
                try:
                    await res
                except Exception:  # noqa: BLE001 - closing anyway
                    pass


# -- run: generate through the swarm --------------------------------------------------------

def kv_mb_per_layer(info, options: EngineOptions) -> float:
    """KV-cache memory one layer of one request takes (the planner's per-layer memory cost)."""
    n_embd_kv = info.n_embd * info.n_head_kv // max(1, info.n_head)
    bytes_per_value = {"f32": 4.0, "f16": 2.0, "q8_0": 34 / 32}[options.kv_type]
    return max(1e-6, options.n_ctx_per_request * n_embd_kv * 2 * bytes_per_value / 1e6)


@asynccontextmanager
async def swarm_client(config: AgentConfig, model: "Path | ThinModel", client_config, options: EngineOptions, *,
                       discover_s: float = 5.0, audit_rate: float | None = None) -> AsyncIterator:
    """An agent on the swarm and a ``SwarmClient`` for ``model`` (shared by ``run`` and servers).

    ``model``: a whole model's GGUF, or a ``split.thin.ThinModel`` (head and tail shards only).

    Waits (at most ``discover_s``) for peers covering the remote layers. The client routes only
    to peers whose arithmetic settings equal ``options``' on ``client_config.backend``."""
    from edge_agent.runtime.backends import resolve_backend
    from edge_agent.runtime.shards import inspect_model
    from edge_agent.split.client import SwarmClient
    from edge_agent.split.thin import ThinModel

    thin = isinstance(model, ThinModel)  # head and tail shards only: no local layers, no audits
    info = await asyncio.to_thread(inspect_model, model.head if thin else model)  # a shard's shapes are the model's
    model_hash, n_layer = (model.model_hash, model.n_layer) if thin else (info.model_hash, info.n_layer)
    arithmetic = options.arithmetic(resolve_backend(client_config.backend))
    if client_config.policy_for is None:  # resolved per request: a `trust add` applies to the next one
        client_config = dataclasses.replace(client_config, policy_for=_policies(config, client_config.policy))
    agent = Agent(config)
    if agent.dht is not None:
        agent.dht.want(model_hash, 0, n_layer - 1)  # the segment keys of this model's layers
    try:
        await agent.start()
    except BaseException:  # what started (membership, mDNS) must not outlive a failed start
        await agent.close()
        raise
    directory = PeerDirectory(agent, model_hash, arithmetic, kv_mb_per_layer(info, options))
    client = ledger = auditor = None
    try:
        await directory.wait_for_coverage(n_layer, client_config.policy, discover_s)
        if thin:
            client = await asyncio.to_thread(SwarmClient.from_shards, model, directory, client_config, options)
        else:
            client = await SwarmClient.create(model, directory, client_config, options, config.data_dir / "shards")
        ledger = client.ledger = agent.open_ledger()
        if ledger is not None:  # checks the hops' commitments and countersigns receipts after each request
            from edge_agent.ledger.accounts import Accounts

            accounts = Accounts(ledger.store)
            await asyncio.to_thread(accounts.refresh)  # the first read decodes every receipt: off the event loop
            directory.account = accounts.known  # the planner's input (reputation, newcomers); evidence keeps a peer off
            recorder = ledger.client_recorder(model_hash, info.n_embd)
            client.observers.add(recorder.observe)
            request_for = ledger.requester_via(directory.link)
            client.end_hooks.append(lambda end: recorder.request_ended(*end, request_for=request_for))
            auditor = None if thin else _auditor(agent, ledger, model, options, audit_rate, resolve_backend(client_config.backend))
            if auditor is not None:
                client.auditor = auditor  # its outcomes, for telemetry and tests
                client.observers.add(auditor.observe)
                recorder.on_commitments = auditor.on_commitments
                recorder.on_settled = auditor.on_settled  # chain-mode hops are audited together
                client.verifier = _verifier(recorder, auditor)
        if client_config.verify and client.verifier is None:
            from edge_agent.split.verified import VerifyError

            raise VerifyError("--verify needs audits: an --audit-rate above 0 and the ledger (EDGE_AGENT_LEDGER=off turns it off)")
        yield client
    finally:
        if auditor is not None:  # audits start once receipts are in, and their evidence goes out with the last sync
            await recorder.drain()
            await auditor.drain()
            auditor.close()
        if ledger is not None:
            await ledger.finish_client(recorder, directory.address)
        if client is not None:
            client.close()
        await directory.close()
        await agent.close()


def _policies(config: AgentConfig, default):
    """Privacy level -> policy with ``default``'s k and m: ``default`` itself for its own level (as
    the caller gave it), the trust list of ``config.data_dir`` for a tighter one."""
    from edge_agent.discovery.trust import privacy_policy

    return lambda level: default if level == default.name else privacy_policy(level, default.k, default.m,
                                                                               config.data_dir, config.swarm_secret)


def _verifier(recorder, auditor):
    """``SwarmClient.verifier``: a request's earliest fault once its audits ran: a failed audit, or a
    hop whose commitments did not check out (its work cannot be checked: as good as a lie)."""
    from edge_agent.ledger.audit import AuditIncomplete
    from edge_agent.split.verified import Fault, VerifyError

    async def verify(request_id: str):
        try:
            unchecked = await recorder.finished(request_id)  # its receipts' commitments start its audits
            failed = await auditor.fault(request_id)
        except (AuditIncomplete, TimeoutError) as exc:
            raise VerifyError(f"the answer could not be verified: {exc}") from None
        faults = [Fault(*f) for f in [*unchecked, *([failed] if failed else [])]]
        return min(faults, key=lambda f: f.position) if faults else None

    return verify


def _auditor(agent, ledger, model: Path, options: EngineOptions, rate: float | None, backend: str):
    """Audits of the hops' chunks (docs/accountability.md), re-executed here on the runtime the
    path runs (``backend``, as every peer of it must: the arithmetic settings match), so a peer
    of this device's compute class is held to the tight tolerance (``ledger.audit.Auditor.tier``)."""
    from edge_agent.ledger.audit import DEFAULT_RATE, Auditor
    from edge_agent.runtime.backends import load_engine

    rate = DEFAULT_RATE if rate is None else rate
    if rate <= 0.0:
        return None
    shards = agent.config.data_dir / "shards"

    def class_of(peer_id: str) -> str | None:  # the tolerance tier follows the class the peer advertises
        entry = agent.table.get(peer_id)
        return entry.caps.compute_class if entry is not None else None

    return Auditor(agent.identity, ledger.store, lambda a, b: load_engine(backend, model, a, b, options, shards),
                   rate=rate, own_class=compute_class(backend, options.gpu_layers), class_of=class_of)


async def run(config: AgentConfig, model: Path, prompt_tokens_fn, params, client_config, *, discover_s: float = 5.0,
              n_ctx: int = 2048, options: EngineOptions | None = None, on_token=None, audit_rate: float | None = None,
              privacy: str | None = None):
    """Discover peers, plan, and generate one completion through the swarm.

    ``prompt_tokens_fn(tokenizer)`` gives the prompt's token ids; ``options`` (default: ``n_ctx``
    positions) are this device's engine settings, arithmetic included; ``privacy``: this
    request's level, tightening ``client_config.policy``."""
    options = options or EngineOptions(n_ctx_per_request=n_ctx, max_requests=2)
    async with swarm_client(config, model, client_config, options, discover_s=discover_s, audit_rate=audit_rate) as client:
        return await client.generate(prompt_tokens_fn(client.tokenizer), params, on_token, privacy=privacy)
