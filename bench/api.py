"""API benchmark: `edge-agent serve` vs. the split client `run` uses, on the same client + 2 peers swarm.

    .venv/bin/python bench/api.py [--rounds N] [--tokens N]

SmolLM2-135M-Instruct (the packaged model), peers on layers 1:15 and 15:29 as separate
processes on loopback, and a `serve` process in front of them. Interleaved rounds, medians:
- TTFT: a streamed chat request (HTTP client: send -> first content chunk) against
  SwarmClient.generate in this process (what `run` does after start-up) for the same prompt;
  and, less noisy, against the server's own token loop for the same request (x_edge_agent);
- TBT: the gaps between streamed chunks against the token loop's own gaps (both ways);
- aggregate tokens/s with 1, 4 and 8 concurrent streaming clients;
- turn-2 TTFT of a chat with a ~512-token history: extending turn 1's kept KV against
  recomputing the whole prompt (same answer asserted).
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import statistics
import sys
import tempfile
import time
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from api_util import start_swarm  # noqa: E402

MESSAGES = [{"role": "user", "content": "Write a short poem about the sea."}]
CTX = 1024  # room for the ~512-token history of the turn-2 measurement


def _stream_chat(url: str, model: str, n_tokens: int, messages: list[dict]) -> tuple[float, list[float], list[str], dict]:
    # http.client, not aiohttp: aiohttp's line reader held streamed events back ~40 ms here
    u = urlparse(url)
    body = json.dumps({"model": model, "messages": messages, "max_tokens": n_tokens, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}})
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:500]!r}")
    stamps, text, last = [], [], {}
    while True:
        line = resp.readline().decode().strip()
        if not line or line == "data: [DONE]":
            if line:
                break
            continue
        chunk = json.loads(line[6:])
        if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
            stamps.append(time.perf_counter())
            text.append(chunk["choices"][0]["delta"]["content"])
        last = chunk
    conn.close()
    return t0, stamps, text, last


async def stream_chat(url: str, model: str, n_tokens: int, messages: list[dict] = MESSAGES) -> dict:
    """One streamed chat request; client-side TTFT, chunk gaps, token count, answer and extension."""
    t0, stamps, text, last = await asyncio.to_thread(_stream_chat, url, model, n_tokens, messages)
    gaps = [(b - a) * 1000 for a, b in zip(stamps, stamps[1:])]
    ext = last["x_edge_agent"]
    out = {"ttft_ms": (stamps[0] - t0) * 1000, "tbt_ms": statistics.median(gaps) if gaps else None,
           "tokens": last["usage"]["completion_tokens"], "text": "".join(text), "ext": ext}
    # the same request seen by the server's token loop: what HTTP, JSON, template and SSE add to it
    out["ttft_overhead_ms"] = out["ttft_ms"] - ext["ttft_ms"]
    if gaps and ext["tbt_ms"] is not None:
        out["tbt_overhead_ms"] = statistics.fmean(gaps) - ext["tbt_ms"]
    return out


async def second_turn(url: str, model: str, history_words: int) -> dict:
    """Turn 2 of a chat whose history is ~512 tokens: reusing turn 1's KV, then recomputing it all."""
    history = [{"role": "user", "content": "Here are my notes: " + " ".join(f"item{i % 97}" for i in range(history_words))
                + ". What do they say?"}]
    first = await stream_chat(url, model, 16, history)
    turn2 = [*history, {"role": "assistant", "content": first["text"]}, {"role": "user", "content": "Say it shorter."}]
    reused = await stream_chat(url, model, 4, turn2)  # extends turn 1's kept KV
    fresh = await stream_chat(url, model, 4, turn2)  # nothing kept matches: the whole prompt again
    assert reused["text"] == fresh["text"] and fresh["ext"]["kv_reused_tokens"] == 0
    return {"reused_ms": reused["ttft_ms"], "recompute_ms": fresh["ttft_ms"], "history_tokens": reused["ext"]["kv_reused_tokens"]}


