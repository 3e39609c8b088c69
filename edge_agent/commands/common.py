"""Helpers several commands share: settings from options, with mistakes as one line + hint."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Optional

import typer

from edge_agent.cli_errors import fail


_fail = fail  # one line + hint, exit 2 (the name serve's command imports)


def _resolve_model(model: Optional[Path], data_dir: Optional[Path]) -> Path:
    from edge_agent.config import resolve_model

    return resolve_model(model, data_dir)  # ModelNotFoundError: one line + hint (cli_errors)


def _engine_options(ctx: int, threads: Optional[int], flash_attn: bool, ubatch: int, max_requests: int):
    from edge_agent.runtime.engine import EngineOptions

    return EngineOptions(n_ctx_per_request=ctx, max_requests=max_requests, n_threads=threads, flash_attn=flash_attn,
                         n_ubatch=ubatch)


def _sampling(max_tokens, temperature, top_k, top_p, repeat_penalty, seed, stop):
    from edge_agent.runtime.sampling import SamplingParams

    return SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, repeat_penalty=repeat_penalty, seed=seed,
                          max_tokens=max_tokens, stop=tuple(stop))


def _stream_to_stdout(as_json: bool, on_first=None):
    """``on_token`` that writes the text as it comes (not with --json); ``on_first()`` once, before it."""
    pending = [on_first]

    def on_token(_token: int, text: str) -> None:
        if pending[0] is not None:
            callback, pending[0] = pending[0], None
            callback()
        if not as_json:
            sys.stdout.write(text)
            sys.stdout.flush()

    return on_token


def _client_config(cfg, split: str, privacy: str, swarm_key, target_tbt_ms: float, mode: str, backend: str,
                   no_local_fallback: bool, verify: bool = False):
    """The swarm client's settings from `run`'s / `serve`'s options."""
    from edge_agent.discovery.trust import privacy_policy
    from edge_agent.runtime.shards import parse_range
    from edge_agent.split.client import ClientConfig

    if mode not in ("star", "chain", "auto"):
        _fail(f"--mode must be star, chain or auto (got {mode!r})")
    k, m = parse_range(split)  # ShardRangeError, PolicyError, TrustError: one line + hint (cli_errors)
    # per request, so that `edge-agent trust add` applies to a running `serve`'s next request
    policy_for = lambda level: privacy_policy(level, k, m, cfg.data_dir, swarm_key)  # noqa: E731
    return ClientConfig(policy=policy_for(privacy), policy_for=policy_for, target_tbt_ms=target_tbt_ms,
                        mode=mode, backend=backend, local_fallback=not no_local_fallback, verify=verify)


def _agent_config(data_dir, swarm_key, host, port, signal_port, peer, no_mdns, mdns_interface, transport, ice_server,
                  bootstrap=(), membership="gossip"):
    from edge_agent.config import BOOTSTRAP_FILE, bootstrap_entries
    from edge_agent.config import data_dir as resolve_data_dir
    from edge_agent.discovery.peers import parse_peer_arg
    from edge_agent.node import AgentConfig

    if membership not in ("gossip", "dht"):
        _fail(f"--membership must be gossip or dht (got {membership!r})")
    if transport not in ("auto", "tls", "webrtc"):
        _fail(f"--transport must be auto, tls or webrtc (got {transport!r})")
    if swarm_key:
        typer.secho("warning: --swarm-key is visible to every user of this machine (ps, /proc); prefer "
                    "$EDGE_AGENT_SWARM_KEY or <data dir>/swarm.key (mode 0600)", err=True, fg=typer.colors.YELLOW)
    try:
        peers = [parse_peer_arg(p) for p in peer]
        members = [parse_peer_arg(p) for p in bootstrap]
    except ValueError as exc:
        _fail(str(exc), "--peer and --bootstrap take the TLS HOST:PORT a node prints in its ready line")
    root = resolve_data_dir(data_dir)
    try:
        for number, text in bootstrap_entries(root):
            try:
                members.append(parse_peer_arg(text))
            except ValueError as exc:
                raise ValueError(f"{root / BOOTSTRAP_FILE} line {number}: {exc}") from None
    except ValueError as exc:
        _fail(str(exc), "one member's TLS HOST:PORT per line; # starts a comment")
    members = list(dict.fromkeys(members))  # given twice (option and file): asked once
    return AgentConfig(root, swarm_key, host=host, tls_port=port, signal_port=signal_port,
                       mdns=not no_mdns, interfaces=list(mdns_interface) or None, manual_peers=peers, bootstrap=members,
                       transport=transport, ice_servers=list(ice_server), membership=membership)


def parse_size_mb(text: str, option: str = "--max-memory") -> float:
    units = {"k": 1e-3, "m": 1.0, "g": 1e3, "t": 1e6}
    t = text.strip().lower().rstrip("b")
    try:
        if t and t[-1] in units:
            size = float(t[:-1]) * units[t[-1]]
            if math.isfinite(size) and size > 0:
                return size
    except ValueError:
        pass
    _fail(f"{option} needs a size with a unit, e.g. 500M or 2G (got {text!r})")
