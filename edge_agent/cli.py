"""The ``edge-agent`` command line. Thin: each command calls one Python function."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from edge_agent import __version__
from edge_agent.options import (
    DataDirOpt, ModelOpt, BackendOpt, ThreadsOpt, CtxOpt, FlashAttnOpt, AuditRateOpt, UbatchOpt, MaxTokensOpt,
    TemperatureOpt, TopKOpt, TopPOpt, RepeatPenaltyOpt, SeedOpt, StopOpt, ChatOpt, SplitOpt, TargetTbtOpt, ModeOpt,
    DiscoverOpt, NoLocalFallbackOpt, PrivacyOpt, NoMdnsOpt, MdnsInterfaceOpt, TransportOpt, IceServerOpt,
    SwarmKeyOpt, PeerOpt)

app = typer.Typer(
    help="Run one LLM together across independently owned devices, layer by layer.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
model_app = typer.Typer(help="Inspect GGUF models and cut them into layer shards.", no_args_is_help=True)
keys_app = typer.Typer(help="This agent's Ed25519 identity.", no_args_is_help=True)
app.add_typer(model_app, name="model")
app.add_typer(keys_app, name="keys")
from edge_agent.ledger.cli import ledger_app  # noqa: E402 - typer only; commands import lazily
app.add_typer(ledger_app, name="ledger")
from edge_agent.discovery.trust import trust_app  # noqa: E402
app.add_typer(trust_app, name="trust")


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"edge-agent {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."),
) -> None:
    """edge-agent: share compute with a swarm (join), or generate through it (run)."""


def _resolve_model(model: Optional[Path], data_dir: Optional[Path]) -> Path:
    from edge_agent.config import ModelNotFoundError, resolve_model

    try:
        return resolve_model(model, data_dir)
    except ModelNotFoundError as exc:
        _fail(str(exc))
    raise AssertionError  # unreachable


@app.command()
def doctor(data_dir: Optional[Path] = DataDirOpt, as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Check this machine: runtime, CPU features, threads, data dir, dependencies, default model."""
    from edge_agent.doctor import collect, render

    report = collect(data_dir)
    typer.echo(json.dumps(report, indent=2) if as_json else render(report))


@model_app.command("info")
def model_info(model: Path = typer.Argument(..., help="GGUF file."), as_json: bool = typer.Option(False, "--json")) -> None:
    """Architecture, layers, dimensions, heads, quant types, size and content hash of a GGUF."""
    from edge_agent.runtime.engine import EngineError
    from edge_agent.runtime.shards import inspect_model

    try:
        info = inspect_model(model)
    except (EngineError, FileNotFoundError) as exc:
        _fail(str(exc))
    d = info.to_dict()
    if as_json:
        typer.echo(json.dumps(d, indent=2))
        return
    for key in ("path", "name", "arch", "role", "layer_range", "n_layer", "n_embd", "n_head", "n_head_kv", "n_ff", "n_vocab",
                "context_length", "file_size", "tensor_types", "model_hash", "shard_hash", "source_model_hash"):
        if d.get(key) not in (None, ""):
            typer.echo(f"{key:18} {d[key]}")


@model_app.command("split")
def model_split(
    model: Path = typer.Argument(..., help="Source GGUF (a whole model)."),
    layers: str = typer.Option(..., "--layers", "-l", help="Layer range A:B (B exclusive). 0:K is a head shard, L-M:L a tail."),
    out: Path = typer.Option(..., "--out", "-o", help="Output GGUF."),
) -> None:
    """Write decoder layers [A, B) as a standalone shard GGUF (tensor bytes unchanged)."""
    from edge_agent.runtime.engine import EngineError
    from edge_agent.runtime.shards import parse_range, write_shard

    try:
        start, end = parse_range(layers)
        info = write_shard(model, out, start, end)
    except (EngineError, FileNotFoundError) as exc:
        _fail(str(exc))
    typer.echo(f"wrote {out} ({info.role} shard, layers {start}:{end}, {info.file_size / 1e6:.1f} MB, shard hash {info.shard_hash[:16]}...)")


def _engine_options(ctx: int, threads: Optional[int], flash_attn: bool, ubatch: int, max_requests: int):
    from edge_agent.runtime.engine import EngineOptions

    return EngineOptions(n_ctx_per_request=ctx, max_requests=max_requests, n_threads=threads, flash_attn=flash_attn,
                         n_ubatch=ubatch)


