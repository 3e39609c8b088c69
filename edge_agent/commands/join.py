"""`edge-agent join`: share compute, sized for the device it runs on."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from edge_agent.commands.common import _agent_config, _fail, _resolve_model, parse_size_mb
from edge_agent.options import (BootstrapOpt, MembershipOpt, BackendOpt, CtxOpt, DataDirOpt, FlashAttnOpt, IceServerOpt, MaxMemoryOpt, MaxRequestsOpt,
                                MdnsInterfaceOpt, ModelOpt, NoMdnsOpt, PeerOpt, RelayOpt, RelayViaOpt, SwarmKeyOpt, ThreadsOpt,
                                TransportOpt, UbatchOpt)

EPILOG = """[bold]Examples[/bold]

  [dim]# serve the layers the swarm needs most (default model)[/dim]
  edge-agent join

  [dim]# layers 1-14 (A:B, B exclusive) in 300 MB, on a GPU if any[/dim]
  edge-agent join --layers 1:15 --max-memory 300M --share-gpu

  [dim]# a private swarm where multicast is blocked: name a peer[/dim]
  EDGE_AGENT_SWARM_KEY=secret edge-agent join --no-mdns --peer 10.0.0.2:41000

  [dim]# behind NAT: stay reachable through a member started with --relay[/dim]
  edge-agent join --bootstrap 203.0.113.5:41000 --relay-via 203.0.113.5:41000

  [dim]# no model file: fetch layers 15-28 from a peer (hash-verified)[/dim]
  edge-agent join --model-hash HASH --layers 15:29 --peer 10.0.0.2:41000

