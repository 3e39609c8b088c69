"""``join``: a node that serves a layer range (the wiring of engine, hop server, ledger and the
capability record it advertises), on an ``node.Agent``. Split from node.py, which keeps the agent
and the client side (``swarm_client``, ``run``)."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from edge_agent.discovery.capabilities import ARITH_KEY, COMPUTE_KEY, Capabilities, features_entry
from edge_agent.directory import PeerDirectory, fetch_weights
from edge_agent.node import Agent, AgentConfig
from edge_agent.runtime.compute_class import compute_class
from edge_agent.runtime.engine import EngineOptions
from edge_agent.split.testhooks import TestHooks

log = logging.getLogger(__name__)


@dataclass
class JoinOptions:
    model: Path | None  # None: fetch the layers' weights from a peer (needs model_hash and layers)
    layers: tuple[int, int] | None = None
    backend: str = "llamacpp"
    share_gpu: bool = False
    max_memory_mb: float | None = None
    threads: int | None = None
    n_ctx: int = 2048
    max_requests: int = 2  # KV caches allocated at start: small devices first (`join --max-requests`, docs/cli/join.md)
    flash_attn: bool = False  # arithmetic settings: clients route only to nodes whose settings equal theirs
    n_ubatch: int = 512
    discover_s: float = 2.0
    idle_timeout_s: float = 600.0  # free the KV cache of a request idle this long
    model_hash: str | None = None  # with model=None: the model whose weights to fetch from a peer
    share_weights: bool = True  # let peers that lack the model fetch layer ranges from us
    hooks: TestHooks = field(default_factory=TestHooks)  # test only: a slow or lying node

    def engine_options(self, gpu_layers: int = 0) -> EngineOptions:
        return EngineOptions(n_ctx_per_request=self.n_ctx, max_requests=self.max_requests, n_threads=self.threads,
                             gpu_layers=gpu_layers, flash_attn=self.flash_attn, n_ubatch=self.n_ubatch)


def measure_ms_per_layer(engine, steps: int = 8) -> float:
    """Decode a few random rows to advertise an honest ms per layer per token."""
    import numpy as np

    from edge_agent.runtime.engine import StepInput

    rid = "__calibration__"
    x = np.random.default_rng(0).standard_normal((steps + 1, engine.info.n_embd)).astype(np.float32) * 0.1
    engine.forward([StepInput(rid, 0, x[:1])])
    t0 = time.perf_counter()
    for p in range(1, steps + 1):
        engine.forward([StepInput(rid, p, x[p : p + 1])])
    engine.end_request(rid)
    return (time.perf_counter() - t0) * 1000.0 / steps / engine.info.n_layers


def choose_layers(agent: Agent, info, opts: JoinOptions) -> tuple[int, int]:
    """No --layers: fill the swarm's weakest coverage, within our memory (Petals' rule); only
    nodes with our arithmetic settings count (the others serve other clients)."""
    from edge_agent.runtime.backends import resolve_backend
    from edge_agent.split.joining import choose_range_to_serve
    from edge_agent.split.policy import PrivacyPolicy

    policy = PrivacyPolicy()
    layer_mb = info.file_size / 1e6 / max(1, info.n_layer)
    capacity = info.n_layer if opts.max_memory_mb is None else max(1, int(opts.max_memory_mb // max(layer_mb, 1e-6)))
    arithmetic = opts.engine_options().arithmetic(resolve_backend(opts.backend))
    peers = PeerDirectory(agent, info.model_hash, arithmetic).capabilities()
    return choose_range_to_serve(info.n_layer, policy, peers, capacity)



async def join(config: AgentConfig, opts: JoinOptions, on_ready=None, on_progress=None) -> None:
    """Run a node that serves a layer range until SIGTERM/SIGINT."""
    from edge_agent.discovery.mdns import install_shutdown_handler
    from edge_agent.runtime.backends import load_engine
    from edge_agent.runtime.shards import inspect_model
    from edge_agent.split.serve import HopServer
    from edge_agent.split.weights import WeightSource

    opts.hooks.check_enabled()
    agent = Agent(config)
    await agent.start()
    try:
        gpu = gpu_layers(opts.share_gpu)
        eopts = opts.engine_options(gpu)
        shards_dir = config.data_dir / "shards"
        if opts.model is None:
            if not (opts.model_hash and opts.layers):
                raise ValueError("without a model file, join needs --model-hash and --layers to fetch weights from a peer")
            source = await fetch_weights(agent, opts.model_hash, opts.layers, shards_dir, on_progress)
            model_hash = opts.model_hash
            from edge_agent.runtime.llamacpp import LlamaCppEngine

            engine = await asyncio.to_thread(LlamaCppEngine, source, eopts)
        else:
            info = await asyncio.to_thread(inspect_model, opts.model)  # hashing a big model takes a while
            model_hash = info.model_hash
            if opts.layers is None:
                await asyncio.sleep(opts.discover_s)
                opts.layers = choose_layers(agent, info, opts)
            engine = await asyncio.to_thread(load_engine, opts.backend, opts.model, *opts.layers, eopts, shards_dir)
            model_hash = opts.hooks.claim_model_hash or model_hash
        ms = await asyncio.to_thread(measure_ms_per_layer, engine)
        sharing = opts.model is not None and opts.share_weights
        ledger = agent.open_ledger()  # commitments per chunk, receipts countersigned, sync answered on the hop listener
        from edge_agent.split.testhooks import fault_engine

        cheat = fault_engine(opts.hooks.fault, lambda path, a, b: load_engine(opts.backend, path, a, b, eopts, shards_dir),
                             opts.model, shards_dir)
        server = HopServer([engine], agent.identity.agent_id, idle_timeout_s=opts.idle_timeout_s, hooks=opts.hooks, fault_engine=cheat,
                           info_extra=agent.info_extra, connect=agent.connect_next,
                           ledger=ledger.service if ledger is not None else None,
                           weights=WeightSource(opts.model, shards_dir) if sharing else None,
                           loader=(lambda a, b: load_engine(opts.backend, opts.model, a, b, eopts, shards_dir)) if opts.model else None)
        extra = [(ARITH_KEY, eopts.arithmetic(engine.backend).to_text()),
                 (COMPUTE_KEY, compute_class(engine.backend, eopts.gpu_layers).to_text())]  # picks its audits' tolerance
        if sharing:
            extra.append(("w", "1"))  # this node can share the model's weights
        if not opts.hooks.hide_features:  # speculative steps: clients send them only to nodes that say so
            extra.append(features_entry())
        caps = Capabilities(agent.identity.agent_id, shards=((model_hash[:16], *opts.layers),), free_mem_mb=_free_memory_mb(),
                            ms_per_layer=ms if opts.hooks.advertise_ms is None else opts.hooks.advertise_ms,
                            backend=("gpu" if gpu else engine.backend), extra=tuple(extra))
        if ledger is not None:
            server.observers.add(ledger.node_recorder(lambda a, b: (model_hash, server.shards[(a, b)].engine.info.shard_hash)).observe)
        caps = await agent.serve(server, caps)
        ready = {"agent_id": agent.identity.agent_id, "layers": list(opts.layers), "tls_port": caps.tls_port,
                 "signal_port": caps.signal_port, "ms_per_layer": round(ms, 4), "gpu_layers": gpu,
                 "model_hash": model_hash, "shard_hash": engine.info.shard_hash}
        if on_ready:
            on_ready(ready)
        done = install_shutdown_handler(agent.close)
        await done.wait()
    finally:
        await agent.close()


def gpu_layers(share_gpu: bool) -> int:
    """--share-gpu offloads every layer when llama.cpp was built with a GPU backend, else none."""
    if not share_gpu:
        return 0
    import llama_cpp

    if llama_cpp.llama_supports_gpu_offload():
        return 999
    log.warning("--share-gpu: this llama.cpp build has no GPU backend; serving on the CPU")
    return 0


def _free_memory_mb() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available // 2**20)
    except Exception:  # noqa: BLE001
        return 0
