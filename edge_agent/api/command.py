"""The `edge-agent serve` command (registered by edge_agent.cli; heavy imports stay inside).
Its swarm options are `run`'s (edge_agent/options.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from edge_agent.commands.common import _agent_config, _client_config, _engine_options, _fail, _resolve_model
from edge_agent.options import (AuditRateOpt, BootstrapOpt, MembershipOpt, BackendOpt, CtxOpt, DataDirOpt, DiscoverOpt, FlashAttnOpt, IceServerOpt,
                                MdnsInterfaceOpt, ModelOpt, ModeOpt, NoLocalFallbackOpt, NoMdnsOpt, PeerOpt, PrivacyOpt,
                                SplitOpt, SwarmKeyOpt, TargetTbtOpt, ThreadsOpt, TransportOpt, UbatchOpt, VerifyOpt,
                                DraftModelOpt, SpeculateOpt)


def serve_command(
    model: Optional[Path] = ModelOpt,
    host: str = typer.Option("127.0.0.1", "--host", help="HTTP address. Anything but loopback needs --api-key or --no-auth."),
    port: int = typer.Option(8000, "--port", help="HTTP port (0: any free port)."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="EDGE_AGENT_API_KEY",
                                          help="Require 'Authorization: Bearer KEY' (prefer $EDGE_AGENT_API_KEY: ps shows arguments)."),
    no_auth: bool = typer.Option(False, "--no-auth", help="Serve a non-loopback address without an API key, on purpose."),
    split: str = SplitOpt,
    target_tbt_ms: float = TargetTbtOpt,
    mode: str = ModeOpt,
    max_concurrent: int = typer.Option(8, "--max-concurrent", help="Generations at once; more requests wait for a slot."),
    discover: float = DiscoverOpt,
    backend: str = BackendOpt,
    threads: Optional[int] = ThreadsOpt,
    ctx: int = CtxOpt,
    flash_attn: bool = FlashAttnOpt,
    ubatch: int = UbatchOpt,
    no_local_fallback: bool = NoLocalFallbackOpt,  # a request then gets 503
    privacy: str = PrivacyOpt,  # for every request
    audit_rate: float = AuditRateOpt,
    verify: bool = VerifyOpt,
    speculate: int = SpeculateOpt,
    draft_model: Optional[Path] = DraftModelOpt,
    data_dir: Optional[Path] = DataDirOpt,
    swarm_key: Optional[str] = SwarmKeyOpt,
    peer: list[str] = PeerOpt,
    bootstrap: list[str] = BootstrapOpt,
    membership: str = MembershipOpt,
    no_mdns: bool = NoMdnsOpt,
    mdns_interface: list[str] = MdnsInterfaceOpt,
    transport: str = TransportOpt,
    ice_server: list[str] = IceServerOpt,
) -> None:
    """Serve an OpenAI-compatible API, /metrics and a dashboard, generating through the swarm."""
    import asyncio

    from edge_agent.api.server import ServeOptions, serve

    path = _resolve_model(model, data_dir)
    cfg = _agent_config(data_dir, swarm_key, "127.0.0.1", 0, 0, peer, no_mdns, mdns_interface, transport, ice_server,
                        bootstrap, membership)
    client_cfg = _client_config(cfg, split, privacy, swarm_key, target_tbt_ms, mode, backend, no_local_fallback, verify)
    client_cfg.speculate, client_cfg.draft_model = speculate or (4 if draft_model else 0), draft_model
    if ctx < 16 or max_concurrent < 1:
        _fail("--ctx must be >= 16 and --max-concurrent >= 1")
    try:
        engine_opts = _engine_options(ctx, threads, flash_attn, ubatch, max_requests=max_concurrent)
    except ValueError as exc:
        _fail(str(exc))
    opts = ServeOptions(host, port, api_key, no_auth, max_concurrent, discover, audit_rate)

    from edge_agent import progress

    with progress.activity("loading this device's layers and finding peers") as act:
        def ready(info: dict) -> None:
            act.stop()
            typer.echo(json.dumps({"ready": info}))
            sys.stdout.flush()
            typer.echo(f"serving {info['model']} on {info['url']} (dashboard at /, OpenAI API at /v1)", err=True)

        asyncio.run(serve(cfg, path, client_cfg, engine_opts, opts, ready))  # a known failure: one line + hint (cli_errors)
