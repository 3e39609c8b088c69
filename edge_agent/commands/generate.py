"""`edge-agent generate` (one process, no network) and `edge-agent run` (through the swarm)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from edge_agent.commands.common import (_agent_config, _client_config, _engine_options, _fail, _resolve_model, _sampling,
                                        _stream_to_stdout)
from edge_agent.options import (BootstrapOpt, MembershipOpt, AuditRateOpt, BackendOpt, ChatOpt, CtxOpt, DataDirOpt, DiscoverOpt, FlashAttnOpt,
                                IceServerOpt, MaxTokensOpt, MdnsInterfaceOpt, ModelOpt, ModeOpt, NoLocalFallbackOpt,
                                NoMdnsOpt, PeerOpt, PrivacyOpt, RepeatPenaltyOpt, SeedOpt, SplitOpt, StopOpt, SwarmKeyOpt,
                                TargetTbtOpt, TemperatureOpt, ThreadsOpt, TopKOpt, TopPOpt, TransportOpt, UbatchOpt,
                                DraftModelOpt, SpeculateOpt, VerifyOpt)

RUN_EPILOG = """[bold]Examples[/bold]

  [dim]# ask the swarm; this device keeps tokens, first/last layer, sampling[/dim]
  edge-agent run --chat "Write a short poem about the sea."

  [dim]# one JSON object: text, token ids, path through the peers, timings[/dim]
  edge-agent run --json -n 16 "The capital of France is"

  [dim]# only trusted peers see activations; fail rather than run layers here[/dim]
  edge-agent run --privacy trusted --no-local-fallback "My tax number is"

  [dim]# a job that can wait: newcomers may be tried on it[/dim]
  edge-agent run --batch -n 256 "Summarise: ..."

  [dim]# where multicast is blocked: name the peers (their ready line's tls_port)[/dim]
  edge-agent run --no-mdns --peer 10.0.0.2:41000 --peer 10.0.0.3:41000 "Hi"