def _sampling(max_tokens, temperature, top_k, top_p, repeat_penalty, seed, stop):
    from edge_agent.runtime.sampling import SamplingParams

    return SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, repeat_penalty=repeat_penalty, seed=seed,
                          max_tokens=max_tokens, stop=tuple(stop))


def _stream_to_stdout(as_json: bool):
    def on_token(_token: int, text: str) -> None:
        if not as_json:
            sys.stdout.write(text)
            sys.stdout.flush()

    return on_token


@app.command()
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
    from edge_agent.config import shard_cache_dir
    from edge_agent.runtime.engine import EngineError
    from edge_agent.runtime.pipeline import LocalPipeline
    from edge_agent.runtime.shards import parse_range

    path = _resolve_model(model, data_dir)
    try:
        k, m = parse_range(split)
        mids = [parse_range(s) for s in shards.split(",")] if shards else None
        params = _sampling(max_tokens, temperature, top_k, top_p, repeat_penalty, seed, stop)
        opts = _engine_options(ctx, threads, flash_attn, ubatch, max_requests=1)
        pipe = LocalPipeline(path, (k, m), mids, opts, backend=backend, cache_dir=shard_cache_dir(data_dir))
    except (EngineError, ValueError) as exc:
        _fail(str(exc))
    try:
        result = pipe.generate(prompt, params, chat=chat, on_token=_stream_to_stdout(as_json))
    except (EngineError, ValueError) as exc:
        _fail(str(exc))
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
        typer.secho(f"[{len(result.token_ids)} tokens, ttft {s['ttft_ms']} ms, {s['tokens_per_s']} tok/s]", err=True, fg=typer.colors.BRIGHT_BLACK)


def _client_config(cfg, split: str, privacy: str, swarm_key, target_tbt_ms: float, mode: str, backend: str,
                   no_local_fallback: bool):
    """The swarm client's settings from `run`'s / `serve`'s options; a mistake is one line."""
    from edge_agent.discovery.trust import privacy_policy
    from edge_agent.runtime.engine import EngineError
    from edge_agent.runtime.shards import parse_range
    from edge_agent.split.client import ClientConfig

    if mode not in ("star", "chain", "auto"):
        _fail("--mode must be star, chain or auto")
    try:
        k, m = parse_range(split)
        # per request, so that `edge-agent trust add` applies to a running `serve`'s next request
        policy_for = lambda level: privacy_policy(level, k, m, cfg.data_dir, swarm_key)  # noqa: E731
        return ClientConfig(policy=policy_for(privacy), policy_for=policy_for, target_tbt_ms=target_tbt_ms,
                            mode=mode, backend=backend, local_fallback=not no_local_fallback)
    except (EngineError, ValueError) as exc:  # PolicyError and TrustError are ValueErrors
        _fail(str(exc))


def _agent_config(data_dir, swarm_key, host, port, signal_port, peer, no_mdns, mdns_interface, transport, ice_server):
    from edge_agent.config import data_dir as resolve_data_dir
    from edge_agent.discovery.peers import parse_peer_arg
    from edge_agent.node import AgentConfig

    if transport not in ("auto", "tls", "webrtc"):
        _fail("--transport must be auto, tls or webrtc")
    if swarm_key:
        typer.secho("warning: --swarm-key is visible to every user of this machine (ps, /proc); prefer "
                    "$EDGE_AGENT_SWARM_KEY or <data dir>/swarm.key (mode 0600)", err=True, fg=typer.colors.YELLOW)
    try:
        peers = [parse_peer_arg(p) for p in peer]
    except ValueError as exc:
        _fail(str(exc))
    return AgentConfig(resolve_data_dir(data_dir), swarm_key, host, port, signal_port, not no_mdns,
                       list(mdns_interface) or None, peers, transport, list(ice_server))


@keys_app.command("show")
def keys_show(data_dir: Optional[Path] = DataDirOpt) -> None:
    """Print this agent's public id (created on first use; the private key never leaves the key file)."""
    from edge_agent.config import data_dir as resolve_data_dir
    from edge_agent.discovery.identity import Identity

    typer.echo(Identity.load_or_create(resolve_data_dir(data_dir)).agent_id)


