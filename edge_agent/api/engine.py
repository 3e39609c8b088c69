"""The bridge between HTTP requests and the swarm: one ``Flight`` per request.

``Backend`` is all the API needs from the swarm (``split.client.SwarmClient`` fits it):
a tokenizer and ``generate(prompt_tokens, params, on_token)``. A flight runs one
generation as its own task and hands its tokens to the HTTP side through a queue.

Cancelling (the HTTP client went away) never cancels a task mid-step: the next token's
callback raises ``ClientGone`` instead, so the generation unwinds through its own
``finally`` (END_REQUEST to every hop, local KV freed) with no engine call in flight.
Generations and kept conversations share the client's KV slots (``conversations``); later
requests queue for one.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Protocol, Sequence

from edge_agent.api.conversations import Conversations
from edge_agent.runtime.generation import GenerationResult
from edge_agent.runtime.sampling import SamplingParams


class Backend(Protocol):
    """What the API needs from the swarm (``split.client.SwarmClient``)."""

    tokenizer: object

    async def generate(self, prompt_tokens: Sequence[int], params: SamplingParams,
                       on_token: Callable[[int, str], None] | None = None, *, resume=None,
                       keep: Callable[[object], None] | None = None, privacy: str | None = None,
                       batch: bool | None = None) -> GenerationResult: ...

    async def release(self, kept) -> None: ...  # end a kept request on this device and every hop


# the flight whose task is running: lets the swarm's hop observer attribute hops to a request
_current: contextvars.ContextVar["Flight | None"] = contextvars.ContextVar("edge_agent_api_flight", default=None)


class ClientGone(Exception):
    """Raised inside the token loop once the HTTP client has disconnected."""


@dataclass
class Token:
    token: int
    text: str
    at: float  # perf_counter when sampled


@dataclass
class Flight:
    """One request in flight: what the dashboard lists and the stream reads from."""

    id: str
    endpoint: str
    prompt_tokens: int
    started: float = field(default_factory=time.perf_counter)
    wall_start: float = field(default_factory=time.time)
    completion_tokens: int = 0
    first_token_at: float | None = None
    last_token_at: float | None = None
    running: bool = False  # False while queued for a KV slot
    cancelled: bool = False
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    task: asyncio.Task | None = None
    on_gap: Callable[[float], None] | None = None  # seconds between tokens, for the TBT histogram
    path: dict[str, str] = field(default_factory=dict)  # "start:end" -> peer id, as hops are accepted

    def on_token(self, token: int, text: str) -> None:
        if self.cancelled:
            raise ClientGone(self.id)
        now = time.perf_counter()
        if self.last_token_at is not None and self.on_gap is not None:
            self.on_gap(now - self.last_token_at)
        self.first_token_at = self.first_token_at or now
        self.last_token_at = now
        self.completion_tokens += 1
        self.queue.put_nowait(Token(token, text, now))

    def cancel(self) -> None:
        """The client went away: stop at the next token (or now, if still queued)."""
        self.cancelled = True
        if self.task is not None and not self.running:
            self.task.cancel()

    async def events(self) -> AsyncIterator[Token | GenerationResult]:
        """Tokens as they come, then the result; re-raises the generation's error."""
        try:
            while True:
                item = await self.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, GenerationResult):
                    return
        finally:
            if self.task is not None and not self.task.done():
                self.cancel()

    def view(self) -> dict:
        return {"id": self.id, "endpoint": self.endpoint, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "running": self.running, "path": dict(self.path),
                "age_s": round(time.perf_counter() - self.started, 2)}


class StopHoldback:
    """Streams text but holds back a tail that could still become a stop string.

    The final text (cut before the stop string) then always extends what was streamed.
    """

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.seen = ""
        self.sent = 0

    def push(self, chunk: str) -> str:
        self.seen += chunk
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.seen)), 0, -1):
                if self.seen.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        safe = len(self.seen) - hold
        out, self.sent = self.seen[self.sent : safe], max(self.sent, safe)
        return out

    def finish(self, final_text: str) -> str:
        out, self.sent = final_text[self.sent :], len(final_text)
        return out