Layers no peer serves run on this device (a note says so) unless --no-local-fallback. More: docs/cli/run.md."""


def generate(
    prompt: str = typer.Argument(..., help="Prompt text."),
    model: Optional[Path] = ModelOpt,
    split: str = typer.Option("1:1", "--split", help="K:M - the client keeps the first K and last M layers."),
    shards: Optional[str] = typer.Option(None, "--shards", help="Middle shards, e.g. 1:10,10:29 (default: one shard)."),
    max_tokens: int = MaxTokensOpt,
    temperature: float = TemperatureOpt,
    top_k: int = TopKOpt,
    top_p: float = TopPOpt,
    repeat_penalty: float = RepeatPenaltyOpt,
    seed: Optional[int] = SeedOpt,
    stop: list[str] = StopOpt,
    chat: bool = ChatOpt,
    backend: str = BackendOpt,
    threads: Optional[int] = ThreadsOpt,
    ctx: int = CtxOpt,
    flash_attn: bool = FlashAttnOpt,
    ubatch: int = UbatchOpt,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (text, token_ids, stats)."),
    data_dir: Optional[Path] = DataDirOpt,
) -> None:
    """Generate in one process: head -> each middle shard -> tail (proves the runtime, no network)."""
    from edge_agent import progress
    from edge_agent.config import shard_cache_dir
    from edge_agent.runtime.pipeline import LocalPipeline
    from edge_agent.runtime.shards import parse_range

    progress.set_quiet(as_json)
    path = _resolve_model(model, data_dir)
    k, m = parse_range(split)
    mids = [parse_range(s) for s in shards.split(",")] if shards else None
    try:
        params = _sampling(max_tokens, temperature, top_k, top_p, repeat_penalty, seed, stop)
        opts = _engine_options(ctx, threads, flash_attn, ubatch, max_requests=1)
    except ValueError as exc:
        _fail(str(exc))
    with progress.activity(f"loading {path.name}") as act:
        try:
            pipe = LocalPipeline(path, (k, m), mids, opts, backend=backend, cache_dir=shard_cache_dir(data_dir))
        except ValueError as exc:  # a bad --split/--shards; an EngineError rises to the one handler (cli_errors)
            _fail(str(exc))
        act.describe("generating")
        try:
            result = pipe.generate(prompt, params, chat=chat, on_token=_stream_to_stdout(as_json, act.stop))
        finally:
            pipe.close()
    if as_json:
        d = result.to_dict()
        d["model"] = str(path)
        d["ranges"] = [f"{a}:{b}" for a, b in pipe.ranges]
        typer.echo(json.dumps(d))
    else:
        typer.echo("")
        s = result.stats
        typer.secho(f"[{len(result.token_ids)} tokens, ttft {s['ttft_ms']} ms, {s['tokens_per_s']} tok/s]", err=True,
                    fg=typer.colors.BRIGHT_BLACK)


async def _generate_through_swarm(cfg, path, prompt: str, chat: bool, params, client_cfg, opts, discover: float,
                                  audit_rate: float, on_token):
    """``node.run``, keeping the agent in reach: with no route, say whether any peer of this swarm answered."""
    from edge_agent.cli_errors import NoSwarmPeerError
    from edge_agent.node import swarm_client
    from edge_agent.split.planner import NoRouteError

    async with swarm_client(cfg, path, client_cfg, opts, discover_s=discover, audit_rate=audit_rate) as client:
        table = client.peers.agent.table  # every agent of this swarm heard from (mDNS or --peer)
        try:
            return await client.generate(client.tokenizer.prompt_tokens(prompt, chat), params, on_token), len(table)
        except NoRouteError as exc:
            if not len(table):
                from edge_agent.netcheck import multicast_unavailable

                mdns_only = cfg.mdns and not (cfg.manual_peers or cfg.bootstrap)
                raise NoSwarmPeerError(multicast_unavailable(cfg.interfaces) if mdns_only else None) from exc
            raise


def run(
    prompt: str = typer.Argument(..., help="Prompt text."),
    model: Optional[Path] = ModelOpt,
    split: str = SplitOpt,
    target_tbt_ms: float = TargetTbtOpt,
    max_tokens: int = MaxTokensOpt,
    temperature: float = TemperatureOpt,
    top_k: int = TopKOpt,
    top_p: float = TopPOpt,
    repeat_penalty: float = RepeatPenaltyOpt,
    seed: Optional[int] = SeedOpt,
    stop: list[str] = StopOpt,
    chat: bool = ChatOpt,
    mode: str = ModeOpt,
    discover: float = DiscoverOpt,
    backend: str = BackendOpt,
    threads: Optional[int] = ThreadsOpt,
    ctx: int = CtxOpt,
    flash_attn: bool = FlashAttnOpt,
    ubatch: int = UbatchOpt,
    no_local_fallback: bool = NoLocalFallbackOpt,
    privacy: str = PrivacyOpt,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (text, token_ids, path, stats)."),
    audit_rate: float = AuditRateOpt,
    verify: bool = VerifyOpt,
    speculate: int = SpeculateOpt,
    draft_model: Optional[Path] = DraftModelOpt,
    batch: bool = typer.Option(False, "--batch", help="Not latency-critical (a job, not a person waiting): staked "
                               "newcomers are tried on it, and one peer on probation may be, within a tenth of this "
                               "client's batch work. See docs/discovery.md."),
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
    """Generate through the swarm: this device keeps tokens, first/last layers and sampling."""
    import asyncio

    from edge_agent import progress

    progress.set_quiet(as_json)
    path = _resolve_model(model, data_dir)
    cfg = _agent_config(data_dir, swarm_key, "127.0.0.1", 0, 0, peer, no_mdns, mdns_interface, transport, ice_server,
                        bootstrap, membership)
    client_cfg = _client_config(cfg, split, privacy, swarm_key, target_tbt_ms, mode, backend, no_local_fallback, verify)
    client_cfg.speculate, client_cfg.draft_model = speculate or (4 if draft_model else 0), draft_model
    client_cfg.batch = batch
    try:
        params = _sampling(max_tokens, temperature, top_k, top_p, repeat_penalty, seed, stop)
        opts = _engine_options(ctx, threads, flash_attn, ubatch, max_requests=2)
    except ValueError as exc:
        _fail(str(exc))
    with progress.activity("finding peers and loading this device's layers") as act:
        result, seen = asyncio.run(_generate_through_swarm(cfg, path, prompt, chat, params, client_cfg, opts, discover,
                                                           audit_rate, _stream_to_stdout(as_json, act.stop)))
    local = [h["range"] for h in result.stats.get("path", []) if h["peer_id"] == "local"]
    if local and privacy != "local":
        why = "no peer of this swarm answered (check the swarm key)" if not seen else f"no peer served layers {', '.join(local)}"
        typer.secho(f"note: {why}; this device ran them (--no-local-fallback to refuse)", err=True, fg=typer.colors.YELLOW)
    if as_json:
        d = result.to_dict()
        d["path"] = result.stats.get("path", [])
        d["privacy"] = result.stats.get("privacy")
        typer.echo(json.dumps(d))
    else:
        typer.echo("")
