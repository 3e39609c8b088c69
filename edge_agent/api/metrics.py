"""Prometheus metrics of the API and the swarm behind it (prometheus_client, own registry).

The latency metrics the DIN and inference-framework drafts ask for: TTFT, TBT, end-to-end
latency, tokens/s, requests in flight and per second (``rate(..._requests_total)``),
token counts, per-hop compute / transfer / slack, deadline misses, re-routes, peers and
their layers, and activation bytes this device sent per token.
"""

from __future__ import annotations

import time
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily

from edge_agent.api.engine import ClientGone, Flight
from edge_agent.runtime.generation import GenerationResult

# seconds; a CPU swarm of small devices spans ~10 ms to tens of seconds
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_GAPS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5)
_SLACK = (-0.5, -0.1, -0.05, -0.01, 0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0)


class _PeerCollector:
    """Peers seen and the layers they serve, read from the peer table at scrape time."""

    def __init__(self, peers: Callable[[], list[dict]]):
        self._peers = peers

    def collect(self):
        seen = GaugeMetricFamily("edge_agent_peers", "Peers of this swarm that serve this model")
        layers = GaugeMetricFamily("edge_agent_peer_layers", "Layers a peer serves (value: layer count)",
                                   labels=["peer", "layers", "backend"])
        speed = GaugeMetricFamily("edge_agent_peer_ms_per_layer", "A peer's advertised milliseconds per layer per token",
                                  labels=["peer"])
        peers = self._peers()
        seen.add_metric([], len(peers))
        for p in peers:
            for a, b in p["ranges"]:
                layers.add_metric([p["peer_id"][:16], f"{a}:{b}", p["backend"]], b - a)
            speed.add_metric([p["peer_id"][:16]], p["ms_per_layer"])
        yield from (seen, layers, speed)


class ApiMetrics:
    def __init__(self, peers: Callable[[], list[dict]], bytes_per_row: int):
        disable_created_metrics()  # the *_created series only add noise to every scrape
        r = self.registry = CollectorRegistry()
        self.bytes_per_row = bytes_per_row  # one hidden-state row (f32 x n_embd)
        self.ttft = Histogram("edge_agent_time_to_first_token_seconds", "Request arrival to first token (queue included)",
                              ["endpoint"], buckets=_LATENCY, registry=r)
        self.tbt = Histogram("edge_agent_time_between_tokens_seconds", "Gap between consecutive streamed tokens",
                             buckets=_GAPS, registry=r)
        self.e2e = Histogram("edge_agent_request_duration_seconds", "Request arrival to last token", ["endpoint"],
                             buckets=_LATENCY, registry=r)
        self.requests = Counter("edge_agent_requests", "Requests answered, by endpoint and outcome",
                                ["endpoint", "outcome"], registry=r)
        self.in_flight = Gauge("edge_agent_requests_in_flight", "Requests generating or queued for a KV slot", registry=r)
        self.prompt_tokens = Counter("edge_agent_prompt_tokens", "Prompt tokens processed", registry=r)
        self.completion_tokens = Counter("edge_agent_completion_tokens", "Tokens generated", registry=r)
        self.reused_tokens = Counter("edge_agent_prompt_tokens_reused", "Prompt tokens found in a kept conversation's KV "
                                     "(not recomputed)", registry=r)
        self.kept = Gauge("edge_agent_conversations_kept", "Finished conversations whose KV stays for a next turn",
                          registry=r)
        self.tokens_per_s = Gauge("edge_agent_decode_tokens_per_second", "Decode speed of the last finished request",
                                  registry=r)
        self.hop_compute = Counter("edge_agent_hop_compute_seconds", "Compute time peers reported per hop",
                                   ["peer", "layers"], registry=r)
        self.hop_transfer = Counter("edge_agent_hop_transfer_seconds", "Round trip minus compute per hop",
                                    ["peer", "layers"], registry=r)
        self.hop_steps = Counter("edge_agent_hop_steps", "Steps each hop computed", ["peer", "layers"], registry=r)
        self.hop_slack = Histogram("edge_agent_hop_slack_seconds", "Per request and hop: the hop's deadline budget "
                                   "minus its mean step time (compute + transfer)", ["peer", "layers"],
                                   buckets=_SLACK, registry=r)
        self.slack = Histogram("edge_agent_step_slack_seconds", "Per request: deadline budget minus mean step time",
                               buckets=_SLACK, registry=r)
        self.misses = Counter("edge_agent_deadline_misses", "Decode steps over their deadline", registry=r)
        self.reroutes = Counter("edge_agent_reroutes", "Hops moved to another peer mid-request", registry=r)
        self.bytes_sent = Counter("edge_agent_activation_bytes_sent", "Hidden-state bytes this device sent to peers",
                                  registry=r)
        self.bytes_per_token = Gauge("edge_agent_activation_bytes_per_token",
                                     "Hidden-state bytes sent per generated token (last request)", registry=r)
        r.register(_PeerCollector(peers))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def gap(self, seconds: float) -> None:
        self.tbt.observe(seconds)

    def finished(self, flight: Flight, outcome: object) -> None:
        ep = flight.endpoint
        if flight.first_token_at is not None:
            self.ttft.labels(ep).observe(flight.first_token_at - flight.started)
        self.e2e.labels(ep).observe(time.perf_counter() - flight.started)
        self.completion_tokens.inc(flight.completion_tokens)
        if not isinstance(outcome, GenerationResult):
            self.requests.labels(ep, "cancelled" if isinstance(outcome, ClientGone) else "error").inc()
            return
        self.requests.labels(ep, "ok").inc()
        self.prompt_tokens.inc(outcome.prompt_tokens)
        self.reused_tokens.inc(outcome.stats.get("kv_reused_tokens", 0))
        s = outcome.stats
        if s.get("tokens_per_s"):
            self.tokens_per_s.set(s["tokens_per_s"])
        for h in s.get("hops", []):
            key = (h["peer_id"][:16], h["range"])
            self.hop_compute.labels(*key).inc(h["compute_ms"] / 1000.0)
            self.hop_transfer.labels(*key).inc(h["transfer_ms"] / 1000.0)
            self.hop_steps.labels(*key).inc(h["steps"])
            if h["steps"]:
                mean_ms = (h["compute_ms"] + h["transfer_ms"]) / h["steps"]
                self.hop_slack.labels(*key).observe((h["budget_ms"] - mean_ms) / 1000.0)
        if s.get("slack_ms") is not None:
            self.slack.observe(s["slack_ms"] / 1000.0)
        self.misses.inc(s.get("deadline_misses", 0))
        self.reroutes.inc(len(s.get("reroutes", [])))
        # star mode: every row goes to every remote hop; chain mode: only to the first
        remote = [h for h in s.get("hops", []) if h["peer_id"] != "local"]
        fan_out = 1 if s.get("mode") == "chain" and remote else len(remote)
        rows = outcome.prompt_tokens + max(0, len(outcome.token_ids) - 1)
        sent = rows * self.bytes_per_row * fan_out
        self.bytes_sent.inc(sent)
        if outcome.token_ids:
            self.bytes_per_token.set(sent / len(outcome.token_ids))
