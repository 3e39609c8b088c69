"""Speculative decoding over latency-bound links: client + 2 peers, one-token steps vs drafts.

    .venv/bin/python bench/speculate.py [--rtt-ms 0,5,20] [--loss 0.01] [--speculate 8] [--tokens 96] [--threads 2]
                                        [--flash-attn] [--modes star,chain,auto] [--link netns|relay]
    (also: bench/split.py --speculate 8 --netem-ms 0,5,20)

SmolLM2-135M-Instruct (the packaged model: a trained model, so drafts are accepted as
often as real text allows), split 1:15 and 15:29 over two `edge-agent join` peers, over TLS,
in star mode (``--modes``: chain too, and auto, which picks by the links' measured round trips).

Links (``--link``): *netns* (the default where root and /dev/net/tun allow): the client and each
peer in their own network namespace, every packet through a router namespace that holds it half
the round trip and drops a share ``--loss`` of them (``bench/netns_links.py``; the kernel's TCP
retransmits, as behind a real lossy link); chain hops forward through the router too.
*relay*: each peer behind a user-space TCP relay on loopback (``bench/delay_relay.py``) that
holds every byte half the round trip each way; no loss. Two workloads: *repetitive* (the
model rewrites a given paragraph, as in summarising or editing) and *free chat*. For each
round trip: llama.cpp alone (same run), the split with one-token steps, the split with
speculation; outputs are checked token for token against llama.cpp alone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Client, peers and llama.cpp alone share this machine's cores: every process waits passively
# (the protocol), or OpenMP's spinning threads steal the cores of whoever computes next.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

import netns_links  # noqa: E402

PARAGRAPH = ("The committee met on Tuesday to review the budget for the new library. After a long discussion, "
             "the members agreed to fund the reading room, the children's corner and the study hall, but they "
             "postponed the decision on the rooftop garden until the next meeting in spring.")
WORKLOADS = {
    "repetitive": f"Rewrite this paragraph, changing only 'Tuesday' to 'Friday':\n\n{PARAGRAPH}",
    "free chat": "What are three good habits for staying healthy? Explain each briefly.",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_relay(target_port: int, one_way_ms: float) -> tuple[subprocess.Popen, int]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "delay_relay.py"), str(port), f"127.0.0.1:{target_port}",
                             str(one_way_ms)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc, port


def reference(model: Path, prompt: list[int], n: int, threads: int, flash_attn: bool) -> tuple[list[int], float]:
    import llama_cpp as lc

    llm = lc.Llama(str(model), n_ctx=1024, n_threads=threads, n_threads_batch=threads, flash_attn=flash_attn, verbose=False)
    out, times = [], []
    try:
        for tok in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0):
            times.append(time.perf_counter())
            if llm.token_eos() == tok or len(out) >= n:
                break
            out.append(int(tok))
    finally:
        llm.close()
    return out, (len(times) - 2) / (times[-2] - times[0]) if len(times) > 2 else 0.0


def relayed_directory(agent, model_hash: str, relay_of: dict[int, int]):
    """The client's PeerDirectory, but hop links go through the relays (peers advertise their own port)."""
    from edge_agent.node import PeerDirectory
    from edge_agent.transport import tls

    class Relayed(PeerDirectory):
        def address(self, peer_id: str) -> tuple[str, int]:  # chain mode: hops forward through the relays too
            host, port = super().address(peer_id)
            return host, relay_of.get(port, port)

        async def _connect(self, entry):
            c = entry.caps
            return await tls.connect(self.agent.identity, self.agent.swarm, "127.0.0.1", relay_of[c.tls_port],
                                     expect_peer_id=c.agent_id)

    return Relayed(agent, model_hash)


async def split_runs(model: Path, peer_addresses: list[tuple[str, int]], relay_of: dict[int, int] | None, prompts: dict,
                     n: int, threads: int, flash_attn: bool, speculate: int, mode: str) -> dict:
    from edge_agent.node import Agent, AgentConfig, PeerDirectory
    from edge_agent.runtime.engine import EngineOptions
    from edge_agent.runtime.sampling import SamplingParams
    from edge_agent.runtime.shards import inspect_model
    from edge_agent.split.client import ClientConfig, SwarmClient

    info = inspect_model(model)
    out = {}
    with tempfile.TemporaryDirectory() as d:
        agent = Agent(AgentConfig(Path(d), mdns=False, manual_peers=peer_addresses))
        await agent.start()
        directory = (relayed_directory(agent, info.model_hash, relay_of) if relay_of is not None
                     else PeerDirectory(agent, info.model_hash))
        for k in (0, speculate):
            ccfg = ClientConfig(target_tbt_ms=10_000, speculate=k, mode=mode)
            await directory.wait_for_coverage(info.n_layer, ccfg.policy, 60)
            client = SwarmClient(model, directory, ccfg, EngineOptions(n_ctx_per_request=1024, max_requests=2, n_threads=threads,
                                                                       flash_attn=flash_attn))
            try:
                await client.generate([1, 2, 3, 4], SamplingParams(max_tokens=4))  # warm-up: connections, page cache
                for name, prompt in prompts.items():
                    res = await client.generate(prompt, SamplingParams(max_tokens=n))
                    out[(name, k)] = {"tok_s": res.stats["tokens_per_s"], "tokens": res.token_ids,
                                      "mode": res.stats.get("mode"), "hop_peers": [h["peer_id"] for h in res.stats["hops"]],
                                      "speculation": res.stats.get("speculation"),
                                      "transfer_ms_per_step": [round(h["transfer_ms"] / max(1, h["steps"]), 2)
                                                               for h in res.stats["hops"]]}
            finally:
                client.close()
        await directory.close()
        await agent.close()
    return out