The node prints one JSON line, [bold]{"ready": {...}}[/bold], on stdout (its tls_port is what --peer takes) and serves until Ctrl-C. `edge-agent doctor --layers A:B` shows the memory it will use. More: docs/cli/join.md."""


def _memory_bound(path: Path, rng, ctx: int, max_requests: int, max_memory: str):
    """(max_requests, weights budget for JoinOptions.max_memory_mb) that keep the node within --max-memory."""
    from edge_agent import sizing
    from edge_agent.runtime.shards import inspect_model

    budget = parse_size_mb(max_memory)
    info = inspect_model(path, with_hash=False)
    try:
        if rng is not None:
            fit = sizing.requests_that_fit(info, rng[1] - rng[0], ctx, max_requests, budget)
            if fit < max_requests:
                typer.secho(f"note: --max-memory {max_memory} leaves room for {fit} requests at once (not {max_requests})",
                            err=True, fg=typer.colors.YELLOW)
            return fit, None
        layers = sizing.layers_that_fit(info, ctx, max_requests, budget)
    except sizing.MemoryBoundError as exc:
        _fail(str(exc), "serve fewer layers (--layers), fewer --max-requests, a shorter --ctx, or give more --max-memory")
    # join picks its layers itself (node_join.choose_layers) from a weights budget: the layers that fit, and half a layer
    # more so that the division there lands on them
    return max_requests, (layers + 0.5) * sizing.layer_weights_mb(info)


def _serves_on_gpu(share_gpu: bool) -> bool:
    """--share-gpu without a GPU build: said once, here, in plain words; the node then asks for none."""
    if not share_gpu:
        return False
    import llama_cpp

    if llama_cpp.llama_supports_gpu_offload():
        return True
    typer.secho("note: no GPU here (this llama.cpp build has no GPU backend): this node serves on the CPU",
                err=True, fg=typer.colors.YELLOW)
    return False


def join(
    model: Optional[Path] = ModelOpt,
    layers: Optional[str] = typer.Option(None, "--layers", help="Serve layers A:B (default: the swarm's least-served span)."),
    share_gpu: bool = typer.Option(False, "--share-gpu", help="Offload to a GPU when llama.cpp has one (says so and serves on the CPU without)."),
    max_memory: Optional[str] = MaxMemoryOpt,
    threads: Optional[int] = ThreadsOpt,
    backend: str = BackendOpt,
    ctx: int = CtxOpt,
    flash_attn: bool = FlashAttnOpt,
    ubatch: int = UbatchOpt,
    max_requests: int = MaxRequestsOpt,
    idle_timeout: float = typer.Option(600.0, "--idle-timeout", help="Seconds before an idle request's KV cache is freed."),
    data_dir: Optional[Path] = DataDirOpt,
    swarm_key: Optional[str] = SwarmKeyOpt,
    host: str = typer.Option("0.0.0.0", "--host", help="Address the listeners bind to."),
    port: int = typer.Option(0, "--port", help="TLS port (0: any free port)."),
    signal_port: int = typer.Option(0, "--signal-port", help="WebRTC signalling port (0: any free port)."),
    peer: list[str] = PeerOpt,
    bootstrap: list[str] = BootstrapOpt,
    membership: str = MembershipOpt,
    relay: bool = RelayOpt,
    relay_via: list[str] = RelayViaOpt,
    no_mdns: bool = NoMdnsOpt,
    mdns_interface: list[str] = MdnsInterfaceOpt,
    transport: str = TransportOpt,
    ice_server: list[str] = IceServerOpt,
    test_delay_ms: float = typer.Option(0.0, "--test-delay-ms", hidden=True, help="Test only: make this node slow."),
    test_advertise_ms: Optional[float] = typer.Option(None, "--test-advertise-ms", hidden=True, help="Test only: advertised ms/layer."),
    test_claim_model_hash: Optional[str] = typer.Option(None, "--test-claim-model-hash", hidden=True, help="Test only: lie about the model hash."),
    test_fault: Optional[str] = typer.Option(None, "--test-fault", hidden=True, help="Test only (EDGE_AGENT_TEST_FAULTS=1): cheat: "
                                             "downgrade, skip-layer, stale, noise or garbage."),
    test_no_features: bool = typer.Option(False, "--test-no-features", hidden=True, help="Test only: advertise no step features (an older node)."),
    no_share_weights: bool = typer.Option(False, "--no-share-weights", help="Do not let peers fetch layer ranges from this node."),
    model_hash: Optional[str] = typer.Option(None, "--model-hash", help="No model file: fetch the --layers of this model (content hash) from a peer, verified tensor by tensor."),
) -> None:
    """Share compute: serve a range of the model's layers to the swarm until Ctrl-C."""
    import asyncio

    from edge_agent import progress
    from edge_agent.discovery.peers import parse_peer_arg
    from edge_agent.node_join import JoinOptions
    from edge_agent.node_join import join as run_join
    from edge_agent.runtime.shards import inspect_model, parse_range, validate_range
    from edge_agent.split.testhooks import TestHooks

    if model_hash is not None and (len(model_hash) != 64 or any(ch not in "0123456789abcdef" for ch in model_hash)):
        _fail("--model-hash needs the full 64-hex-digit hash", "`edge-agent model info MODEL` prints it (model_hash)")
    path = _resolve_model(model, data_dir) if (model or not model_hash) else None
    cfg = _agent_config(data_dir, swarm_key, host, port, signal_port, peer, no_mdns, mdns_interface, transport, ice_server,
                        bootstrap, membership)
    cfg.relay = relay
    try:
        cfg.relay_via = [parse_peer_arg(r) for r in relay_via]
    except ValueError as exc:
        _fail(str(exc), "--relay-via takes the TLS HOST:PORT a `join --relay` node prints in its ready line")
    rng = parse_range(layers) if layers else None
    if rng is not None and path is not None:  # before any port is bound: a range past the model's end is one line
        validate_range(*rng, inspect_model(path, with_hash=False).n_layer)
    weights_mb = None
    if max_memory and path is not None:
        max_requests, weights_mb = _memory_bound(path, rng, ctx, max_requests, max_memory)
    elif max_memory:
        typer.secho("note: --max-memory needs the model file to size the node; fetching weights, it bounds nothing",
                    err=True, fg=typer.colors.YELLOW)
    opts = JoinOptions(path, rng, backend, _serves_on_gpu(share_gpu), weights_mb, threads, ctx, max_requests,
                       flash_attn=flash_attn, n_ubatch=ubatch, idle_timeout_s=idle_timeout, model_hash=model_hash,
                       share_weights=not no_share_weights,
                       hooks=TestHooks(test_delay_ms, test_advertise_ms, test_claim_model_hash, test_fault, test_no_features))
    try:
        opts.hooks.check_enabled()
    except ValueError as exc:
        _fail(str(exc))

    if not no_mdns:
        from edge_agent.netcheck import multicast_unavailable

        problem = multicast_unavailable(list(mdns_interface) or None)
        if problem:
            typer.secho(f"note: {problem}: clients find this node only with --peer HOST:PORT", err=True, fg=typer.colors.YELLOW)
    with progress.activity("joining: " + (f"fetching layers {layers}" if path is None else "loading the model")) as act:
        def fetched(done: int, total: int) -> None:
            act.on_bytes(done, total)
            if done >= total:
                act.describe("loading the fetched layers")

        def ready(info: dict) -> None:
            act.stop()
            typer.echo(json.dumps({"ready": info}))
            sys.stdout.flush()
            a, b = info["layers"]
            typer.echo(f"serving layers {a}:{b} on port {info['tls_port']} (Ctrl-C to stop)", err=True)

        asyncio.run(run_join(cfg, opts, ready, fetched))
