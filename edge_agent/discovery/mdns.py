"""LAN discovery over mDNS/DNS-SD (python-zeroconf, asyncio API).

Why the liveness machinery: a peer that unregisters sends a goodbye and vanishes from
browsers at once, but a SIGKILLed peer sends nothing, and python-zeroconf's browser
clamps PTR TTLs to >= 1125 s, so the browser alone would show a dead peer for ~19
minutes.  We therefore publish SRV/TXT/A with a short TTL (`DEFAULT_TTL_S`) and re-resolve
every known instance each `refresh_s`: while the cache is fresh that costs nothing, once
it expires it is a real query.  The time each answer was *received* (cache record
creation time) feeds `PeerTable.last_seen`, and the table drops peers silent for longer
than `stale_after_s`.  Bound after SIGKILL: <= stale_after_s + refresh_s (8 s default;
see docs/discovery.md for measurements).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable, Sequence

from zeroconf import IPVersion, RecordUpdate, RecordUpdateListener, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from edge_agent.discovery.capabilities import Capabilities, CapabilityDecodeError
from edge_agent.discovery.peers import PeerTable

log = logging.getLogger(__name__)

SERVICE_TYPE = "_edge-agent._tcp.local."
DEFAULT_TTL_S = 4  # SRV/TXT/A TTL we publish: how long a dead peer's records stay fresh
DEFAULT_REFRESH_S = 1.0  # re-resolution tick
DEFAULT_QUERY_TIMEOUT_S = 1.0
REJECT_RETRY_S = 30.0  # other swarms / bad records: look again rarely
DEAD_RETRY_S = 2.5  # a name that stopped answering may come back: retry with backoff
DEAD_RETRY_MAX_S = 30.0
FORGET_AFTER_S = 3600.0
MAX_NAMES = 1024
_TYPE_TXT, _TYPE_SRV, _CLASS_IN = 16, 33, 1
_NAME_ID_CHARS = 24  # instance label "ea-<first 24 hex of agent id>" (96 bits)

Interfaces = Sequence[str | int] | None


def instance_name(agent_id: str) -> str:
    return f"ea-{agent_id[:_NAME_ID_CHARS]}.{SERVICE_TYPE}"


def open_zeroconf(interfaces: Interfaces = None) -> AsyncZeroconf:
    """One AsyncZeroconf for an agent (share it between advertiser and browser).

    None means zeroconf's default (all interfaces, IPv4); tests pass ["127.0.0.1"].
    """
    if interfaces is None:
        return AsyncZeroconf()
    ifs = list(interfaces)
    v6 = any(":" in str(i) for i in ifs)
    return AsyncZeroconf(interfaces=ifs, ip_version=IPVersion.All if v6 else IPVersion.V4Only)


def local_addresses(interfaces: Interfaces = None) -> list[str]:
    """Addresses to put in our A/AAAA records: the given IPs, else every non-loopback IPv4."""
    if interfaces is not None:
        ips = [str(i) for i in interfaces if isinstance(i, str)]
        if ips:
            return ips
    import ifaddr  # a zeroconf dependency

    out = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str) and not ip.ip.startswith("127."):
                out.append(ip.ip)
    return out or ["127.0.0.1"]


class MdnsAdvertiser:
    """Publishes our sealed Capabilities as `_edge-agent._tcp` and keeps them current."""

    def __init__(self, caps: Capabilities, *, interfaces: Interfaces = None,
                 addresses: Sequence[str] | None = None, ttl_s: int = DEFAULT_TTL_S,
                 aiozc: AsyncZeroconf | None = None) -> None:
        self._caps = caps
        self._interfaces = interfaces
        self._addresses = list(addresses) if addresses else local_addresses(interfaces)
        self._ttl = int(ttl_s)
        self._aiozc = aiozc
        self._own = aiozc is None
        self._info: AsyncServiceInfo | None = None

    @property
    def caps(self) -> Capabilities:
        return self._caps

    def _make_info(self, caps: Capabilities) -> AsyncServiceInfo:
        short = caps.agent_id[:_NAME_ID_CHARS]
        return AsyncServiceInfo(
            SERVICE_TYPE, instance_name(caps.agent_id),
            port=caps.signal_port or caps.tls_port, properties=caps.to_txt(),
            server=f"ea-{short}.local.", host_ttl=self._ttl, other_ttl=self._ttl,
            parsed_addresses=self._addresses)

    async def start(self) -> None:
        if self._info is not None:
            return
        if self._aiozc is None:
            self._aiozc = open_zeroconf(self._interfaces)
        info = self._make_info(self._caps)
        await (await self._aiozc.async_register_service(info))
        self._info = info

    async def update(self, caps: Capabilities) -> None:
        """Re-announce changed capabilities (same agent id) to every browser."""
        if caps.agent_id != self._caps.agent_id:
            raise ValueError("update() cannot change the agent id; start a new advertiser")
        info = self._make_info(caps)  # validates (sealed, size) before touching the network
        self._caps = caps
        if self._info is not None and self._aiozc is not None:
            await (await self._aiozc.async_update_service(info))
            self._info = info

    async def close(self) -> None:
        """Send goodbyes (TTL 0) so browsers drop us at once; idempotent."""
        info, self._info = self._info, None
        aiozc = self._aiozc
        if aiozc is None:
            return
        if info is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(await aiozc.async_unregister_service(info), 3.0)
        if self._own:
            self._aiozc = None
            await aiozc.async_close()

    async def __aenter__(self) -> "MdnsAdvertiser":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


@dataclass
class _Name:
    agent_id: str | None = None
    next_try: float = 0.0
    first_fail: float | None = None
    fails: int = 0
    busy: bool = False


class MdnsBrowser(RecordUpdateListener):
    """Feeds a PeerTable from mDNS: resolves, checks and keeps re-resolving instances."""

    def __init__(self, table: PeerTable, *, interfaces: Interfaces = None,
                 aiozc: AsyncZeroconf | None = None, refresh_s: float = DEFAULT_REFRESH_S,
                 query_timeout_s: float = DEFAULT_QUERY_TIMEOUT_S) -> None:
        self.table = table
        self._interfaces = interfaces
        self._aiozc = aiozc
        self._own = aiozc is None
        self.refresh_s = refresh_s
        self.query_timeout_s = query_timeout_s
        self._names: dict[str, _Name] = {}
        self._browser: AsyncServiceBrowser | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        if self._browser is not None:
            return
        if self._aiozc is None:
            self._aiozc = open_zeroconf(self._interfaces)
        self._browser = AsyncServiceBrowser(self._aiozc.zeroconf, SERVICE_TYPE,
                                            handlers=[self._on_change])
        self._aiozc.zeroconf.async_add_listener(self, None)
        self._loop_task = asyncio.get_running_loop().create_task(self._refresh_loop())

    async def close(self) -> None:
        browser, self._browser = self._browser, None
        tasks = [t for t in (self._loop_task, *self._tasks) if t is not None]
        self._loop_task = None
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if browser is not None:
            with contextlib.suppress(Exception):
                await browser.async_cancel()
            if self._aiozc is not None:
                self._aiozc.zeroconf.async_remove_listener(self)
        if self._own and self._aiozc is not None:
            aiozc, self._aiozc = self._aiozc, None
            await aiozc.async_close()

    async def __aenter__(self) -> "MdnsBrowser":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # zeroconf calls this synchronously inside the event loop
    def _on_change(self, zeroconf: Any, service_type: str, name: str,
                   state_change: ServiceStateChange) -> None:
        if state_change is ServiceStateChange.Removed:
            st = self._names.pop(name, None)
            if st is not None and st.agent_id is not None:
                self.table.remove(st.agent_id, "goodbye")
            return
        st = self._names.get(name)
        if st is None:
            if len(self._names) >= MAX_NAMES:
                return
            st = self._names[name] = _Name()
        st.next_try = 0.0  # new or changed records: look now
        self._spawn(name, st)

    def async_update_records(self, zc: Zeroconf, now: float, records: list[RecordUpdate]) -> None:
        """A known-but-dropped instance answered or re-announced (e.g. restarted under the
        same name while its clamped PTR is still cached, so the browser fires nothing):
        resolve it on the next tick instead of waiting for the retry backoff."""
        for update in records:
            rec = update.new
            if rec.type in (_TYPE_SRV, _TYPE_TXT) and rec.ttl:
                st = self._names.get(rec.name)
                if (st is not None and st.agent_id is not None and st.agent_id not in self.table
                        and st.agent_id != self.table.self_id):
                    st.next_try = 0.0

    def async_update_records_complete(self) -> None:
        """Nothing to do once the batch is cached; the refresh tick picks it up."""

    def _spawn(self, name: str, st: _Name) -> None:
        if st.busy:
            return
        st.busy = True
        task = asyncio.get_running_loop().create_task(self._resolve(name, st))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _refresh_loop(self) -> None:
        while True:
            now = time.monotonic()
            for name, st in list(self._names.items()):
                if st.first_fail is not None and now - st.first_fail > FORGET_AFTER_S:
                    del self._names[name]
                elif now >= st.next_try:
                    self._spawn(name, st)
            self.table.expire()
            await asyncio.sleep(self.refresh_s)

    async def _resolve(self, name: str, st: _Name) -> None:
        try:
            await self._resolve_inner(name, st)
        except Exception:  # never let one bad record kill discovery
            log.exception("resolving %s failed", name)
            st.next_try = time.monotonic() + REJECT_RETRY_S
        finally:
            st.busy = False

    async def _resolve_inner(self, name: str, st: _Name) -> None:
        assert self._aiozc is not None
        zc = self._aiozc.zeroconf
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        ok = await info.async_request(zc, self.query_timeout_s * 1000)
        now = time.monotonic()
        if not ok or not info.text:
            if st.first_fail is None:
                st.first_fail = now
            if st.agent_id is not None and st.agent_id in self.table:
                st.next_try = now  # still listed: keep asking every tick until it expires
            else:  # gone: it may come back under the same name, ask with backoff
                st.fails += 1
                st.next_try = now + min(DEAD_RETRY_MAX_S, DEAD_RETRY_S * 2 ** min(st.fails, 8))
            return
        st.first_fail, st.fails = None, 0
        caps = self._check(name, info.text)
        if caps is None:
            st.next_try = now + REJECT_RETRY_S
            return
        if caps.agent_id == self.table.self_id:
            st.agent_id, st.next_try = caps.agent_id, now + FORGET_AFTER_S
            return
        if st.agent_id is not None and st.agent_id != caps.agent_id:
            self.table.remove(st.agent_id, "replaced")
        st.agent_id = caps.agent_id
        seen_at = self._received_at(name, now)
        self.table.upsert(caps, info.parsed_addresses(), "mdns", seen_at=seen_at)
        st.next_try = now  # re-check next tick (free while the cache is fresh)

    def _received_at(self, name: str, now: float) -> float:
        """When the peer last answered: the cache creation time of its SRV/TXT records.

        Only meaningful for short TTLs: a record with a TTL longer than the table's
        staleness window is served from cache without asking the peer, so for such a
        (non-standard) publisher we fall back to `now` rather than flapping it in and out;
        its liveness bound then degrades to its own TTL.
        """
        assert self._aiozc is not None
        cache = self._aiozc.zeroconf.cache
        recs = [r for t in (_TYPE_SRV, _TYPE_TXT)
                if (r := cache.get_by_details(name, t, _CLASS_IN)) is not None]
        window = self.table.stale_after_s - self.refresh_s - self.query_timeout_s
        if not recs or max(r.ttl for r in recs) > window:
            return now
        return max(r.created for r in recs) / 1000

    def _check(self, name: str, text: bytes) -> Capabilities | None:
        try:
            caps = Capabilities.from_txt(text)
        except CapabilityDecodeError as exc:
            log.debug("ignoring %s: %s", name, exc)
            return None
        if caps.swarm_tag != self.table.swarm_key.tag():
            return None  # another swarm: silently invisible
        if name.lower() != instance_name(caps.agent_id).lower():
            log.debug("ignoring %s: name does not match agent id", name)
            return None
        if not caps.verify(self.table.swarm_key):
            self.table.rejected += 1
            log.info("ignoring %s: bad signature or swarm MAC", name)
            return None
        return caps


def install_shutdown_handler(*closers: Callable[[], Awaitable[Any]],
                             signals: Iterable[int] = (signal.SIGTERM, signal.SIGINT)
                             ) -> asyncio.Event:
    """On SIGTERM/SIGINT run `closers` in order (e.g. advertiser.close: goodbye packets),
    then set the returned event; the main coroutine awaits it and exits."""
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    state = {"started": False}

    async def shutdown() -> None:
        try:
            for close in closers:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(close(), 5.0)
        finally:
            done.set()

    def on_signal() -> None:
        if not state["started"]:
            state["started"] = True
            loop.create_task(shutdown())

    for sig in signals:
        loop.add_signal_handler(sig, on_signal)
    return done


async def list_peers(data_dir: str | Path, swarm_key: Any, timeout_s: float = 3.0,
                     interfaces: Interfaces = None, include_self: bool = False
                     ) -> list[dict[str, Any]]:
    """Browse for `timeout_s` and return the peers of our swarm as JSON-friendly dicts.

    `swarm_key` is a SwarmKey, or a secret string / None resolved like the CLI does
    (--swarm-key, then $EDGE_AGENT_SWARM_KEY, then data_dir/swarm.key, else open).
    """
    from edge_agent.discovery.identity import Identity, SwarmKey

    if not isinstance(swarm_key, SwarmKey):
        swarm_key = SwarmKey.resolve(swarm_key, Path(data_dir))
    self_id = None if include_self else Identity.load_or_create(Path(data_dir)).agent_id
    table = PeerTable(swarm_key, self_id=self_id)
    browser = MdnsBrowser(table, interfaces=interfaces)
    try:
        await browser.start()
        await asyncio.sleep(max(0.0, timeout_s))
    finally:
        await browser.close()
    now = time.monotonic()
    return [e.to_dict(now) for e in table.peers()]