def main() -> None:
    from edge_agent.config import packaged_model
    from edge_agent.runtime.tokenizer import Tokenizer
    from swarm_util import start_peer

    ap = argparse.ArgumentParser()
    ap.add_argument("--rtt-ms", "--netem-ms", type=lambda v: [float(x) for x in v.split(",")], default=[0.0, 5.0, 20.0])
    ap.add_argument("--speculate", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--flash-attn", action="store_true")
    ap.add_argument("--modes", default="star", help="star, chain, auto or a list: star,chain,auto")
    ap.add_argument("--loss", type=float, default=0.0, help="share of packets dropped (netns links only), e.g. 0.01")
    ap.add_argument("--link", choices=("netns", "relay"), default=None, help="default: netns where it can run, else relay")
    args = ap.parse_args()
    link = args.link or ("relay" if netns_links.unavailable() else "netns")
    if link == "netns" and netns_links.unavailable():
        sys.exit(f"--link netns: {netns_links.unavailable()}")
    if args.loss and link != "netns":
        sys.exit("--loss needs --link netns (a TCP relay cannot lose packets)")
    model = packaged_model()
    tok = Tokenizer(model)
    prompts = {name: tok.prompt_tokens(text, True) for name, text in WORKLOADS.items()}
    tok.close()
    refs = {name: reference(model, p, args.tokens, args.threads, args.flash_attn) for name, p in prompts.items()}
    fa = ["--flash-attn"] if args.flash_attn else []
    rows = []
    with tempfile.TemporaryDirectory() as d, (netns_links.NetnsLinks(2) if link == "netns" else contextlib.nullcontext()) as ns:
        peers = [start_peer(model, r, Path(d) / f"p{i}", "--threads", str(args.threads), *fa,
                            *(("--host", ns.peer_address(i)) if ns else ()), prefix=tuple(ns.command(i, [])) if ns else ())
                 for i, r in enumerate(("1:15", "15:29"))]
        if ns:
            ns.enter_client()  # from here on this process's sockets are the client's, behind the router
        try:
            for rtt, mode in ((r, m) for r in args.rtt_ms for m in args.modes.split(",")):
                relays = [] if ns else [start_relay(p.ready["tls_port"], rtt / 2) for p in peers]
                try:
                    if ns:
                        ns.set(rtt / 2, args.loss)
                        addresses, relay_of = [(ns.peer_address(i), p.ready["tls_port"]) for i, p in enumerate(peers)], None
                    else:
                        relay_of = {p.ready["tls_port"]: port for p, (_, port) in zip(peers, relays)}
                        addresses = [("127.0.0.1", port) for port in relay_of.values()]
                    runs = asyncio.run(split_runs(model, addresses, relay_of, prompts, args.tokens, args.threads,
                                                  args.flash_attn, args.speculate, mode))
                finally:
                    for proc, _ in relays:
                        proc.kill()
                for name in prompts:
                    one, spec = runs[(name, 0)], runs[(name, args.speculate)]
                    s = spec["speculation"] or {}
                    rows.append({"rtt_ms": rtt, "loss": args.loss, "mode": mode, "chosen": one["mode"], "workload": name, "llama_cpp_tok_s": round(refs[name][1], 1),
                                 "one_token_tok_s": one["tok_s"], "speculative_tok_s": spec["tok_s"],
                                 "gain": round(spec["tok_s"] / one["tok_s"], 2) if one["tok_s"] else None,
                                 "tokens_per_pass": round((s.get("accepted", 0) + s.get("passes", 0)) / s["passes"], 2)
                                 if s.get("passes") else None, "acceptance": s.get("acceptance"),
                                 "exact": one["tokens"] == refs[name][0] and spec["tokens"] == refs[name][0],
                                 "remote": "local" not in one["hop_peers"] + spec["hop_peers"],
                                 "hop_transfer_ms_per_step": one["transfer_ms_per_step"], "speculation": s})
        finally:
            for p in peers:
                p.stop()
    print(f"SmolLM2-135M Q4_1, client + 2 peers (1:15, 15:29), over TLS, {args.threads} threads, "
          f"{args.tokens} tokens, --speculate {args.speculate}, flash attention {'on' if args.flash_attn else 'off'}, "
          f"links: {link}{f', {args.loss:.1%} loss' if args.loss else ''}")
    print(f"{'RTT/hop':>7} {'mode':10} {'workload':11} {'llama.cpp':>9} {'1-token':>8} {'vs alone':>8} {'spec':>8} {'gain':>5} "
          f"{'tok/pass':>8} {'accept':>6} exact remote")
    for r in rows:
        mode = r["mode"] if r["mode"] != "auto" else f"auto:{r['chosen']}"
        print(f"{r['rtt_ms']:5.0f}ms {mode:10} {r['workload']:11} {r['llama_cpp_tok_s']:9.1f} {r['one_token_tok_s']:8.1f} "
              f"{r['one_token_tok_s'] / r['llama_cpp_tok_s']:8.2f} {r['speculative_tok_s']:8.1f} {r['gain']:5.2f} "
              f"{r['tokens_per_pass'] or 0:8.2f} {r['acceptance'] or 0:6.2f} {r['exact']} {r['remote']}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