@app.command()
def peers(
    data_dir: Optional[Path] = DataDirOpt,
    swarm_key: Optional[str] = SwarmKeyOpt,
    timeout: float = typer.Option(3.0, "--timeout", help="Seconds to listen for mDNS adverts."),
    mdns_interface: list[str] = typer.Option([], "--mdns-interface", help="Interface address for mDNS (repeatable; default all)."),
    backend: str = BackendOpt,
    flash_attn: bool = FlashAttnOpt,
    ubatch: int = UbatchOpt,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """List the peers of this swarm that this agent sees on the LAN, and which `run` with these
    settings would refuse (other arithmetic settings change the output)."""
    import asyncio

    from edge_agent.config import data_dir as resolve_data_dir
    from edge_agent.directory import arithmetic_mismatch
    from edge_agent.discovery.capabilities import ARITH_KEY
    from edge_agent.discovery.mdns import list_peers
    from edge_agent.discovery.peers import format_peers
    from edge_agent.runtime.backends import resolve_backend
    from edge_agent.runtime.engine import EngineError

    try:
        mine = _engine_options(2048, None, flash_attn, ubatch, 1).arithmetic(resolve_backend(backend))
    except EngineError as exc:
        _fail(str(exc))
    found = asyncio.run(list_peers(resolve_data_dir(data_dir), swarm_key, timeout, list(mdns_interface) or None))
    for row in found:
        row["incompatible"] = arithmetic_mismatch(mine, row["extra"].get(ARITH_KEY)) if row["role"] == "peer" else None
    if as_json:
        typer.echo(json.dumps(found, indent=2))
    elif not found:
        typer.echo("no peers seen (same swarm key? multicast allowed? try --peer HOST:PORT on join/run)")
    else:
        typer.echo(format_peers(found))


@app.command()
def join(
    model: Optional[Path] = ModelOpt,
    layers: Optional[str] = typer.Option(None, "--layers", help="Serve layers A:B (default: the swarm's least-served span)."),
    share_gpu: bool = typer.Option(False, "--share-gpu", help="Offload to a GPU when llama.cpp has one (harmless without)."),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help="Memory for weights, e.g. 2G or 500M."),
    threads: Optional[int] = ThreadsOpt,
    backend: str = BackendOpt,
    ctx: int = CtxOpt,
    flash_attn: bool = FlashAttnOpt,
    ubatch: int = UbatchOpt,
    max_requests: int = typer.Option(8, "--max-requests", help="Requests served at once (one KV cache each)."),
    idle_timeout: float = typer.Option(600.0, "--idle-timeout", help="Seconds before an idle request's KV cache is freed."),
    data_dir: Optional[Path] = DataDirOpt,
    swarm_key: Optional[str] = SwarmKeyOpt,
    host: str = typer.Option("0.0.0.0", "--host", help="Address the listeners bind to."),
    port: int = typer.Option(0, "--port", help="TLS port (0: any free port)."),
    signal_port: int = typer.Option(0, "--signal-port", help="WebRTC signalling port (0: any free port)."),
    peer: list[str] = PeerOpt,
    no_mdns: bool = NoMdnsOpt,
    mdns_interface: list[str] = MdnsInterfaceOpt,
    transport: str = TransportOpt,
    ice_server: list[str] = IceServerOpt,
    test_delay_ms: float = typer.Option(0.0, "--test-delay-ms", hidden=True, help="Test only: make this node slow."),
    test_advertise_ms: Optional[float] = typer.Option(None, "--test-advertise-ms", hidden=True, help="Test only: advertised ms/layer."),
    test_claim_model_hash: Optional[str] = typer.Option(None, "--test-claim-model-hash", hidden=True, help="Test only: lie about the model hash."),
    test_fault: Optional[str] = typer.Option(None, "--test-fault", hidden=True, help="Test only (EDGE_AGENT_TEST_FAULTS=1): cheat: "
                                             "downgrade, skip-layer, stale, noise or garbage."),
    no_share_weights: bool = typer.Option(False, "--no-share-weights", help="Do not let peers fetch layer ranges from this node."),
    model_hash: Optional[str] = typer.Option(None, "--model-hash", help="No model file: fetch the --layers of this model (content hash) from a peer, verified tensor by tensor."),
) -> None:
    """Share compute: serve a range of the model's layers to the swarm until Ctrl-C."""
    import asyncio

    from edge_agent.node import JoinOptions
    from edge_agent.split.testhooks import TestHooks
    from edge_agent.node import join as run_join
    from edge_agent.runtime.engine import EngineError
    from edge_agent.runtime.shards import parse_range

    if model_hash is not None and (len(model_hash) != 64 or any(ch not in "0123456789abcdef" for ch in model_hash)):
        _fail("--model-hash needs the full 64-hex-digit hash (edge-agent model info MODEL)")
    path = _resolve_model(model, data_dir) if (model or not model_hash) else None
    cfg = _agent_config(data_dir, swarm_key, host, port, signal_port, peer, no_mdns, mdns_interface, transport, ice_server)
    try:
        rng = parse_range(layers) if layers else None
        mem = _parse_size_mb(max_memory) if max_memory else None
    except (EngineError, ValueError) as exc:
        _fail(str(exc))
    opts = JoinOptions(path, rng, backend, share_gpu, mem, threads, ctx, max_requests, flash_attn=flash_attn, n_ubatch=ubatch,
                       idle_timeout_s=idle_timeout, model_hash=model_hash, share_weights=not no_share_weights,
                       hooks=TestHooks(test_delay_ms, test_advertise_ms, test_claim_model_hash, test_fault))
    try:
        opts.hooks.check_enabled()
    except ValueError as exc:
        _fail(str(exc))

    def ready(info: dict) -> None:
        typer.echo(json.dumps({"ready": info}), err=False)
        sys.stdout.flush()

    last = [0.0]

    def progress(done: int, total: int) -> None:
        if done == total or done - last[0] >= total / 20:
            last[0] = done
            typer.echo(f"fetching weights: {done / 1e6:.1f} / {total / 1e6:.1f} MB", err=True)

    from edge_agent.split.protocol import HopFailed
    from edge_agent.split.weights import WeightsError

    try:
        asyncio.run(run_join(cfg, opts, ready, progress))
    except (EngineError, OSError, ValueError, WeightsError, HopFailed, TimeoutError) as exc:
        _fail(str(exc))


