"""The dashboard: a static page from the package plus a JSON snapshot and an SSE feed of it.

The page (static/index.html, dashboard.js, dashboard.css) needs no build step and fetches
nothing from outside this agent. ``/api/events`` pushes one snapshot a second: the
model's layers and who serves them, live peers, requests in flight with their paths, and
the recent requests' TTFT / TBT / tokens per second for the plots; and, when it changed, an
``accounts`` event: the Accounts panel (balances, stake, reputation, evidence; api/accounts_panel.py),
also at ``GET /v1/ledger/accounts``.
"""

from __future__ import annotations

import asyncio
import json
import time
from importlib.resources import files

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from edge_agent.api.accounts_panel import NO_LEDGER

EVENT_INTERVAL_S = 1.0
MAX_EVENT_STREAM_S = 3600.0  # a tab left open reconnects after this (bounded loop)


def snapshot(s) -> dict:
    return {**s.swarm(), "model_id": s.model_id, "time": time.time(),
            "in_flight": [f.view() for f in list(s.engine.flights.values())],
            "kept_conversations": len(s.engine.conversations),
            "recent": list(s.engine.recent)[-120:]}


def page_routes() -> list:
    """The page and its files alone (the desktop app serves them before any model is loaded)."""
    static = files("edge_agent.api") / "static"

    async def index(_request: Request):
        return FileResponse(str(static / "index.html"), headers={"Cache-Control": "no-cache"})

    return [Route("/", index, methods=["GET"]), Mount("/static", StaticFiles(directory=str(static)), name="static")]


def event(name: str, data: dict) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def accounts_view(s) -> dict:
    return NO_LEDGER if s.accounts is None else await s.accounts.view()


def dashboard_routes(s) -> list:
    async def swarm(_request: Request):
        return JSONResponse(snapshot(s))

    async def accounts(_request: Request):
        return JSONResponse(await accounts_view(s))

    async def events(request: Request):
        async def feed():
            deadline = time.monotonic() + MAX_EVENT_STREAM_S
            sent = None
            while time.monotonic() < deadline and not await request.is_disconnected():
                yield event("snapshot", snapshot(s))
                panel = await accounts_view(s)
                if panel != sent:  # mostly unchanged: not sent again
                    yield event("accounts", panel)
                    sent = panel
                await asyncio.sleep(EVENT_INTERVAL_S)

        return StreamingResponse(feed(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return [
        Route("/api/swarm", swarm, methods=["GET"]),
        Route("/api/events", events, methods=["GET"]),
        Route("/v1/ledger/accounts", accounts, methods=["GET"]),
        *page_routes(),
    ]
