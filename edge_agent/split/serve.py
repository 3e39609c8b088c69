"""A node's hop server: frames in, engine.forward, frames out.

One server serves every shard this node holds and every channel connected to it.
Concurrent requests for the same shard are batched into one ``engine.forward`` (one
llama_decode where the engine allows it). A bad frame gets an ERROR reply naming the
reason and is dropped; other requests on the same channel are untouched.

Inference-plane messages (see docs/split.md):
- ACTIVATION in: request id, step (= position), layer range, f32 hidden (n, n_embd);
  reply ACTIVATION with the shard's output, same ids, ``compute_us`` set.
- END_REQUEST: free the request's KV cache.
- CONTROL ``{"op": "info"}``: reply with the shards held and their arithmetic settings.
- CONTROL ``{"op": "route", "request": hex, "next": {peer_id, host, port, start, end} | null}``:
  chain mode. ACTIVATION frames flagged CHAIN for that request are forwarded, after
  compute, to the next hop; the last hop (``next`` null) answers the client directly over
  the channel the route came on. Errors go to the client the same way.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from edge_agent.runtime.engine import MAX_DRAFT_ROWS, EngineError, StepInput, UnknownRequestError
from edge_agent.split.engine_thread import EngineThread
from edge_agent.split.observe import HopRecord, Observers, digest
from edge_agent.split.protocol import ErrorCode, engine_error_code, error_frame, error_reply, parse_control, valid_next
from edge_agent.split.testhooks import OutputFault, TestHooks
from edge_agent.transport import DType, Flag, Frame, MsgType, PeerLostError, hoptrace

log = logging.getLogger(__name__)
MAX_PENDING_PER_SHARD = 256  # queued steps beyond this are refused: a peer cannot fill our memory
MAX_TRACKED = 4096
_STEP_FLAGS = int(Flag.REWIND | Flag.DRAFT)  # a speculative step's (runtime.engine.StepInput)
_KEPT_FLAGS = int(Flag.REPLAY | Flag.PREFILL) | _STEP_FLAGS  # a reply (and chain forward) keeps these
_REWIND, _DRAFT, _CHAIN = int(Flag.REWIND), int(Flag.DRAFT), int(Flag.CHAIN)  # plain ints on the hop path: IntFlag ops cost ~0.7 us


@dataclass
class _Job:
    channel: object
    frame: Frame | None
    step: StepInput | None
    end_request: str | None = None  # an END marker: free this request after its queued steps


@dataclass
class _Shard:
    engine: object
    queue: "asyncio.Queue[_Job]" = field(default_factory=asyncio.Queue)
    last_used: dict[str, float] = field(default_factory=dict)
    cheat: object = None  # test faults only: the engine a cheating node computes with instead
    thread: EngineThread | None = None  # runs the engine's calls; started with the shard's worker

    @property
    def compute(self):
        return self.cheat or self.engine


class HopServer:
    """``info_extra``: more fields for ``info`` (node.py: the signed capability record).
    ``connect``: async (peer_id, host, port) -> PeerLink, for chain forwarding (None: no chain).
    ``weights``: a ``split.weights.WeightSource`` when this node shares its model file.
    ``loader``: (start, end) -> Engine, to serve a sub-range of a held range on demand.
    ``ledger``: a ``ledger.service.LedgerService`` answering ledger messages (None: no ledger).
    ``fault_engine``: test faults only, (start, end) -> the engine a cheating node computes with."""

    def __init__(self, engines, agent_id: str = "", *, idle_timeout_s: float = 600.0,
                 info_extra: Callable[[], dict] | None = None,
                 connect: Callable[[str, str, int], Awaitable[object]] | None = None,
                 weights=None, loader: Callable[[int, int], object] | None = None, ledger=None,
                 hooks: TestHooks = TestHooks(), fault_engine: Callable[[int, int], object] | None = None):
        hooks.check_enabled()
        self.fault = OutputFault.of(hooks.fault)
        self.fault_engine = fault_engine
        self.agent_id = agent_id
        self.shards = {(e.info.start, e.info.end): _Shard(e) for e in engines}
        self.idle_timeout_s = idle_timeout_s
        self.hooks = hooks
        self.observers = Observers()
        self.evicted: OrderedDict[str, float] = OrderedDict()
        self.steps_served = 0
        self.info_extra = info_extra or dict
        self.weights = weights
        self.connect = connect
        self.loader = loader
        self.ledger = ledger  # a ledger.LedgerService: answers ledger messages (binary CONTROL payloads)
        self.routes: dict[str, tuple[object, dict | None]] = {}  # request -> (client channel, next hop)
        self.owners: dict[str, object] = {}  # request -> the channel that first sent it work
        self._next_links: dict[str, object] = {}
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        for (start, end), shard in self.shards.items():
            if self.fault_engine is not None:
                shard.cheat = await asyncio.to_thread(self.fault_engine, start, end)
            self._start_worker(shard)
        self._tasks.append(asyncio.create_task(self._evict_loop()))

    def _start_worker(self, shard: _Shard) -> None:
        shard.thread = EngineThread(f"engine {shard.engine.info.start}:{shard.engine.info.end}")
        self._tasks.append(asyncio.create_task(self._worker(shard)))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        for shard in self.shards.values():
            if shard.thread is not None:
                shard.thread.close()
                shard.thread = None
        for link in self._next_links.values():
            await link.close()
        self._next_links.clear()

    def info(self) -> dict:
        return {
            **self.info_extra(),
            "agent_id": self.agent_id,
            "shards": [
                {"start": s.engine.info.start, "end": s.engine.info.end, "model_hash": s.engine.info.model_hash,
                 "shard_hash": s.engine.info.shard_hash, "n_embd": s.engine.info.n_embd,
                 "arith": s.engine.options.arithmetic(s.engine.backend).to_text()}
                for s in self.shards.values()
            ],
        }

    # -- per channel -----------------------------------------------------------------------
    async def handle(self, channel) -> None:
        """Read loop for one connected peer; returns when the peer goes away. While the loop
        is not in the middle of a frame, steps for a held shard are taken straight from the
        channel's receive callback (``_take``): no reader task to wake on the hop's path."""
        busy = [False]  # the loop is handling a frame: later ones wait for it (order)
        channel.set_receiver(lambda frame: not busy[0] and self._take(channel, frame))
        while True:
            try:
                frame = await channel.recv()
            except PeerLostError:
                return
            if hoptrace.ON and frame.type == MsgType.ACTIVATION:
                hoptrace.mark("recv", frame)
            busy[0] = True
            try:
                await self._dispatch(channel, frame)
            except Exception as exc:  # noqa: BLE001 - one bad frame must not end the peer's session
                log.warning("refused a frame from %s: %r", getattr(channel, "peer_id", "?")[:12], exc)
                await self._reply(channel, error_reply(frame, ErrorCode.BAD_FRAME, f"frame refused: {exc!r}"[:500]))
            finally:
                busy[0] = False

    def _take(self, channel, frame: Frame) -> bool:
        """Queue a step at once if it needs nothing awaited (a held shard, f32, admissible);
        anything else (and any refusal) is left to the read loop, which answers it."""
        if frame.type != MsgType.ACTIVATION or frame.dtype != DType.F32:
            return False
        shard = self.shards.get((frame.layer_start, frame.layer_end))
        if shard is None:
            return False
        if hoptrace.ON:
            hoptrace.mark("recv", frame)
        try:
            return self._admit(channel, frame, shard) is None
        except Exception:  # noqa: BLE001 - the read loop handles it again and answers bad_frame
            return False

    def _admit(self, channel, frame: Frame, shard: _Shard) -> tuple[ErrorCode, str] | None:
        """Check a step and queue it; or the refusal, with nothing changed."""
        arr = frame.array()
        info, opts = shard.engine.info, shard.engine.options
        if arr.ndim != 2 or arr.shape[1] != info.n_embd or not 0 < arr.shape[0] <= opts.n_ctx_per_request:
            return ErrorCode.INPUT_SHAPE, f"hidden states must be (n <= {opts.n_ctx_per_request}, {info.n_embd}), got {arr.shape}"
        if shard.queue.qsize() >= MAX_PENDING_PER_SHARD:
            return ErrorCode.BUSY, f"node busy: {MAX_PENDING_PER_SHARD} steps queued on layers {info.start}:{info.end}"
        # positions are checked by engine.forward when the step runs (earlier frames of the
        # request may still be queued); a bad step is isolated there
        rid = frame.request_id.hex()
        if frame.flags & _DRAFT and arr.shape[0] > MAX_DRAFT_ROWS:  # each row may be a decode of its own
            return ErrorCode.INPUT_SHAPE, f"a draft step has at most {MAX_DRAFT_ROWS} rows, got {arr.shape[0]}"
        owner, route = self.owners.get(rid, channel), self.routes.get(rid)
        if frame.flags & _REWIND and not frame.flags & _CHAIN and owner is not channel and (route is None or route[0] is not channel):
            # a rewind drops cached positions: only who sent the request's work (or set its route) may
            return ErrorCode.BAD_FRAME, "only the peer that sent this request's work may rewind it"
        if rid not in self.owners and len(self.owners) >= MAX_TRACKED:
            self.owners.pop(next(iter(self.owners)))
        self.owners.setdefault(rid, channel)
        shard.last_used[rid] = time.monotonic()
        step = StepInput(rid, frame.step, arr, rewind=bool(frame.flags & _REWIND), draft=bool(frame.flags & _DRAFT))
        shard.queue.put_nowait(_Job(channel, frame, step))
        if hoptrace.ON:
            hoptrace.mark("queued", frame)
        return None

    async def _dispatch(self, channel, frame: Frame) -> None:
        rid = frame.request_id.hex()
        if frame.type == MsgType.ACTIVATION:
            shard = self.shards.get((frame.layer_start, frame.layer_end))
            if shard is None:
                shard = await self._load_subrange(frame.layer_start, frame.layer_end)
            if shard is None:
                held = ", ".join(f"{a}:{b}" for a, b in self.shards) or "none"
                await self._reply(channel, error_reply(frame, ErrorCode.NO_SHARD, f"this node does not serve layers "
                                                       f"{frame.layer_start}:{frame.layer_end} (it serves {held})"))
                return
            if frame.dtype != DType.F32:
                await self._reply(channel, error_reply(frame, ErrorCode.BAD_DTYPE, "hidden states must be f32 (f16 would change the arithmetic)"))
                return
            refusal = self._admit(channel, frame, shard)
            if refusal:
                await self._reply(channel, error_reply(frame, *refusal))
        elif frame.type == MsgType.END_REQUEST:
            route = self.routes.get(rid)
            if channel is not self.owners.get(rid) and (route is None or route[0] is not channel):
                return  # only who sent the work (or set its route) may end it
            self.routes.pop(rid, None)
            self.owners.pop(rid, None)
            for shard in self.shards.values():
                shard.last_used.pop(rid, None)
                shard.queue.put_nowait(_Job(channel, None, None, end_request=rid))  # after its queued steps
        elif frame.type == MsgType.CONTROL and self.ledger is not None and self.ledger.accepts(frame.payload):
            await self.ledger.reply_to(channel, frame)  # commitments, receipts, sync: the control plane's business
        elif frame.type == MsgType.CONTROL:
            await self._control(channel, frame)
        # other types (HELLO, ACK, ...) are ignored by design

    async def _load_subrange(self, start: int, end: int):
        """The planner may give us part of a range we hold; load that part once, keep it."""
        if self.loader is None or not any(a <= start < end <= b for a, b in self.shards):
            return None
        try:
            engine = await asyncio.to_thread(self.loader, start, end)
        except EngineError as exc:
            log.warning("cannot load layers %d:%d: %s", start, end, exc)
            return None
        shard = self.shards.setdefault((start, end), _Shard(engine))
        if shard.engine is not engine:
            engine.close()  # another frame loaded it meanwhile
        elif self._tasks:
            self._start_worker(shard)
        return shard

    async def _control(self, channel, frame: Frame) -> None:
        msg = parse_control(frame)
        op = msg.get("op") if msg is not None else None
        if op == "info":
            await self._reply(channel, Frame.from_bytes(MsgType.CONTROL, json.dumps(self.info()).encode(), seq=frame.seq))
        elif op == "route" and isinstance(msg.get("request"), str) and len(msg["request"]) == 32:
            nxt = msg.get("next")
            owner = self.routes.get(msg["request"])
            if (nxt is not None and not valid_next(nxt, self.connect is not None)) or (owner is not None and owner[0] is not channel):
                await self._reply(channel, error_frame(frame.request_id, 0, ErrorCode.BAD_ROUTE, "malformed route, chain unsupported, "
                                                       "or the request belongs to another peer", seq=frame.seq))
                return
            if len(self.routes) >= 4096 and msg["request"] not in self.routes:
                self.routes.pop(next(iter(self.routes)))
            self.routes[msg["request"]] = (channel, nxt)
            await self._reply(channel, Frame.from_bytes(MsgType.CONTROL, b"{}", seq=frame.seq))
        elif msg is not None and isinstance(msg.get("weights"), dict) and self.weights is not None:
            try:
                head, body = await asyncio.to_thread(self.weights.handle, msg["weights"])
            except Exception as exc:  # noqa: BLE001 - any bad request gets an error, never a dead node
                await self._reply(channel, error_frame(frame.request_id, 0, ErrorCode.WEIGHTS, str(exc), seq=frame.seq))
                return
            payload = json.dumps(head).encode() + b"\n" + body
            await self._reply(channel, Frame.from_bytes(MsgType.CONTROL, payload, seq=frame.seq))
        else:
            await self._reply(channel, error_frame(frame.request_id, 0, ErrorCode.BAD_CONTROL, "unknown or malformed control message", seq=frame.seq))

    def _engine_error(self, frame: Frame, exc: EngineError) -> Frame:
        code = engine_error_code(exc)
        message = str(exc)
        if isinstance(exc, UnknownRequestError) and frame.request_id.hex() in self.evicted:
            code, message = ErrorCode.EVICTED, f"request was evicted after {self.idle_timeout_s:.0f} s idle; replay it from position 0"
        return error_reply(frame, code, message)

    async def _reply(self, channel, frame: Frame) -> None:
        try:
            await channel.send(frame)
        except PeerLostError:
            pass

    # -- compute ---------------------------------------------------------------------------
    async def _worker(self, shard: _Shard) -> None:
        while True:
            try:
                await self._work_once(shard)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the loop must survive anything a step does
                log.exception("hop worker error on layers %d:%d", shard.engine.info.start, shard.engine.info.end)

    async def _work_once(self, shard: _Shard) -> None:
        jobs = [await shard.queue.get()]
        while not shard.queue.empty():
            jobs.append(shard.queue.get_nowait())
        if hoptrace.ON:
            for job in jobs:
                if job.frame is not None:
                    hoptrace.mark("worker", job.frame)
        # steps up to the first END marker form this round, one step per request (a request's
        # later frames wait for the next round); everything else goes back, in order
        cut = next((i for i, j in enumerate(jobs) if j.end_request is not None), len(jobs))
        if cut == 0:
            for job in jobs[1:]:
                shard.queue.put_nowait(job)
            await shard.thread.run(shard.compute.end_request, jobs[0].end_request)
            return
        batch: list[_Job] = []
        later: list[_Job] = []
        seen: set[str] = set()
        for job in jobs[:cut]:
            (later if job.step.request_id in seen else batch).append(job)
            seen.add(job.step.request_id)
        for job in later + jobs[cut:]:
            shard.queue.put_nowait(job)
        await self._run(shard, batch)

    async def _run(self, shard: _Shard, batch: list[_Job]) -> None:
        if self.hooks.delay_ms:
            await asyncio.sleep(self.hooks.delay_ms / 1000.0)
        try:
            outs = await shard.thread.run(_traced(shard.compute.forward, batch) if hoptrace.ON else shard.compute.forward,
                                          [j.step for j in batch])
            if hoptrace.ON:
                for j in batch:
                    hoptrace.mark("back", j.frame)
            results = list(zip(batch, outs, [None] * len(batch)))
        except EngineError:
            # isolate the bad step: run each alone so the others still get their answer
            results = []
            for job in batch:
                try:
                    results.append((job, (await shard.thread.run(shard.compute.forward, [job.step]))[0], None))
                except EngineError as exc:
                    results.append((job, None, exc))
        except Exception as exc:  # noqa: BLE001 - an engine bug: every waiter gets an answer
            log.exception("engine failure on layers %d:%d", shard.engine.info.start, shard.engine.info.end)
            results = [(job, None, EngineError(f"internal engine error: {exc!r}")) for job in batch]
        for job, out, exc in results:
            f = job.frame
            back = job.channel
            route = self.routes.get(job.step.request_id) if f.flags & _CHAIN else None
            if route is not None:
                back = route[0]  # in chain mode answers and errors go straight to the client
            if exc is not None:
                await self._reply(back, self._engine_error(f, exc))
                continue
            self.steps_served += 1
            if self.fault is not None:
                out.data = self.fault.apply(job.step.request_id, out.data, job.step.pos)
            reply = Frame.from_array(MsgType.ACTIVATION, out.data, request_id=f.request_id, step=f.step,
                                     n_positions=f.n_positions, layer_start=f.layer_start, layer_end=f.layer_end,
                                     seq=f.seq, flags=f.flags & _KEPT_FLAGS, compute_us=int(out.compute_ms * 1000))
            if route is not None and route[1] is not None:
                await self._forward(route, reply)
            else:
                await self._reply(back, reply)
            if self.observers.callbacks:  # after the reply: the ledger's digests and fingerprint are off the token path
                self.observers.emit(HopRecord("node", job.step.request_id, self.agent_id, f.layer_start, f.layer_end, f.step,
                                              f.n_positions, digest(f.payload), digest(reply.payload), out.compute_ms,
                                              replay=bool(f.flags & Flag.REPLAY), flags=f.flags & _STEP_FLAGS, output=out.data))

    async def _forward(self, route, reply: Frame) -> None:
        """Chain mode: hand our output to the next hop as its input (same request, step, seq)."""
        client, nxt = route
        try:
            fwd = Frame(MsgType.ACTIVATION, request_id=reply.request_id, step=reply.step, n_positions=reply.n_positions,
                        layer_start=nxt["start"], layer_end=nxt["end"], dtype=reply.dtype, shape=reply.shape,
                        seq=reply.seq, flags=reply.flags | int(Flag.CHAIN), payload=reply.payload)
            link = self._next_links.get(nxt["peer_id"])
            if link is None or not link.alive:
                link = await asyncio.wait_for(self.connect(nxt["peer_id"], nxt["host"], nxt["port"]), 5.0)
                self._next_links[nxt["peer_id"]] = link
            await link.post(fwd)
        except Exception as exc:  # noqa: BLE001 - any failure to reach the next hop is the client's to route around
            await self._reply(client, error_reply(reply, ErrorCode.NEXT_HOP_UNREACHABLE,
                                                  f"cannot forward to {str(nxt.get('peer_id'))[:12]}: {exc!r}"[:500]))

    async def _evict_loop(self) -> None:
        """Free KV caches of requests idle past the timeout (abandoned clients)."""
        while True:
            await asyncio.sleep(min(5.0, max(0.05, self.idle_timeout_s / 4)))
            now = time.monotonic()
            for shard in self.shards.values():
                for rid, t in list(shard.last_used.items()):
                    if now - t > self.idle_timeout_s:
                        del shard.last_used[rid]
                        self.owners.pop(rid, None)
                        self.routes.pop(rid, None)
                        await shard.thread.run(shard.compute.end_request, rid)
                        self.evicted[rid] = now
                        while len(self.evicted) > 4096:
                            self.evicted.popitem(last=False)
                        log.info("evicted idle request %s from %d:%d", rid[:8], shard.engine.info.start, shard.engine.info.end)


def _traced(forward: Callable, batch: list[_Job]) -> Callable:
    """``forward`` stamping when the engine thread starts and ends it (hoptrace on only)."""
    def run(steps: list[StepInput]):
        for job in batch:
            hoptrace.mark("thread", job.frame)
        try:
            return forward(steps)
        finally:
            for job in batch:
                hoptrace.mark("computed", job.frame)
    return run