class ApiEngine:
    def __init__(self, backend: Backend, *, max_concurrent: int, on_gap: Callable[[float], None] | None = None,
                 on_finish: Callable[[Flight, object], None] | None = None, keep_conversations: bool = True):
        self.backend = backend
        self.tokenizer = backend.tokenizer
        self.conversations = Conversations(backend.release, max_concurrent)
        self.keep_conversations = keep_conversations
        self.flights: dict[str, Flight] = {}
        self.recent: deque[dict] = deque(maxlen=240)  # finished requests, for the dashboard's plots
        self._on_gap, self._on_finish = on_gap, on_finish

    def start(self, endpoint: str, prompt_tokens: list[int], params: SamplingParams, privacy: str | None = None,
              batch: bool = False) -> Flight:
        """Run one request; ``privacy``: its level, which may only tighten the server's default;
        ``batch``: not latency-critical (``service_tier`` "flex")."""
        flight = Flight(f"{'chatcmpl' if endpoint == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}", endpoint, len(prompt_tokens),
                        on_gap=self._on_gap)
        self.flights[flight.id] = flight
        flight.task = asyncio.create_task(self._run(flight, prompt_tokens, params, privacy, batch))
        return flight

    async def _run(self, flight: Flight, prompt_tokens: list[int], params: SamplingParams, privacy: str | None,
                   batch: bool) -> None:
        outcome: object = None
        _current.set(flight)  # this task's own context
        try:
            resume = await self.conversations.acquire(prompt_tokens)  # never a kept one when keeping is off
            flight.running = True
            kept: list = []
            try:
                outcome = await self.backend.generate(prompt_tokens, params, flight.on_token, resume=resume,
                                                      keep=kept.append if self.keep_conversations else None,
                                                      privacy=privacy, batch=batch)
            finally:
                await self.conversations.done(kept[0] if kept else None)
        except asyncio.CancelledError:  # cancelled while queued for a slot: nothing started
            outcome = ClientGone(flight.id)
        except Exception as exc:  # noqa: BLE001 - handed to the HTTP side, which maps it to an error body
            outcome = exc
        finally:
            self.flights.pop(flight.id, None)
            flight.running = False
            flight.queue.put_nowait(outcome)
            self._record(flight, outcome)

    def _record(self, flight: Flight, outcome: object) -> None:
        if isinstance(outcome, GenerationResult):
            s = outcome.stats
            ttft = (flight.first_token_at - flight.started) * 1000.0 if flight.first_token_at else None
            self.recent.append({"t": time.time(), "ttft_ms": ttft, "tbt_ms": s.get("tbt_ms"),
                                "tokens_per_s": s.get("tokens_per_s"), "tokens": len(outcome.token_ids)})
        if self._on_finish is not None:
            self._on_finish(flight, outcome)

    def observe(self, record) -> None:
        """A ``split.observe`` observer: note which peer computed which layers of the current flight."""
        flight = _current.get()
        if flight is not None and record.side == "client":
            flight.path[f"{record.start}:{record.end}"] = record.peer_id

    async def close(self, timeout_s: float = 10.0) -> None:
        """Stop every flight at its next token and wait (bounded) for their hops to be ended."""
        tasks = [f.task for f in list(self.flights.values()) if f.task is not None]
        for f in list(self.flights.values()):
            f.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s)
        await self.conversations.close()


def extension(stats: dict, flight: Flight) -> dict:
    """The ``x_edge_agent`` field: who computed this answer, how long each hop took, slack, re-routes."""
    privacy = stats.get("privacy", {})
    ttft = (flight.first_token_at - flight.started) * 1000.0 if flight.first_token_at else None
    return {
        "mode": stats.get("mode"),
        "path": stats.get("path", []),
        "hops": stats.get("hops", []),
        "local_layers": stats.get("local", []),
        "slack_ms": stats.get("slack_ms"),
        "deadline_misses": stats.get("deadline_misses", 0),
        "reroutes": stats.get("reroutes", []),
        "privacy": privacy.get("policy"),
        "activations_seen_by": privacy.get("peers_saw_activations", []),
        "kv_reused_tokens": stats.get("kv_reused_tokens", 0),
        "batch": stats.get("batch", False),
        "ttft_ms": round(ttft, 3) if ttft is not None else None,
        "tbt_ms": stats.get("tbt_ms"),
        "tokens_per_s": stats.get("tokens_per_s"),
    }
