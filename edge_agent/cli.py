"""The ``edge-agent`` command line. Thin: each command calls one Python function.

Results go to stdout, logs and progress to stderr. Known failures of any command become one
line + hint and exit code 2 (``cli_errors``). Only typer is imported here: every library a
command needs is imported inside it, so that ``edge-agent --help`` stays fast.
"""

from __future__ import annotations

import enum
import json
from pathlib import Path
from typing import Optional

import typer

from edge_agent import __version__
from edge_agent.cli_errors import EdgeAgentTyper
from edge_agent.commands.common import _engine_options, _fail, parse_size_mb
from edge_agent.commands.generate import RUN_EPILOG, generate, run
from edge_agent.commands.join import EPILOG as JOIN_EPILOG, join
from edge_agent.commands.model import model_app
from edge_agent.options import (BackendOpt, CtxOpt, DataDirOpt, FlashAttnOpt, JsonOpt, MaxMemoryOpt, MaxRequestsOpt,
                                ModelOpt, SwarmKeyOpt, UbatchOpt)

app = EdgeAgentTyper(
    help="Run one LLM together across independently owned devices, layer by layer.",
    epilog="Start with `edge-agent doctor`; every command has --help with examples; docs/cli/ has a page per command.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
keys_app = typer.Typer(help="This agent's Ed25519 identity.", no_args_is_help=True)
app.add_typer(model_app, name="model")
app.add_typer(keys_app, name="keys")
from edge_agent.ledger.cli import ledger_app  # noqa: E402 - typer only; commands import lazily
app.add_typer(ledger_app, name="ledger")
from edge_agent.discovery.trust import trust_app  # noqa: E402
app.add_typer(trust_app, name="trust")


class LogLevel(str, enum.Enum):
    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"edge-agent {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."),
    log_level: LogLevel = typer.Option(LogLevel.warning, "--log-level", envvar="EDGE_AGENT_LOG_LEVEL", case_sensitive=False,
                                       help="Log messages to stderr from this level up (before the command: "
                                       "edge-agent --log-level debug join ...)."),
) -> None:
    """edge-agent: share compute with a swarm (join), or generate through it (run, serve)."""
    import logging
    import sys

    from edge_agent import progress

    progress.set_quiet(False)  # until a --json command says otherwise (one process may run several commands)
    logging.basicConfig(stream=sys.stderr, level=log_level.value.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


@app.command()
def doctor(
    data_dir: Optional[Path] = DataDirOpt,
    as_json: bool = JsonOpt,
    model: Optional[Path] = ModelOpt,
    layers: Optional[str] = typer.Option(None, "--layers", help="Size a node serving layers A:B (default: what fits "
                                         "--max-memory, else the whole model)."),
    ctx: int = CtxOpt,
    max_requests: int = MaxRequestsOpt,
    max_memory: Optional[str] = MaxMemoryOpt,
) -> None:
    """Check this machine: runtime, CPU, memory, data dir, dependencies, default model.

    Also what a node with `join`'s settings (the same options) would hold in memory."""
    from edge_agent.doctor import collect, render

    budget = parse_size_mb(max_memory) if max_memory else None
    report = collect(data_dir, model=model, layers=layers, n_ctx=ctx, max_requests=max_requests, max_memory_mb=budget)
    typer.echo(json.dumps(report, indent=2) if as_json else render(report))


@keys_app.command("show")
def keys_show(data_dir: Optional[Path] = DataDirOpt, as_json: bool = JsonOpt) -> None:
    """Print this agent's public id (created on first use; the private key never leaves the key file)."""
    from edge_agent.config import data_dir as resolve_data_dir
    from edge_agent.discovery.identity import Identity

    root = resolve_data_dir(data_dir)
    agent_id = Identity.load_or_create(root).agent_id
    typer.echo(json.dumps({"agent_id": agent_id, "data_dir": str(root)}) if as_json else agent_id)


@app.command()
def peers(
    data_dir: Optional[Path] = DataDirOpt,
    swarm_key: Optional[str] = SwarmKeyOpt,
    timeout: float = typer.Option(3.0, "--timeout", help="Seconds to listen for mDNS adverts."),
    mdns_interface: list[str] = typer.Option([], "--mdns-interface", help="Interface address for mDNS (repeatable; default all)."),
    backend: str = BackendOpt,
    flash_attn: bool = FlashAttnOpt,
    ubatch: int = UbatchOpt,
    as_json: bool = JsonOpt,
) -> None:
    """List the peers of this swarm that this agent sees on the LAN.

    Peers with other arithmetic settings than these are marked incompatible: `run` would refuse them."""
    import asyncio

    from edge_agent import progress
    from edge_agent.config import data_dir as resolve_data_dir
    from edge_agent.directory import arithmetic_mismatch
    from edge_agent.discovery.capabilities import ARITH_KEY
    from edge_agent.discovery.mdns import list_peers
    from edge_agent.discovery.peers import format_peers
    from edge_agent.runtime.backends import resolve_backend

    progress.set_quiet(as_json)
    mine = _engine_options(2048, None, flash_attn, ubatch, 1).arithmetic(resolve_backend(backend))
    with progress.activity(f"listening for peers for {timeout:g} s"):
        found = asyncio.run(list_peers(resolve_data_dir(data_dir), swarm_key, timeout, list(mdns_interface) or None))
    for row in found:
        row["incompatible"] = arithmetic_mismatch(mine, row["extra"].get(ARITH_KEY)) if row["role"] == "peer" else None
    if as_json:
        typer.echo(json.dumps(found, indent=2))
    elif not found:
        from edge_agent.cli_errors import MULTICAST_HINT
        from edge_agent.netcheck import multicast_unavailable

        problem = multicast_unavailable(list(mdns_interface) or None)
        if problem:
            _fail(f"no peers seen: {problem}", MULTICAST_HINT)
        typer.echo("no peers seen")
        typer.secho("hint: same swarm key everywhere (--swarm-key, $EDGE_AGENT_SWARM_KEY, <data dir>/swarm.key)? A network "
                    "that drops multicast? docs/troubleshooting.md", err=True, fg=typer.colors.YELLOW)
    else:
        typer.echo(format_peers(found))


app.command(epilog=JOIN_EPILOG)(join)
app.command()(generate)
app.command(epilog=RUN_EPILOG)(run)

SERVE_EPILOG = """[bold]Examples[/bold]

  [dim]# API + dashboard on http://127.0.0.1:8000, through the LAN swarm[/dim]
  edge-agent serve

  [dim]# another address needs a key (from the environment: ps hides it)[/dim]
  EDGE_AGENT_API_KEY=$(openssl rand -hex 16) edge-agent serve --host 0.0.0.0 --port 8080

  [dim]# any OpenAI client[/dim]
  curl -s localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"model": "SmolLM2-135M-Instruct.Q4_1", "messages": [{"role": "user", "content": "Hi!"}]}'

The server prints one JSON line, [bold]{"ready": {...}}[/bold], with its URL. More: docs/cli/serve.md, docs/api.md."""

from edge_agent.api.command import serve_command  # noqa: E402

app.command("serve", epilog=SERVE_EPILOG)(serve_command)


@app.command("app")
def app_command() -> None:
    """Desktop mode, what a double-click on the one-file app starts: join the LAN swarm, serve
    the API and the dashboard on loopback, open the dashboard (settings: docs/app.md)."""
    from edge_agent.desktop import main as desktop

    raise typer.Exit(desktop())

if __name__ == "__main__":  # pragma: no cover
    app()
