"""`edge-agent serve`: a full agent (discovery, transport, split client) with the HTTP API in front.

Keeps what ``node.swarm_client`` wires (agent, peer directory, split client) up for many
requests, and serves the API, /metrics and the dashboard with uvicorn on the same event loop.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Callable

log = logging.getLogger(__name__)


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    no_auth: bool = False
    max_concurrent: int = 8  # generations at once (one KV slot each on this device)
    discover_s: float = 5.0
    audit_rate: float | None = None  # share of hop chunks re-executed here (None: the ledger's default)


class ServeError(ValueError):
    """A configuration mistake, reported in one line."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_auth(opts: ServeOptions) -> None:
    if opts.api_key is not None and len(opts.api_key) < 8:
        raise ServeError("--api-key must be at least 8 characters")
    if not is_loopback(opts.host) and opts.api_key is None and not opts.no_auth:
        raise ServeError(f"binding {opts.host} exposes the API beyond this machine: give --api-key KEY "
                         "(or $EDGE_AGENT_API_KEY), or --no-auth to serve it open on purpose")


def swarm_view(directory, client, model_id: str) -> Callable[[], dict]:
    """A callable: the model's layers, this device's ranges and the live peers that serve them."""
    from edge_agent.split.joining import coverage

    n_layer = client.n_layer
    head, tail = client.head.info, client.tail.info
    lo, hi = client.config.policy.remote_range(n_layer)

    def view() -> dict:
        caps = directory.capabilities()
        peers = []
        for c in caps:
            entry = directory.agent.table.get(c.peer_id)
            advert = entry.caps if entry is not None else None
            peers.append({"peer_id": c.peer_id, "ranges": [list(r) for r in c.ranges], "ms_per_layer": c.ms_per_layer,
                          "free_mem_mb": c.free_memory_mb, "rtt_ms": round(c.rtt_ms, 3),
                          "transport": "tls" if advert is not None and advert.tls_port else "webrtc",
                          "backend": advert.backend if advert is not None else "?"})
        cov = coverage(n_layer, caps)
        others = [{"peer_id": p.peer_id, "ranges": [list(r) for r in p.ranges], "reason": p.reason}
                  for p in directory.incompatible()]
        return {"model": model_id, "n_layer": n_layer, "local": [[head.start, head.end], [tail.start, tail.end]],
                "remote": [lo, hi], "covered": all(c > 0 for c in cov[lo:hi]), "peers": peers, "incompatible": others,
                "agent_id": directory.agent.identity.agent_id}

    return view


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror} (another server there? try --port)") from None
    sock.listen(128)  # connections made once "ready" is printed wait for uvicorn instead of being refused
    return sock


@asynccontextmanager
async def api_app(config, model: Path, client_config, engine_options, opts: ServeOptions) -> AsyncIterator[tuple]:
    """An agent on the swarm as a client and the API app in front of it: ``(app, info)``.

    ``engine_options``: this device's engine settings (context per request, arithmetic);
    ``opts.max_concurrent`` of its KV slots serve requests at once. Used by ``serve`` and the
    desktop app (edge_agent/desktop.py), which swaps the app in once the model is loaded."""
    from edge_agent.api.accounts_panel import AccountsPanel
    from edge_agent.api.app import ApiServices, create_app
    from edge_agent.api.dashboard import dashboard_routes
    from edge_agent.api.engine import ApiEngine
    from edge_agent.api.metrics import ApiMetrics
    from edge_agent.node import swarm_client

    async with swarm_client(config, model, client_config, engine_options, discover_s=opts.discover_s,
                            audit_rate=opts.audit_rate) as client:
        model_id = model.name.removesuffix(".gguf")
        view = swarm_view(client.peers, client, model_id)
        metrics = ApiMetrics(lambda: view()["peers"], bytes_per_row=4 * client.head.info.n_embd)
        engine = ApiEngine(client, max_concurrent=opts.max_concurrent, on_gap=metrics.gap, on_finish=metrics.finished)
        metrics.in_flight.set_function(lambda: len(engine.flights))
        metrics.kept.set_function(lambda: len(engine.conversations))
        client.observers.add(engine.observe)
        agent_id = client.peers.agent.identity.agent_id
        panel = None if client.ledger is None else AccountsPanel(client.ledger.store, agent_id,
                                                                 lambda: [p["peer_id"] for p in view()["peers"]])
        services = ApiServices(engine, metrics, model_id, engine_options.n_ctx_per_request, view, opts.api_key, accounts=panel)
        try:
            yield create_app(services, dashboard_routes(services)), {
                "model": model_id, "agent_id": agent_id, "peers": len(view()["peers"])}
        finally:
            await engine.close()  # every hop ends its requests before the links close
            if panel is not None:
                panel.close()


async def serve(config, model: Path, client_config, engine_options, opts: ServeOptions, on_ready=None) -> None:
    """Join the swarm as a client and serve the API until SIGINT/SIGTERM."""
    import uvicorn

    check_auth(opts)
    sock = bind_socket(opts.host, opts.port)  # fail fast, before loading anything
    try:
        async with api_app(config, model, client_config, engine_options, opts) as (app, info):
            server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=5))
            host, port = sock.getsockname()[:2]
            if on_ready:
                on_ready({"url": f"http://{host}:{port}", **info, "auth": opts.api_key is not None})
            await server.serve(sockets=[sock])
    finally:
        sock.close()
