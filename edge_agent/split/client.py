"""The requesting device: drives one request across hops, under deadlines, around failures.

Per token: tokens -> local head (embedding + first k layers) -> each remote hop (star:
the client sends to every hop and hears back) -> local tail (last m layers, norm, LM
head) -> sampling. Tokens and logits never leave this process.

Recovery keeps output unchanged: the client keeps, per hop, every input it sent (in the
exact chunks it sent them), so a replacement node rebuilds the lost KV cache by replaying
the same computations in the same shapes, which llama.cpp reproduces bit for bit.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import numpy as np

from edge_agent.runtime.engine import EngineOptions, StepInput
from edge_agent.runtime.generation import Decoder, GenerationResult
from edge_agent.runtime.sampling import SamplingParams
from edge_agent.split.deadlines import DeadlineConfig, DeadlineTracker
from edge_agent.split.chain import remote_chain
from edge_agent.split.links import HopFailed, PeerLink
from edge_agent.split.local import LOCAL_PEER_ID, LocalLink
from edge_agent.split.observe import HopRecord, Observers, digest
from edge_agent.split.planner import Hop, NoRouteError, PeerCapability, Plan, has_alternative, plan_path
from edge_agent.split.policy import PrivacyPolicy
from edge_agent.runtime.engine import CapacityError
from edge_agent.transport import DType, Flag, Frame, MsgType

log = logging.getLogger(__name__)


class PeerSource(Protocol):
    """Who is out there and how to reach them (discovery + transport, wired in node.py)."""

    def capabilities(self) -> list[PeerCapability]: ...

    async def link(self, peer_id: str) -> PeerLink: ...

    def address(self, peer_id: str) -> tuple[str, int]: ...  # TLS host, port (chain forwarding)


@dataclass
class ClientConfig:
    policy: PrivacyPolicy = field(default_factory=PrivacyPolicy)
    target_tbt_ms: float = 250.0
    mode: str = "star"
    deadline: DeadlineConfig = field(default_factory=lambda: DeadlineConfig(overrun_factor=3.0, overrun_ms=50.0, negative_steps=3))
    hop_timeout_s: float = 10.0  # a decode hop that says nothing this long is replaced
    prefill_timeout_s: float = 120.0
    max_reroutes: int = 8
    backend: str = "llamacpp"  # runtime for the layers this device runs (head, tail, fallback)
    local_fallback: bool = True  # run layers no peer can take on this device (it has the model)
    local_ms_per_layer: float = 1000.0  # planner cost of a local layer: a last resort, never preferred


@dataclass(eq=False)  # identity matters: states are kept across re-routes
class _HopState:
    hop: Hop
    link: PeerLink
    history: list[tuple[int, np.ndarray]] = field(default_factory=list)  # inputs sent, in send order
    compute_ms: float = 0.0
    transfer_ms: float = 0.0
    steps: int = 0


@dataclass
class _Request:
    rid: bytes
    plan: Plan
    tracker: DeadlineTracker
    hops: list[_HopState]
    excluded: set[str] = field(default_factory=set)
    reroutes: list[dict] = field(default_factory=list)
    step_index: int = 0
    routed: bool = False  # chain mode: the hops know their next hop
    generation: int = 0  # bumped when every hop was rebuilt: the current step restarts at hop 0
    histories_complete: bool = True  # False once a chain step ran: only hop 0's inputs are known
    chain_ms: float = 0.0


class SwarmClient:
    def __init__(self, model_path, peers: PeerSource, config: ClientConfig | None = None, options: EngineOptions | None = None,
                 cache_dir=None):
        from edge_agent.runtime.backends import load_engine
        from edge_agent.runtime.shards import inspect_model
        from edge_agent.runtime.tokenizer import Tokenizer

        self.config = config or ClientConfig()
        self.peers = peers
        self.options = options or EngineOptions(max_requests=4)
        info = inspect_model(model_path)
        self.n_layer = info.n_layer
        self.model_hash = info.model_hash
        self.config.policy.validate(self.n_layer)
        (h0, h1), (t0, t1) = self.config.policy.client_ranges(self.n_layer)
        self.tokenizer = Tokenizer(model_path)
        backend = self.config.backend
        self.head = load_engine(backend, model_path, h0, h1, self.options, cache_dir)
        try:
            self.tail = load_engine(backend, model_path, t0, t1, self.options, cache_dir)
        except Exception:
            self.head.close()
            self.tokenizer.close()
            raise
        self.observers = Observers()
        self._local_ms = 0.0
        self.model_path = model_path
        self._cache_dir = cache_dir
        self._local_link = None

    def close(self) -> None:
        if self._local_link is not None:
            self._local_link.close()
        self.head.close()
        self.tail.close()
        self.tokenizer.close()

    # -- planning ---------------------------------------------------------------------------
    def _plan(self, previous: Plan | None = None, exclude=(), replace_hops=()) -> Plan:
        caps = self.peers.capabilities()
        me = PeerCapability(LOCAL_PEER_ID, (self.config.policy.remote_range(self.n_layer),), 1e9,
                            self.config.local_ms_per_layer, 0.0)
        if previous is not None and LOCAL_PEER_ID in previous.peer_ids:
            caps = [*caps, me]  # a hop we run ourselves stays ours
        kw = dict(target_tbt_ms=self.config.target_tbt_ms, local_ms=self._local_ms, previous=previous, exclude=exclude,
                  replace_hops=replace_hops, mode=self.config.mode)
        try:
            return plan_path(self.n_layer, self.config.policy, caps, **kw)
        except NoRouteError:
            if not self.config.local_fallback or LOCAL_PEER_ID in exclude or me in caps:
                raise
        # no peer can take some layers: this device can, since it holds the whole model
        return plan_path(self.n_layer, self.config.policy, [*caps, me], **kw)

    async def _link(self, peer_id: str):
        if peer_id != LOCAL_PEER_ID:
            return await self.peers.link(peer_id)
        if self._local_link is None:
            from edge_agent.runtime.backends import load_engine

            self._local_link = LocalLink(lambda a, b: load_engine(self.config.backend, self.model_path, a, b, self.options,
                                                                  self._cache_dir))
        return self._local_link

    async def _open(self, plan: Plan, keep: dict[tuple[str, int, int], _HopState]) -> list[_HopState]:
        states = []
        for hop in plan.hops:
            old = keep.get((hop.peer_id, hop.start, hop.end))
            states.append(old if old is not None else _HopState(hop, await self._link(hop.peer_id)))
            states[-1].hop = hop
        return states

    # -- one hop ----------------------------------------------------------------------------
    async def _call(self, req: _Request, hs: _HopState, pos: int, x: np.ndarray, timeout_s: float, replay: bool = False) -> tuple[np.ndarray, float, float]:
        flags = (Flag.PREFILL if x.shape[0] > 1 else 0) | (Flag.REPLAY if replay else 0)
        frame = Frame.from_array(MsgType.ACTIVATION, x, request_id=req.rid, step=pos, n_positions=x.shape[0],
                                 layer_start=hs.hop.start, layer_end=hs.hop.end, seq=hs.link.next_seq(), flags=int(flags))
        reply = await hs.link.request(frame, timeout_s)
        f = reply.frame
        if f.type != MsgType.ACTIVATION or f.step != pos or (f.layer_start, f.layer_end) != (hs.hop.start, hs.hop.end):
            raise HopFailed(hs.link.peer_id, "reply does not match the request (wrong type, step or layers)", "bad_reply")
        out = f.array()
        if f.dtype != DType.F32 or out.shape != x.shape or not np.isfinite(out).all():
            raise HopFailed(hs.link.peer_id, f"reply is {f.dtype.name} {out.shape}, expected F32 {x.shape}, or not finite", "bad_reply")
        compute_ms = getattr(f, "compute_us", 0) / 1000.0
        if self.observers.callbacks:
            self.observers.emit(HopRecord("client", req.rid.hex(), hs.link.peer_id, hs.hop.start, hs.hop.end, pos, x.shape[0],
                                          digest(x.tobytes()), digest(f.payload), compute_ms, reply.wall_ms, hs.hop.budget_ms, replay))
        return np.array(out), compute_ms, reply.wall_ms

    # -- failure handling -------------------------------------------------------------------
    async def _reroute(self, req: _Request, index: int, reason: str, permanent: bool, pos: int) -> None:
        """Replace hop ``index`` (new peer(s) for its layers) and rebuild their KV caches by replay.

        Falls back to rebuilding every hop (``rebuild_all``) when the failed hop's inputs are not
        known (after chain steps) or the new plan changes more than that hop's layers.
        """
        failed = req.hops[index]
        if permanent:
            req.excluded.add(failed.hop.peer_id)
        if not req.histories_complete:
            return await self.rebuild_all(req, reason, pos, failed.hop.peer_id)
        await failed.link.send(Frame(MsgType.END_REQUEST, request_id=req.rid))
        while True:
            if len(req.reroutes) >= self.config.max_reroutes:
                raise NoRouteError([(failed.hop.start, failed.hop.end)], f"gave up after {len(req.reroutes)} re-routes")
            try:
                new_plan = self._plan(previous=req.plan, exclude=req.excluded, replace_hops=[index])
            except NoRouteError as exc:
                raise NoRouteError(exc.missing, f"peer {failed.hop.peer_id[:12]} failed: {reason}; excluded: "
                                   f"{', '.join(sorted(p[:12] for p in req.excluded))}",
                                   what="no replacement: no other peer serves") from None
            keep = {(h.hop.peer_id, h.hop.start, h.hop.end): h for i, h in enumerate(req.hops) if i != index}
            kept = [h for h in new_plan.hops if (h.peer_id, h.start, h.end) in keep]
            fresh = [h for h in new_plan.hops if (h.peer_id, h.start, h.end) not in keep]
            if len(kept) != len(keep) or not fresh or (fresh[0].start, fresh[-1].end) != (failed.hop.start, failed.hop.end):
                return await self.rebuild_all(req, reason, pos, failed.hop.peer_id)  # more changed: rebuild all
            new: list[_HopState] = []
            try:
                states = await self._open(new_plan, keep)
                new = [st for st in states if all(st is not k for k in keep.values())]
                req.reroutes.append({"step": req.step_index, "layers": f"{failed.hop.start}:{failed.hop.end}",
                                     "from": failed.hop.peer_id, "to": [st.hop.peer_id for st in new], "reason": reason})
                log.info("re-route %s: layers %d:%d from %s (%s) to %s", req.rid.hex()[:8], failed.hop.start,
                         failed.hop.end, failed.hop.peer_id[:12], reason, [st.hop.peer_id[:12] for st in new])
                await self._replay(req, failed.history, new)
            except HopFailed as exc:  # the replacement failed too: route around it as well
                reason = f"replacement failed: {exc.code}: {exc.reason}"
                req.excluded.add(exc.peer_id)
                await self._end(req, new)  # replayed ones must start clean next time
                continue
            req.plan, req.hops = new_plan, states
            req.tracker.adopt(new_plan)
            return

    async def _end(self, req: _Request, states) -> None:
        for st in states:
            await st.link.send(Frame(MsgType.END_REQUEST, request_id=req.rid))

    async def _replay(self, req: _Request, inputs: list[tuple[int, np.ndarray]], new: list[_HopState]) -> None:
        """Re-send a lost hop's inputs, in the chunks first sent, through its replacement(s)."""
        for s in new:
            outs = []
            for pos, x in inputs:
                y, _, _ = await self._call(req, s, pos, x, self.config.prefill_timeout_s, replay=True)
                s.history.append((pos, x))
                outs.append((pos, y))
            inputs = outs

    async def rebuild_all(self, req: _Request, reason: str, pos: int, blamed: str = "") -> None:
        """Rebuild every hop from hop 0's inputs before ``pos`` (the only inputs always known).

        Used after chain steps (the client never saw the middle activations) or when a
        replan moved more than one hop. The caller restarts the current step at hop 0.
        """
        inputs = [(p, x) for p, x in req.hops[0].history if p < pos]
        await self._end(req, req.hops)
        while True:
            if len(req.reroutes) >= self.config.max_reroutes:
                raise NoRouteError([(req.plan.start, req.plan.end)], f"gave up after {len(req.reroutes)} re-routes")
            try:
                plan = self._plan(exclude=req.excluded)
            except NoRouteError as exc:
                raise NoRouteError(exc.missing, f"after: {reason}", what="no replacement: no other peer serves") from None
            req.reroutes.append({"step": req.step_index, "layers": f"{req.plan.start}:{req.plan.end}", "from": blamed,
                                 "to": [h.peer_id for h in plan.hops], "reason": f"rebuild all hops: {reason}"})
            states: list[_HopState] = []
            try:
                states = await self._open(plan, {})
                await self._replay(req, inputs, states)
            except HopFailed as exc:
                reason = f"replacement failed: {exc.code}: {exc.reason}"
                req.excluded.add(exc.peer_id)
                await self._end(req, states)
                continue
            req.plan, req.hops, req.routed, req.histories_complete = plan, states, False, True
            req.generation += 1
            req.tracker.adopt(plan)
            return

    # -- the token loop ---------------------------------------------------------------------
    async def _remote(self, req: _Request, pos: int, x: np.ndarray) -> np.ndarray:
        ids = [h.hop.peer_id for h in req.hops]
        if req.plan.mode == "chain" and len(ids) > 1 and LOCAL_PEER_ID not in ids and len(set(ids)) == len(ids):
            return await remote_chain(self, req, pos, x)
        return await self.run_star(req, pos, x)

    async def run_star(self, req: _Request, pos: int, x: np.ndarray) -> np.ndarray:
        decode = x.shape[0] == 1
        x0, gen = x, req.generation
        observed: list[float] = []
        i = 0
        while i < len(req.hops):
            hs = req.hops[i]
            if decode:
                budget = req.tracker.budgets(observed)[i]
                timeout = max(self.config.hop_timeout_s, budget / 1000.0)
            else:
                timeout = self.config.prefill_timeout_s
            try:
                y, compute_ms, wall_ms = await self._call(req, hs, pos, x, timeout)
            except HopFailed as exc:
                if exc.code == "CapacityError" and "exceed the context" in exc.reason:
                    raise CapacityError(f"the request outgrew the context of the peers: {exc.reason}") from None
                await self._reroute(req, i, f"{exc.code}: {exc.reason}", exc.permanent, pos)
                if req.generation != gen:  # every hop was rebuilt up to this step: run it again from hop 0
                    x, gen, observed, i = x0, req.generation, [], 0
                continue  # retry the same layers on the replacement
            hs.history.append((pos, x))
            hs.compute_ms += compute_ms
            hs.transfer_ms += max(0.0, wall_ms - compute_ms)
            hs.steps += 1
            observed.append(wall_ms)
            x = y
            i += 1
        if decode and req.hops and len(observed) == len(req.hops):
            alts: list[int] = []
            if any(o > hs.hop.budget_ms for o, hs in zip(observed, req.hops)):  # only a late hop can be replaced
                caps = self.peers.capabilities()
                alts = [j for j in range(len(req.hops)) if has_alternative(req.plan, j, caps, req.excluded)]
            report = req.tracker.observe(observed, alts)
            advice = next((a for a in report.replace if a.hop_index in alts), None)
            if advice is not None:  # one per step: indexes change once the path does
                # a slow peer loses its hop for this request; it stays usable for others
                await self._reroute(req, advice.hop_index, f"deadline: {advice.reason}", True, pos + x0.shape[0])
        return x

    async def generate(self, prompt_tokens: Sequence[int], params: SamplingParams,
                       on_token: Callable[[int, str], None] | None = None) -> GenerationResult:
        rid = uuid.uuid4().bytes
        excluded: set[str] = set()
        for _ in range(self.config.max_reroutes + 1):  # peers that cannot be reached are planned around
            plan = self._plan(exclude=excluded)
            try:
                states = await self._open(plan, {})
                break
            except HopFailed as exc:
                log.info("peer %s unreachable: %s", exc.peer_id[:12], exc.reason)
                excluded.add(exc.peer_id)
        else:
            raise NoRouteError([(plan.start, plan.end)], "no reachable peers")
        req = _Request(rid, plan, DeadlineTracker(plan, self.config.deadline), states, excluded)
        decoder = Decoder(self.tokenizer, params, list(prompt_tokens))
        feed = decoder.first_feed()
        pos = 0
        sid = rid.hex()
        try:
            while feed is not None:
                t0 = time.perf_counter()
                x = (await asyncio.to_thread(self.head.forward, [StepInput(sid, pos, feed)]))[0].data
                t1 = time.perf_counter()
                x = await self._remote(req, pos, x)
                t2 = time.perf_counter()
                logits = (await asyncio.to_thread(self.tail.forward, [StepInput(sid, pos, x)]))[0].data
                if feed.shape[0] == 1:
                    self._local_ms = (t1 - t0 + time.perf_counter() - t2) * 1000.0
                pos += feed.shape[0]
                req.step_index += 1
                feed = decoder.advance(logits, on_token)
        finally:
            self.head.end_request(sid)
            self.tail.end_request(sid)
            for hs in req.hops:
                await hs.link.send(Frame(MsgType.END_REQUEST, request_id=rid))
        return decoder.result(self._stats(req))

    def _stats(self, req: _Request) -> dict:
        tel = req.tracker.telemetry()
        return {
            "mode": req.plan.mode,
            "path": [{"peer_id": h.hop.peer_id, "range": f"{h.hop.start}:{h.hop.end}"} for h in req.hops],
            "hops": [
                {"peer_id": h.hop.peer_id, "range": f"{h.hop.start}:{h.hop.end}", "steps": h.steps,
                 "compute_ms": round(h.compute_ms, 3), "transfer_ms": round(h.transfer_ms, 3),
                 "budget_ms": round(h.hop.budget_ms, 3)}
                for h in req.hops
            ],
            "slack_ms": round(tel.budget_ms - tel.mean_total_ms, 3) if tel.mean_total_ms is not None else None,
            "deadline_misses": tel.step_misses,
            "chain_ms": round(req.chain_ms, 3),
            "reroutes": req.reroutes,
            "local": [f"{self.head.info.start}:{self.head.info.end}", f"{self.tail.info.start}:{self.tail.info.end}"],
        }
