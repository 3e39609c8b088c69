"""The one place where the command line turns a known failure into one line and a hint.

Commands let the library's exceptions rise; ``EdgeAgentTyper`` (the ``edge-agent`` app) maps
the known ones here to ``error: <line>`` + ``hint: <what to do>`` on stderr and exit code 2.
An exception not listed is a bug: it keeps its traceback, which is what a bug report needs.
"""

from __future__ import annotations

import errno
import logging
import sys
from typing import NoReturn

import typer

USER_ERROR = 2
TROUBLESHOOTING = "docs/troubleshooting.md"
MULTICAST_HINT = f"where multicast is blocked, name peers: --no-mdns --peer HOST:PORT ({TROUBLESHOOTING})"


class UserError(Exception):
    """A mistake the command found itself: ``message`` and an optional ``hint``."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class NoSwarmPeerError(UserError):
    """Not one agent of this swarm answered (wrong swarm key, multicast blocked, nobody joined)."""

    def __init__(self, multicast_problem: str | None = None) -> None:
        super().__init__("no peer of this swarm answered: " + (multicast_problem or "check the swarm key"),
                         MULTICAST_HINT if multicast_problem else "every agent needs the same --swarm-key, "
                         f"$EDGE_AGENT_SWARM_KEY or <data dir>/swarm.key; is a peer running (`edge-agent peers`)? {TROUBLESHOOTING}")


def fail(message: str, hint: str | None = None) -> NoReturn:
    """Stop the command here with a user error: one line, the hint (default: the command's
    --help, where its options and examples are), exit 2."""
    if hint is None:
        try:  # typer >= 0.20 carries its own click
            from typer._click.globals import get_current_context
        except ImportError:
            from click import get_current_context
        ctx = get_current_context(silent=True)
        hint = f"`{ctx.command_path if ctx else 'edge-agent'} --help` shows the options and examples"
    _print(message, hint)
    raise typer.Exit(USER_ERROR)


def _print(line: str, hint: str | None) -> None:
    typer.secho(f"error: {line}", fg=typer.colors.RED, err=True)
    if hint:
        typer.secho(f"hint: {hint}", err=True, fg=typer.colors.YELLOW)


def _os_error(exc: OSError) -> tuple[str, str] | None:
    if exc.errno == errno.EADDRINUSE:
        return (f"port in use: {_after_errno(exc)}", "pick another --port (0: any free port), or stop the process that holds it (`ss -ltnp` names it)")
    if exc.errno == errno.ENODEV:
        return (f"multicast is blocked on this interface ({_after_errno(exc)})", MULTICAST_HINT)
    if exc.errno == errno.EADDRNOTAVAIL:
        return (f"cannot use that address: {_after_errno(exc)}",
                "--host and --mdns-interface take addresses of this machine (`ip -brief addr` lists them)")
    if exc.errno in (errno.EACCES, errno.EPERM) and getattr(exc, "filename", None) is None:
        return (_after_errno(exc), "ports below 1024 need root: pick a --port above 1024, or 0 for any free port")
    if isinstance(exc, FileNotFoundError):
        return (_after_errno(exc), "check the path")
    return None


def _after_errno(exc: OSError) -> str:
    text = str(exc)
    return text.split("] ", 1)[1] if text.startswith("[Errno") and "] " in text else text


def explain(exc: BaseException) -> tuple[str, str | None] | None:
    """``(line, hint)`` for a known failure, else None. Imports only what is already loaded:
    an exception type whose module was never imported cannot be the one raised."""
    if isinstance(exc, UserError):
        return str(exc), exc.hint
    mods = sys.modules
    config = mods.get("edge_agent.config")
    if config and isinstance(exc, config.ModelNotFoundError):
        return str(exc), "give a GGUF with --model PATH; `edge-agent doctor` shows which model is found"
    engine = mods.get("edge_agent.runtime.engine")
    if engine:
        if isinstance(exc, engine.CorruptModelError):
            return f"not a usable GGUF model: {exc}", "check the file (`edge-agent model info FILE`) or copy it again"
        if isinstance(exc, engine.ShardRangeError):
            return str(exc), "layer ranges are A:B with 0 <= A < B <= the model's layers (`edge-agent model info MODEL`)"
        if isinstance(exc, engine.UnsupportedModelError):
            return str(exc), "see `edge-agent model info MODEL`; docs/cli/model.md lists what can be split"
        if isinstance(exc, engine.EngineError):
            return str(exc), None
    planner = mods.get("edge_agent.split.planner")
    if planner and isinstance(exc, planner.NoRouteError):
        return str(exc), ("`edge-agent peers` lists what the swarm serves; start a node for the missing layers "
                          "(`edge-agent join --layers A:B`), or drop --no-local-fallback to run them here")
    protocol = mods.get("edge_agent.split.protocol")
    if protocol and isinstance(exc, protocol.HopFailed):
        return f"a peer failed: {exc}", "try again; `edge-agent peers` shows who serves what now"
    weights = mods.get("edge_agent.split.weights")
    if weights and isinstance(exc, weights.WeightsError):
        return str(exc), "fetch from a peer that runs `join --model` with the same model (its --peer HOST:PORT)"
    identity = mods.get("edge_agent.discovery.identity")
    if identity and isinstance(exc, identity.IdentityError):
        return str(exc), "the data dir's key files must be readable by you only (mode 0600)"
    hints = {"ServeError": "`edge-agent serve --help` shows the options and examples; docs/cli/serve.md",
             "PolicyError": "docs/privacy.md explains --privacy and `edge-agent trust`",
             "TrustError": "docs/privacy.md explains --privacy and `edge-agent trust`",
             "VerifyError": "docs/accountability.md explains --verify and --audit-rate"}
    for module, name in (("edge_agent.api.server", "ServeError"), ("edge_agent.split.policy", "PolicyError"),
                         ("edge_agent.discovery.trust", "TrustError"), ("edge_agent.split.verified", "VerifyError")):
        cls = getattr(mods.get(module), name, None)
        if cls is not None and isinstance(exc, cls):
            return str(exc), hints[name]
    if isinstance(exc, TimeoutError):
        return str(exc) or "timed out", f"is a peer running and reachable? `edge-agent peers`; {TROUBLESHOOTING}"
    if isinstance(exc, OSError):
        return _os_error(exc)
    return None


def report(exc: BaseException) -> int | None:
    """Print a known failure as one line + hint; the exit code, or None for a bug."""
    explained = explain(exc)
    if explained is None:
        return None
    line, hint = explained
    logging.getLogger("edge_agent").debug("the failure behind it", exc_info=exc)  # --log-level debug shows it
    _print(line, hint)
    return USER_ERROR


class EdgeAgentTyper(typer.Typer):
    """The app: known failures of any command become one line + hint and exit 2."""

    def __call__(self, *args, **kwargs):
        if len(sys.argv) > 1 and not {"--help", "-h", "--version"} & set(sys.argv[1:]):  # help runs no loop: no asyncio import
            from edge_agent import eventloop

            eventloop.install()  # every command's asyncio.run gets uvloop where installed (edge_agent/eventloop.py)
        try:
            return super().__call__(*args, **kwargs)
        except KeyboardInterrupt:
            sys.exit(130)
        except Exception as exc:  # noqa: BLE001 - known ones reported, the rest re-raised
            code = report(exc)
            if code is None:
                raise
            sys.exit(code)
