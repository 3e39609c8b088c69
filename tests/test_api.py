"""`edge-agent serve` through a real client + 2 peers swarm (separate processes, loopback), driven
by the official `openai` package: exact greedy output, streaming, concurrency, errors, disconnects."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import subprocess
import sys
import time
from urllib.parse import urlparse

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from api_util import API_KEY, start_server, start_swarm
from conftest import reference_tokens

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def swarm(smollm_path, tmp_path_factory):
    peers, server = start_swarm(smollm_path, tmp_path_factory.mktemp("api"), "--api-key", API_KEY, "--max-concurrent", "10",
                                peer_extra=("--max-requests", "10"))
    yield peers, server
    server.stop()
    for p in peers:
        p.stop()


@pytest.fixture(scope="module")
def tok(smollm_path):
    from edge_agent.runtime.tokenizer import Tokenizer

    t = Tokenizer(smollm_path)
    yield t
    t.close()


@pytest.fixture(scope="module")
def client(swarm):
    return openai.OpenAI(base_url=swarm[1].url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def model_id(swarm) -> str:
    return swarm[1].ready["model"]


def chat_prompt(tok, messages) -> list[int]:
    return tok.encode(tok.apply_chat_template(messages), add_special=True, parse_special=True)


def expected_chat(tok, model, messages, n) -> str:
    return tok.decode(reference_tokens(model, chat_prompt(tok, messages), n))


def raw(server, method: str, path: str, body: bytes | None = None, key: str | None = API_KEY) -> tuple[int, dict]:
    u = urlparse(server.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    conn.request(method, path, body=body, headers=headers)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, (json.loads(data) if resp.getheader("Content-Type", "").startswith("application/json") else {"text": data.decode()})


def test_serve_refuses_an_open_lan_api_in_one_line(smollm_path, tmp_path):
    args = [sys.executable, "-m", "edge_agent", "serve", "--model", str(smollm_path), "--host", "0.0.0.0", "--no-mdns",
            "--data-dir", str(tmp_path)]
    env = {k: v for k, v in os.environ.items() if k != "EDGE_AGENT_API_KEY"}
    res = subprocess.run(args, capture_output=True, text=True, timeout=60, env=env)
    assert res.returncode == 2 and "--api-key" in res.stderr and "--no-auth" in res.stderr
    lines = res.stderr.strip().splitlines()  # one line, and at most a hint
    assert "Traceback" not in res.stderr and len(lines) <= 2 and all(x.startswith(("error:", "hint:")) for x in lines)


def test_models_and_health(swarm, client):
    assert [m.id for m in client.models.list().data] == [model_id(swarm)]
    status, body = raw(swarm[1], "GET", "/health", key=None)
    assert status == 200 and body["peers"] == 2 and body["covered"] is True


def test_chat_matches_llama_cpp_with_path_and_usage(swarm, client, tok, smollm_path):
    peers = swarm[0]
    r = client.chat.completions.create(model=model_id(swarm), messages=CHAT, temperature=0, max_tokens=24)
    want = reference_tokens(smollm_path, chat_prompt(tok, CHAT), 24)
    assert r.choices[0].message.content == tok.decode(want)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(chat_prompt(tok, CHAT)), len(want))
    ext = r.model_extra["x_edge_agent"]
    assert [(h["peer_id"], h["range"]) for h in ext["path"]] == [(peers[0].agent_id, "1:15"), (peers[1].agent_id, "15:29")]
    assert sorted(ext["activations_seen_by"]) == sorted(p.agent_id for p in peers)
    assert ext["privacy"] == "open"
    assert all(h["compute_ms"] > 0 and h["steps"] == r.usage.completion_tokens for h in ext["hops"])
    assert ext["reroutes"] == [] and ext["local_layers"] == ["0:1", "29:30"] and ext["slack_ms"] is not None


def test_streamed_chat_equals_whole_answer(swarm, client, tok, smollm_path):
    stream = client.chat.completions.create(model=model_id(swarm), messages=CHAT, temperature=0, max_tokens=24, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected_chat(tok, smollm_path, CHAT, 24)
    assert chunks[-1].usage.completion_tokens == 24 and chunks[-1].model_extra["x_edge_agent"]["path"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


@pytest.mark.parametrize("stream", [False, True])
def test_completions_match_llama_cpp(swarm, client, tok, smollm_path, stream):
    prompt = "The capital of France is"
    want = tok.decode(reference_tokens(smollm_path, tok.encode(prompt), 16))
    r = client.completions.create(model=model_id(swarm), prompt=prompt, temperature=0, max_tokens=16, stream=stream)
    text = "".join(c.choices[0].text for c in r if c.choices) if stream else r.choices[0].text
    assert text == want
    if not stream:
        assert r.usage.prompt_tokens == len(tok.encode(prompt)) and r.usage.completion_tokens == 16


def test_stop_string_is_never_streamed(swarm, client):
    kw = dict(model=model_id(swarm), prompt="The capital of France is", temperature=0, max_tokens=16, stop=[" capital"])
    whole = client.completions.create(**kw).choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True) if c.choices)
    assert streamed == whole and " capital" not in whole


@pytest.mark.slow
def test_ten_concurrent_streaming_clients(swarm, tok, smollm_path):
    questions = ["What is the capital of France?", "Name a colour.", "What is 2 + 2?"]
    convs = [[{"role": "user", "content": questions[i % 3]}] for i in range(10)]
    want = {q: expected_chat(tok, smollm_path, [{"role": "user", "content": q}], 12) for q in questions}

    async def one(c, messages):
        stream = await c.chat.completions.create(model=model_id(swarm), messages=messages, temperature=0, max_tokens=12,
                                                 stream=True)
        return "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])

    async def main():
        c = openai.AsyncOpenAI(base_url=swarm[1].url + "/v1", api_key=API_KEY, max_retries=0, timeout=300)
        try:
            return await asyncio.gather(*(one(c, m) for m in convs))
        finally:
            await c.close()

    got = asyncio.run(main())
    assert got == [want[m[0]["content"]] for m in convs]


def _announce_huge_body(server) -> dict:
    u = urlparse(server.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    conn.putrequest("POST", "/v1/chat/completions")
    conn.putheader("Authorization", f"Bearer {API_KEY}")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(64 << 20))
    conn.endheaders()  # and no body: the server must answer from the header alone
    resp = conn.getresponse()
    body = json.loads(resp.read())
    conn.close()
    assert resp.status == 413
    return body


def test_bad_requests_get_openai_errors(swarm, client):
    s, m = swarm[1], model_id(swarm)
    cases = [
        (b"{not json", 400, "invalid_json", None),
        (json.dumps({"model": m, "messages": "hello"}).encode(), 400, "invalid_value", "messages"),
        (json.dumps({"model": m, "messages": CHAT, "max_tokens": "many"}).encode(), 400, "invalid_value", "max_tokens"),
        (json.dumps({"model": m, "messages": CHAT, "temperature": 9}).encode(), 400, "invalid_value", "temperature"),
        (json.dumps({"model": "gpt-4", "messages": CHAT}).encode(), 404, "model_not_found", "model"),
        (json.dumps({"model": m, "messages": CHAT, "max_tokens": 100000}).encode(), 400, "context_length_exceeded", "max_tokens"),
        (json.dumps({"model": m, "messages": [{"role": "user", "content": "word " * 700}]}).encode(), 400,
         "context_length_exceeded", "messages"),
        (json.dumps({"model": m, "messages": CHAT, "n": 2}).encode(), 400, "invalid_value", "n"),
    ]
    for body, status, code, param in cases:
        got, err = raw(s, "POST", "/v1/chat/completions", body)
        assert (got, err["error"]["code"], err["error"]["param"]) == (status, code, param), err
        assert set(err["error"]) == {"message", "type", "param", "code"}
    assert _announce_huge_body(s)["error"]["code"] == "body_too_large"  # refused before any byte is read
    assert raw(s, "POST", "/v1/chat/completions", json.dumps({"model": m, "messages": CHAT}).encode(), key=None)[0] == 401
    assert raw(s, "POST", "/v1/completions", json.dumps({"model": m, "prompt": "x"}).encode(), key="wrong-key-123")[0] == 401
    assert raw(s, "GET", "/v1/nothing-here")[1]["error"]["code"] == "not_found"
    with pytest.raises(openai.NotFoundError, match="not served here") as info:
        client.completions.create(model="gpt-4", prompt="hi")
    assert info.value.code == "model_not_found"
    assert client.completions.create(model=m, prompt="Hi", max_tokens=2).usage.completion_tokens == 2  # still serving


def llama_cpp_conversation(model, tok, turns: list[str], n: int) -> list[str]:
    """llama-cpp-python answering a chat turn by turn with one Llama (it reuses its KV for the prefix)."""
    import llama_cpp as lc

    llm = lc.Llama(str(model), n_ctx=512, n_batch=512, n_ubatch=512, n_threads=2, n_threads_batch=2, verbose=False)
    messages, answers = [], []
    try:
        for question in turns:
            messages.append({"role": "user", "content": question})
            out = []
            for t in llm.generate(chat_prompt(tok, messages), top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
                if tok.is_end(t) or len(out) >= n:
                    break
                out.append(int(t))
            answers.append(tok.decode(out))
            messages.append({"role": "assistant", "content": answers[-1]})
    finally:
        llm.close()
    return answers


def test_next_turn_extends_the_kept_kv_and_matches_llama_cpp(swarm, client, tok, smollm_path):
    turns = ["What is the capital of France?", "And the capital of Italy?", "Thanks!"]
    messages, replies = [], []
    for question in turns:
        messages.append({"role": "user", "content": question})
        replies.append(client.chat.completions.create(model=model_id(swarm), messages=messages, temperature=0, max_tokens=12))
        messages.append({"role": "assistant", "content": replies[-1].choices[0].message.content})
    assert [r.choices[0].message.content for r in replies] == llama_cpp_conversation(smollm_path, tok, turns, 12)
    first = replies[0].model_extra["x_edge_agent"]
    for before, r in zip(replies, replies[1:]):
        ext = r.model_extra["x_edge_agent"]
        # the previous turn's prompt and answer were not recomputed (an answer cut by max_tokens
        # never fed its last token), neither here nor on the hops: they extended their KV (a hop
        # without it would have failed and been rebuilt by replay, a re-route)
        unfed = 1 if before.choices[0].finish_reason == "length" else 0
        assert ext["kv_reused_tokens"] == before.usage.prompt_tokens + before.usage.completion_tokens - unfed
        assert ext["path"] == first["path"] and ext["reroutes"] == []
    text = raw(swarm[1], "GET", "/metrics", key=None)[1]["text"]
    reused = [smp.value for f in text_string_to_metric_families(text) if f.name == "edge_agent_prompt_tokens_reused"
              for smp in f.samples if smp.name.endswith("_total")]
    assert reused and reused[0] >= sum(r.model_extra["x_edge_agent"]["kv_reused_tokens"] for r in replies)


def _disconnect_mid_stream(server) -> None:
    u = urlparse(server.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    body = json.dumps({"model": server.ready["model"], "prompt": "Once upon a time", "max_tokens": 400, "stream": True})
    conn.request("POST", "/v1/completions", body=body, headers={"Authorization": f"Bearer {API_KEY}"})
    resp = conn.getresponse()
    assert resp.status == 200
    seen = 0
    while seen < 3:
        seen += resp.readline().startswith(b"data: ")
    conn.sock.close()  # the client goes away mid-answer
    conn.close()


def test_disconnect_ends_the_request_on_every_hop(swarm, client):
    # The peers hold 10 KV slots each: were a disconnected request's KV kept on any hop,
    # twelve disconnects would leave no slot and the next request would fail.
    server = swarm[1]
    for _ in range(12):
        _disconnect_mid_stream(server)
    deadline = time.monotonic() + 30
    while raw(server, "GET", "/health")[1]["requests_in_flight"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert raw(server, "GET", "/health")[1]["requests_in_flight"] == 0
    r = client.completions.create(model=model_id(swarm), prompt="The capital of France is", temperature=0, max_tokens=4)
    assert r.model_extra["x_edge_agent"]["reroutes"] == [] and "local" not in str(r.model_extra["x_edge_agent"]["path"])
    families = {f.name: f for f in text_string_to_metric_families(raw(server, "GET", "/metrics")[1]["text"])}
    cancelled = [smp.value for smp in families["edge_agent_requests"].samples
                 if smp.name.endswith("_total") and smp.labels.get("outcome") == "cancelled"]
    assert sum(cancelled) >= 12


def test_metrics_parse_as_prometheus_text(swarm, client):
    client.completions.create(model=model_id(swarm), prompt="Hello", max_tokens=3, temperature=0)
    text = raw(swarm[1], "GET", "/metrics", key=None)[1]["text"]
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("edge_agent_time_to_first_token_seconds", "edge_agent_time_between_tokens_seconds",
                 "edge_agent_request_duration_seconds", "edge_agent_step_slack_seconds", "edge_agent_hop_slack_seconds"):
        assert families[name].type == "histogram"
    assert {s.labels["layers"] for s in families["edge_agent_hop_slack_seconds"].samples} == {"1:15", "15:29"}
    for name in ("edge_agent_requests", "edge_agent_prompt_tokens", "edge_agent_completion_tokens", "edge_agent_hop_compute_seconds",
                 "edge_agent_hop_transfer_seconds", "edge_agent_deadline_misses", "edge_agent_reroutes",
                 "edge_agent_activation_bytes_sent"):
        assert families[name].type == "counter"

    def value(name, **labels):
        return sum(s.value for s in families[name].samples if all(s.labels.get(k) == v for k, v in labels.items())
                   and not s.name.endswith("_created"))

    assert value("edge_agent_peers") == 2 and value("edge_agent_requests_in_flight") == 0
    assert {s.labels["layers"] for s in families["edge_agent_peer_layers"].samples} == {"1:15", "15:29"}
    assert value("edge_agent_requests", outcome="ok") >= 1 and value("edge_agent_completion_tokens") >= 3
    assert value("edge_agent_hop_compute_seconds", layers="1:15") > 0 and value("edge_agent_hop_compute_seconds", layers="15:29") > 0
    assert value("edge_agent_activation_bytes_per_token") > 0
    ttft_count = [s.value for s in families["edge_agent_time_to_first_token_seconds"].samples if s.name.endswith("_count")]
    assert sum(ttft_count) >= 1


@pytest.mark.slow
def test_no_route_is_503_naming_the_missing_layers(swarm, smollm_path, tmp_path):
    only_first = swarm[0][:1]  # serves 1:15; nobody serves 15:29
    server = start_server(smollm_path, only_first, tmp_path / "api", "--no-local-fallback", "--discover", "0.5")
    try:
        status, body = raw(server, "POST", "/v1/completions", json.dumps({"model": server.ready["model"], "prompt": "Hi"}).encode())
        assert status == 503 and body["error"]["code"] == "no_route" and "layers 15-28" in body["error"]["message"]
        assert raw(server, "GET", "/health")[1]["covered"] is False
    finally:
        server.stop()


def test_a_request_may_tighten_the_privacy_never_loosen_it(swarm, smollm_path, tok, tmp_path):
    """The server's default is open; a request's `privacy` field tightens it for that request
    only. The trust list is read per request, so `trust add` applies without a restart."""
    from edge_agent.discovery.trust import TrustList

    peers, server = swarm
    prompt = "The capital of France is"
    ask = lambda **extra: raw(server, "POST", "/v1/completions", json.dumps(  # noqa: E731
        {"model": model_id(swarm), "prompt": prompt, "max_tokens": 6, "temperature": 0, **extra}).encode())
    want = tok.decode(reference_tokens(smollm_path, tok.encode(prompt, add_special=True), 6))

    status, body = ask(privacy="local")  # the whole model on the API's own device
    assert status == 200 and body["choices"][0]["text"] == want
    assert body["x_edge_agent"]["privacy"] == "local" and body["x_edge_agent"]["activations_seen_by"] == []

    trust = TrustList(server.log.parent)  # the API agent's data dir
    status, body = ask(privacy="trusted")  # nobody trusted yet: fails, naming the layers
    assert status == 503 and "no trusted peer holds layers 1-28" in body["error"]["message"]
    trust.add(peers[0].agent_id, "first")
    status, body = ask(privacy="trusted")
    assert status == 503 and "no trusted peer holds layers 15-28" in body["error"]["message"]
    assert peers[1].agent_id[:12] in body["error"]["message"]  # the untrusted peer that could serve them
    trust.add(peers[1].agent_id, "second")
    status, body = ask(privacy="trusted")
    assert status == 200 and body["choices"][0]["text"] == want
    assert sorted(body["x_edge_agent"]["activations_seen_by"]) == sorted(p.agent_id for p in peers)

    status, body = ask(privacy="paranoid")
    assert status == 400 and body["error"]["param"] == "privacy"


def test_a_request_cannot_loosen_a_trusted_server(smollm_path, tmp_path):
    server = start_server(smollm_path, [], tmp_path / "api", "--privacy", "trusted", "--discover", "0")
    try:
        for level in ("open", None):
            status, body = raw(server, "POST", "/v1/completions", json.dumps(
                {"model": server.ready["model"], "prompt": "Hi", "max_tokens": 2, **({"privacy": level} if level else {})}).encode())
            if level == "open":
                assert status == 400 and "would loosen this agent's 'trusted'" in body["error"]["message"]
            else:  # the default: trusted, with nobody trusted
                assert status == 503 and "no trusted peer holds" in body["error"]["message"]
    finally:
        server.stop()