async def generate_direct(client, prompt: list[int], params) -> dict:
    """Measured like the API side: call -> first token delivered, then the gaps between tokens."""
    stamps = []
    t0 = time.perf_counter()
    await client.generate(prompt, params, lambda _t, _text: stamps.append(time.perf_counter()))
    gaps = [(b - a) * 1000 for a, b in zip(stamps, stamps[1:])]
    return {"ttft_ms": (stamps[0] - t0) * 1000, "tbt_ms": statistics.median(gaps)}


@asynccontextmanager
async def direct_client(model: Path, peers):
    """The split client `run` drives (node.swarm_client), in this process, on the same peers."""
    from edge_agent.node import AgentConfig, swarm_client
    from edge_agent.runtime.engine import EngineOptions
    from edge_agent.split.client import ClientConfig

    with tempfile.TemporaryDirectory() as d:
        cfg = AgentConfig(Path(d), mdns=False, manual_peers=[("127.0.0.1", p.ready["tls_port"]) for p in peers])
        async with swarm_client(cfg, model, ClientConfig(), EngineOptions(n_ctx_per_request=CTX, max_requests=2),
                                discover_s=60) as client:
            yield client


async def measure(model: Path, peers, server, rounds: int, n_tokens: int, history_words: int) -> dict:
    from edge_agent.runtime.sampling import SamplingParams

    async with direct_client(model, peers) as client:
        tok = client.tokenizer
        prompt = tok.encode(tok.apply_chat_template(MESSAGES), add_special=True, parse_special=True)
        params = SamplingParams(max_tokens=n_tokens)
        api, direct = [], []
        model_id = server.ready["model"]
        await stream_chat(server.url, model_id, 4)  # warm-up: connections, page cache
        await client.generate(prompt, SamplingParams(max_tokens=4))
        for _ in range(rounds):  # interleaved so both see the same machine load
            api.append(await stream_chat(server.url, model_id, n_tokens))
            direct.append(await generate_direct(client, prompt, params))
        throughput = {}
        for n in (1, 4, 8):
            t0 = time.perf_counter()
            runs = await asyncio.gather(*(stream_chat(server.url, model_id, n_tokens) for _ in range(n)))
            throughput[n] = round(sum(r["tokens"] for r in runs) / (time.perf_counter() - t0), 2)
        turns = [await second_turn(server.url, model_id, history_words) for _ in range(max(3, rounds // 2))]
    med = lambda rows, key: round(statistics.median(r[key] for r in rows), 3)  # noqa: E731
    return {
        "rounds": rounds, "tokens": n_tokens, "prompt_tokens": len(prompt),
        "ttft_ms": {"api": med(api, "ttft_ms"), "run": med(direct, "ttft_ms"),
                    "added": round(med(api, "ttft_ms") - med(direct, "ttft_ms"), 3),
                    "added_same_request": med(api, "ttft_overhead_ms")},
        "tbt_ms": {"api": med(api, "tbt_ms"), "run": med(direct, "tbt_ms"),
                   "added": round(med(api, "tbt_ms") - med(direct, "tbt_ms"), 3),
                   "added_same_request": med(api, "tbt_overhead_ms")},
        "aggregate_tok_s": throughput,
        "turn2_ttft_ms": {"history_tokens": turns[0]["history_tokens"], "kv_reused": med(turns, "reused_ms"),
                          "recomputed": med(turns, "recompute_ms"),
                          "speedup": round(med(turns, "recompute_ms") / med(turns, "reused_ms"), 2)},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--history-words", type=int, default=160, help="turn-1 prompt size (160 words + a 16-token answer: ~512 tokens of history)")
    args = ap.parse_args()
    from edge_agent.config import resolve_model

    model = resolve_model()
    with tempfile.TemporaryDirectory() as d:
        peers, server = start_swarm(model, Path(d), "--max-concurrent", "8", "--ctx", str(CTX),
                                    peer_extra=("--max-requests", "10", "--ctx", str(CTX)))
        try:
            out = asyncio.run(measure(model, peers, server, args.rounds, args.tokens, args.history_words))
        finally:
            server.stop()
            for p in peers:
                p.stop()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