def _parse_size_mb(text: str) -> float:
    units = {"k": 1e-3, "m": 1.0, "g": 1e3, "t": 1e6}
    t = text.strip().lower().rstrip("b")
    if not t or t[-1] not in units:
        raise ValueError(f"--max-memory needs a unit, e.g. 500M or 2G (got {text!r})")
    return float(t[:-1]) * units[t[-1]]


@app.command()
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
    data_dir: Optional[Path] = DataDirOpt,
    swarm_key: Optional[str] = SwarmKeyOpt,
    peer: list[str] = PeerOpt,
    no_mdns: bool = NoMdnsOpt,
    mdns_interface: list[str] = MdnsInterfaceOpt,
    transport: str = TransportOpt,
    ice_server: list[str] = IceServerOpt,
) -> None:
    """Generate through the swarm: this device keeps tokens, first/last layers and sampling."""
    import asyncio

    from edge_agent.node import run as run_swarm
    from edge_agent.runtime.engine import EngineError
    from edge_agent.split.planner import NoRouteError
    from edge_agent.split.policy import PolicyError
    from edge_agent.split.protocol import HopFailed
    from edge_agent.split.weights import WeightsError

    path = _resolve_model(model, data_dir)
    cfg = _agent_config(data_dir, swarm_key, "127.0.0.1", 0, 0, peer, no_mdns, mdns_interface, transport, ice_server)
    client_cfg = _client_config(cfg, split, privacy, swarm_key, target_tbt_ms, mode, backend, no_local_fallback)
    try:
        params = _sampling(max_tokens, temperature, top_k, top_p, repeat_penalty, seed, stop)
        opts = _engine_options(ctx, threads, flash_attn, ubatch, max_requests=2)
    except (EngineError, ValueError) as exc:
        _fail(str(exc))
    try:
        result = asyncio.run(run_swarm(cfg, path, lambda tok: tok.prompt_tokens(prompt, chat), params, client_cfg,
                                       discover_s=discover, options=opts, on_token=_stream_to_stdout(as_json),
                                       audit_rate=audit_rate))
    except (NoRouteError, HopFailed, EngineError, PolicyError, WeightsError, TimeoutError, OSError, ValueError) as exc:
        _fail(str(exc))
    local = [h["range"] for h in result.stats.get("path", []) if h["peer_id"] == "local"]
    if local and privacy != "local":
        typer.secho(f"note: no peer served layers {', '.join(local)}; this device ran them (--no-local-fallback to refuse)",
                    err=True, fg=typer.colors.YELLOW)
    if as_json:
        d = result.to_dict()
        d["path"] = result.stats.get("path", [])
        d["privacy"] = result.stats.get("privacy")
        typer.echo(json.dumps(d))
    else:
        typer.echo("")


from edge_agent.api.command import serve_command  # noqa: E402 - after the shared options it imports

app.command("serve")(serve_command)

if __name__ == "__main__":  # pragma: no cover
    app()
