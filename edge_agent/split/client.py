"""The requesting device: drives requests across hops, under deadlines, around failures.

Per token: token -> local head (embedding + first k layers) -> the remote hops (one step of
a strategy: ``star.StarStrategy`` or ``chain.ChainStrategy``) -> local tail (last m layers,
norm, LM head) -> sampling. Tokens and logits never leave this process.

One ``SwarmClient`` serves many concurrent requests (``generate``); cancelling the task
running one ends that request on every hop, which frees its KV caches there.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

from edge_agent.runtime.drafting import ModelDrafter
from edge_agent.runtime.engine import EngineOptions, StepInput
from edge_agent.runtime.generation import Decoder, GenerationResult
from edge_agent.runtime.sampling import SamplingParams
from edge_agent.split.batcher import StepBatcher
from edge_agent.split.chain import ChainStrategy
from edge_agent.split.deadlines import DeadlineConfig, DeadlineTracker
from edge_agent.split.explain import explain_no_route, request_stats
from edge_agent.split.links import PeerLink
from edge_agent.split.local import LOCAL_PEER_ID, LocalLink
from edge_agent.split.observe import Observers
from edge_agent.split import needs as request_needs
from edge_agent.split.needs import ProbationQuota, RequestNeeds
from edge_agent.split.planner import NoRouteError, PeerCapability, Plan, PlannerConfig, plan_path
from edge_agent.split.peersource import PeerSource
from edge_agent.split.policy import PrivacyPolicy, request_policy
from edge_agent.split.protocol import ErrorCode, HopFailed
from edge_agent.split.star import StarStrategy
from edge_agent.split.strategy import RequestState, Router, Strategy
from edge_agent.split.speculation import Speculation
from edge_agent.split.verified import Verifier, generate_verified
from edge_agent.transport import Flag

log = logging.getLogger(__name__)


class RequestEnd(NamedTuple):
    """What ``SwarmClient.end_hooks`` get when a request ends (finished, failed or cancelled)."""

    request_id: str  # hex, as in HopRecord
    hops: list[tuple[str, int, int]]  # the final path: (peer_id, start, end)
    local: list[tuple[int, int]]  # the ranges this device ran besides its fallback hops (head, tail)
    positions: int  # positions the request reached


@dataclass
class KeptRequest:
    """A finished request kept alive, its KV on this device and every hop, for a next turn."""

    state: RequestState
    tokens: list[int]  # every token fed so far: the positions the KV caches hold
    needs: RequestNeeds = RequestNeeds()  # what its path was planned for: every turn keeps it

    def extended_by(self, prompt: Sequence[int]) -> bool:
        """True when ``prompt`` starts with these tokens and adds at least one (its logits are needed)."""
        n = len(self.tokens)
        return n < len(prompt) and list(prompt[:n]) == self.tokens


@dataclass
class ClientConfig:
    policy: PrivacyPolicy = field(default_factory=PrivacyPolicy)  # the default; a request may tighten it
    # level -> policy with this client's k and m, resolved per request so that a `trust add`
    # applies to the next request (None: requests can only use ``policy`` itself)
    policy_for: Callable[[str], PrivacyPolicy] | None = None
    target_tbt_ms: float = 250.0
    mode: str = "star"
    deadline: DeadlineConfig = field(default_factory=lambda: DeadlineConfig(overrun_factor=3.0, overrun_ms=50.0, negative_steps=3))
    hop_timeout_s: float = 10.0  # a decode hop that says nothing this long is replaced
    prefill_timeout_s: float = 120.0
    max_reroutes: int = 8
    backend: str = "llamacpp"  # runtime of the middle layers: the peers' (must match) and local fallback's
    local_fallback: bool = True  # run layers no peer can take on this device (it has the model)
    local_ms_per_layer: float = 1000.0  # planner cost of a local layer: a last resort, never preferred
    verify: bool = False  # answer only after the request's audits passed; regenerate past a cheater (split.verified)
    speculate: int = 0  # most drafted tokens verified per pass (prompt lookup, greedy only); 0: one token per step
    draft_model: Path | None = None  # a small GGUF with the same vocabulary: drafts where the context has none
    # requests not latency-critical (a batch job; ``generate(batch=)`` decides per request): the
    # planner may try staked newcomers on their first plan (docs/discovery.md, "Rule for newcomers")
    batch: bool = False
    planner: PlannerConfig = field(default_factory=lambda: PlannerConfig(trial_share=1.0, trial_weight=0.01))


class SwarmClient:
    """Loads this device's layers (head, tail) and runs requests through the swarm.

    ``await SwarmClient.create(...)`` loads off the event loop; ``close()`` frees the engines.
    """

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
        cfg = self.config
        # head and tail hold the tokenizer and LM head: llama.cpp, as in runtime.pipeline;
        # ``backend`` runs the middle layers (peers must run it too, see ``Arithmetic``)
        load_with = lambda backend: lambda a, b: load_engine(backend, model_path, a, b, self.options, cache_dir)  # noqa: E731
        self._load = load_with(cfg.backend)
        self.head = load_with("llamacpp")(h0, h1)
        try:
            self.tail = load_with("llamacpp")(t0, t1)
        except Exception:
            self.head.close()
            self.tokenizer.close()
            raise
        self.holds_model = True  # it can run any layer itself (local fallback, audits)
        self._wire()

    @classmethod
    def from_shards(cls, model, peers: PeerSource, config: ClientConfig | None = None,
                    options: EngineOptions | None = None) -> "SwarmClient":
        """A thin client (``split.thin.ThinModel``): head and tail shard files only, so no local
        fallback; the swarm must serve every layer in between."""
        import dataclasses

        from edge_agent.runtime.llamacpp import LlamaCppEngine
        from edge_agent.runtime.tokenizer import Tokenizer
        from edge_agent.split.thin import check_ranges, no_local_layers

        self = cls.__new__(cls)
        self.config = dataclasses.replace(config or ClientConfig(), local_fallback=False)
        self.peers, self.options = peers, options or EngineOptions(max_requests=4)
        self.n_layer, self.model_hash, self.holds_model = model.n_layer, model.model_hash, False
        self.config.policy.validate(self.n_layer)
        check_ranges(model, *self.config.policy.client_ranges(self.n_layer))
        self._load = no_local_layers
        self.tokenizer = Tokenizer(model.head)  # the head shard keeps the vocabulary and chat template
        self.head = self.tail = None
        try:
            self.head = LlamaCppEngine(model.head, self.options)
            self.tail = LlamaCppEngine(model.tail, self.options)
        except Exception:
            if self.head is not None:
                self.head.close()
            self.tokenizer.close()
            raise
        self._wire()
        return self

    def _wire(self) -> None:
        """Batchers, observers and routing strategies around the loaded head and tail."""
        cfg = self.config
        self._head_steps, self._tail_steps = StepBatcher(self.head), StepBatcher(self.tail)  # shared by concurrent requests
        self.drafter = ModelDrafter.load(cfg.draft_model, self.options, self.tail.info.n_vocab) if cfg.draft_model else None
        self.observers = Observers()  # HopRecord of every hop step this client accepts
        self.end_hooks: list[Callable[[RequestEnd], None]] = []  # e.g. the ledger's receipts
        self.verifier: Verifier | None = None  # request id -> its earliest failed audit (the ledger's auditor)
        self.ledger = None  # this agent's ledger.background.Ledger when it keeps one (node.swarm_client sets it)
        self.banned: set[str] = set()  # peers caught cheating: planned around for the rest of this client's life
        self._local_ms = 0.0
        self._local_link: LocalLink | None = None
        self._said_no_speculation = False  # logged once: peers that do not serve speculative steps
        self.probation = ProbationQuota()  # what peers on probation served of this client's batch requests
        router = Router(self._plan, self._link, self.observers, max_reroutes=cfg.max_reroutes,
                        replay_timeout_s=cfg.prefill_timeout_s)
        self.router = router
        self.star = StarStrategy(router, self._replacements, hop_timeout_s=cfg.hop_timeout_s,
                                 prefill_timeout_s=cfg.prefill_timeout_s)
        self.chain = ChainStrategy(router, self.peers.address, self.star, hop_timeout_s=cfg.hop_timeout_s,
                                   prefill_timeout_s=cfg.prefill_timeout_s)

    @classmethod
    async def create(cls, *args, **kwargs) -> "SwarmClient":
        return await asyncio.to_thread(cls, *args, **kwargs)

    def close(self) -> None:
        if self._local_link is not None:
            self._local_link.close()
        self._head_steps.close()
        self._tail_steps.close()
        self.head.close()
        self.tail.close()
        self.tokenizer.close()
        if self.drafter is not None:
            self.drafter.close()

    # -- planning ---------------------------------------------------------------------------
    def policy_for(self, level: str | None = None) -> PrivacyPolicy:
        """The policy of one request: ``level`` (None: the default's) may tighten the default
        (open < trusted < local), never loosen it; PolicyError otherwise."""
        return request_policy(self.config.policy, level, self.config.policy_for)

    def _admitted(self, policy: PrivacyPolicy) -> list[PeerCapability]:
        """The peers the privacy policy lets see activations (``--privacy trusted``: the allow-list)
        and that serve what the running request needs (``split.needs``: speculative steps, no
        peer on probation but the request's own pick)."""
        caps = [c for c in self.peers.capabilities() if policy.admits(c.peer_id)]
        return request_needs.admit(caps, request_needs.current(), self.peers.speculates, self.peers.on_probation)

    def _on_probation(self, policy: PrivacyPolicy, within=None, needs: RequestNeeds | None = None) -> list[PeerCapability]:
        """The peers on probation the policy admits (``split.needs.probation_peers``)."""
        caps = [c for c in self.peers.capabilities() if policy.admits(c.peer_id) and c.peer_id not in self.banned]
        return request_needs.probation_peers(caps, needs or request_needs.current(), self.peers.speculates,
                                             self.peers.on_probation, within)

    def _replacements(self, policy: PrivacyPolicy) -> list[PeerCapability]:
        """Who could take a late hop's layers: the admitted peers, and the peers on probation,
        which ``_plan`` falls back to for layers no admitted peer takes (on a swarm's first day,
        every peer)."""
        return [*self._admitted(policy), *self._on_probation(policy)]

    def _plan(self, policy: PrivacyPolicy, previous: Plan | None = None, exclude=(), replace_hops=(), trial=False) -> Plan:
        """``trial``: the request's first plan, and it is a batch request: staked newcomers may be tried."""
        caps = self._admitted(policy)
        me = PeerCapability(LOCAL_PEER_ID, (policy.remote_range(self.n_layer),), 1e9,
                            self.config.local_ms_per_layer, 0.0)
        if previous is not None and LOCAL_PEER_ID in previous.peer_ids:
            caps = [*caps, me]  # a hop we run ourselves stays ours
        kw = dict(target_tbt_ms=self.config.target_tbt_ms, local_ms=self._local_ms, previous=previous, exclude=exclude,
                  replace_hops=replace_hops, mode=self.config.mode, config=self.config.planner,
                  request_key=request_needs.current().key, trial_eligible=trial)
        try:
            return plan_path(self.n_layer, policy, caps, **kw)
        except NoRouteError as exc:
            # no route without peers on probation (a swarm's first day: nobody has stake or history
            # yet): they may take the layers no other peer could, on any request
            spare = self._on_probation(policy, exc.missing)
            if spare:
                caps = [*caps, *spare]
                try:
                    return plan_path(self.n_layer, policy, caps, **kw)
                except NoRouteError as again:
                    exc = again
            if policy.name == "local" and not self.holds_model:
                raise NoRouteError(exc.missing, "a thin client holds only its head and tail shards: open the whole "
                                   "model's GGUF to run privately", what="this device cannot run") from None
            fallback = self.config.local_fallback or policy.name == "local"  # local: this device is the only route
            if not fallback or policy.strict or LOCAL_PEER_ID in exclude or me in caps:
                raise explain_no_route(exc, policy, self.peers) from None
        # no peer can take some layers: this device can, since it holds the whole model
        return plan_path(self.n_layer, policy, [*caps, me], **kw)

    async def _link(self, peer_id: str, policy: PrivacyPolicy):
        if peer_id != LOCAL_PEER_ID:
            if not policy.admits(peer_id):  # the last gate before activations leave
                raise HopFailed(peer_id, f"not admitted by privacy policy {policy.name!r}", ErrorCode.INCOMPATIBLE)
            if request_needs.current().speculates and not self.peers.speculates(peer_id):  # nor speculative steps
                raise HopFailed(peer_id, "it does not advertise speculative steps", ErrorCode.INCOMPATIBLE)
            return await self.peers.link(peer_id)
        if self._local_link is None:
            self._local_link = LocalLink(self._load)
        return self._local_link

    async def link_for(self, peer_id: str):
        """The link the client uses for ``peer_id`` (for control messages on the same channel),
        or None for this device's own fallback hop."""
        return None if peer_id == LOCAL_PEER_ID else await self.peers.link(peer_id)

    def _strategy(self, req: RequestState) -> Strategy:
        ids = [h.hop.peer_id for h in req.hops]
        if req.plan.mode == "chain" and len(ids) > 1 and LOCAL_PEER_ID not in ids and len(set(ids)) == len(ids):
            return self.chain
        return self.star  # a path through this device or through one peer twice runs in star mode

    async def _start(self, rid: bytes, policy: PrivacyPolicy) -> RequestState:
        """Plan a path and open its links; peers that cannot be reached are planned around
        (re-plans are no trials: docs/discovery.md)."""
        excluded: set[str] = set(self.banned)
        for attempt in range(self.config.max_reroutes + 1):
            plan = self._plan(policy, exclude=excluded, trial=request_needs.current().batch and attempt == 0)
            try:
                states = await self.router.open(plan, {}, policy)
                return RequestState(rid, plan, DeadlineTracker(plan, self.config.deadline), states, policy, excluded)
            except HopFailed as exc:
                log.info("peer %s unreachable: %s", exc.peer_id[:12], exc.reason)
                excluded.add(exc.peer_id)
        raise NoRouteError([(plan.start, plan.end)], "no reachable peers")

    # -- the token loop ---------------------------------------------------------------------
    async def generate(self, prompt_tokens: Sequence[int], params: SamplingParams,
                       on_token: Callable[[int, str], None] | None = None, *, resume: KeptRequest | None = None,
                       keep: Callable[[KeptRequest], None] | None = None, privacy: str | None = None,
                       batch: bool | None = None) -> GenerationResult:
        """One completion; ``on_token(token_id, new_text)`` streams it. Safe to run many at once.

        ``privacy``: this request's level, which may tighten the client's default (``policy_for``).
        ``batch``: not latency-critical (None: ``config.batch``), so staked newcomers may be tried on it.
        Multi-turn KV reuse: ``keep`` receives the finished request still alive instead of it
        being ended; a later ``generate(resume=that)`` whose prompt extends its tokens, under the
        same policy, computes only the new ones (else it is released and the prompt computed afresh).
        With ``config.verify`` (and a ``verifier``), tokens are handed out once the request's audits
        passed (``split.verified``); conversations are then not kept."""
        if self.config.verify and self.verifier is not None:
            if resume is not None:
                await self.release(resume)
            return await generate_verified(functools.partial(self._generate, batch=batch), self.verifier, self.banned.add,
                                           self.tokenizer, prompt_tokens, params, on_token, privacy)
        return await self._generate(prompt_tokens, params, on_token, resume=resume, keep=keep, privacy=privacy, batch=batch)

    async def _generate(self, prompt_tokens: Sequence[int], params: SamplingParams,
                        on_token: Callable[[int, str], None] | None = None, *, resume: KeptRequest | None = None,
                        keep: Callable[[KeptRequest], None] | None = None, privacy: str | None = None,
                        batch: bool | None = None) -> GenerationResult:
        policy, batch = self.policy_for(privacy), self.config.batch if batch is None else batch
        if resume is not None and not self._continues(resume, prompt_tokens, policy, batch, params):
            await self.release(resume)
            resume = None
        needs = resume.needs if resume is not None else self._needs(policy, params, batch, len(prompt_tokens))
        with request_needs.serving(needs):  # every plan and link of the request, re-routes included, obeys it
            return await self._run(prompt_tokens, params, on_token, policy, needs, resume, keep)

    def _continues(self, kept: KeptRequest, prompt_tokens: Sequence[int], policy: PrivacyPolicy, batch: bool,
                   params: SamplingParams) -> bool:
        """Whether a kept request serves this turn: the prompt extends its tokens, under the same
        policy and mark (a batch turn's path may hold newcomers and a peer on probation), and the
        probation quota pays for that peer again."""
        return (kept.extended_by(prompt_tokens) and kept.state.policy == policy and kept.needs.batch == batch
                and self.probation.charge_turn(kept.needs, self._positions(len(prompt_tokens) - len(kept.tokens), params)))

    def _positions(self, new_tokens: int, params: SamplingParams) -> int:
        """The most positions a turn may compute: what the probation quota charges up front."""
        return min(new_tokens + params.max_tokens, self.options.n_ctx_per_request)

    def _needs(self, policy: PrivacyPolicy, params: SamplingParams, batch: bool, n_prompt: int) -> RequestNeeds:
        """A new request's: it speculates (greedy, on a speculating client) only where the peers that
        serve speculative steps cover every layer the others do; else it runs one token per step.
        A batch request may get one peer on probation, within the quota (``ProbationQuota``)."""
        speculates = self.config.speculate > 0 and params.greedy
        if speculates:
            caps = [c for c in self.peers.capabilities() if policy.admits(c.peer_id) and c.peer_id not in self.banned]
            older = request_needs.speculation_loses_layers(policy.remote_range(self.n_layer), caps, self.peers.speculates)
            speculates = not older
            if older and not self._said_no_speculation:
                self._said_no_speculation = True
                log.info("no speculation while peers %s alone serve some layers and do not advertise speculative steps "
                         "(older nodes): those requests run one token per step", ", ".join(p[:12] for p in older))
        needs = RequestNeeds(uuid.uuid4().bytes, speculates, batch)
        if not batch:
            return needs  # interactive: no peer on probation while a route exists without them (``_plan``)
        return self.probation.pick(needs, self._on_probation(policy, needs=needs), policy.remote_range(self.n_layer),
                                   self._positions(n_prompt, params))

    async def _run(self, prompt_tokens: Sequence[int], params: SamplingParams, on_token, policy: PrivacyPolicy,
                   needs: RequestNeeds, resume: KeptRequest | None, keep) -> GenerationResult:
        req = resume.state if resume is not None else await self._start(needs.key, policy)
        fed = list(resume.tokens) if resume is not None else []  # what the KV caches hold
        for hs in req.hops:  # per-turn numbers
            hs.steps, hs.compute_ms, hs.transfer_ms = 0, 0.0, 0.0
        decoder = Decoder(self.tokenizer, params, list(prompt_tokens))
        feed = decoder.first_feed()
        feed = feed[len(fed) :] if feed is not None else None
        pos, sid, reused = len(fed), req.rid.hex(), len(fed)
        # speculation: the caches may hold rejected drafts beyond ``pos`` (also from a kept turn),
        # so every later step rewinds; decode steps carry drafts (greedy only: docs/split.md)
        spec = Speculation(self.config.speculate if needs.speculates else 0, params.greedy, prompt_tokens,
                           self.options.n_ctx_per_request, self.drafter, sid)
        kept = None
        try:
            while feed is not None:
                flags = spec.flags(pos, decoding=req.step_index > 0 and pos > reused)
                rewind, draft = bool(flags & Flag.REWIND), bool(flags & Flag.DRAFT)
                t0 = time.perf_counter()
                x = await self._head_steps.forward(StepInput(sid, pos, feed, rewind=rewind, draft=draft))
                t1 = time.perf_counter()
                x = await self._strategy(req).step(req, pos, x, flags)
                t2 = time.perf_counter()
                logits = await self._tail_steps.forward(StepInput(sid, pos, x, all_logits=draft, rewind=rewind, draft=draft))
                if feed.shape[0] == 1:
                    self._local_ms = (t1 - t0 + time.perf_counter() - t2) * 1000.0
                req.step_index += 1
                if draft:
                    spec.observe(feed.shape[0], time.perf_counter() - t0)
                    accepted, nxt = decoder.advance_drafts(logits.reshape(feed.shape[0], -1), feed[1:].tolist(), on_token)
                    n_kept = accepted + 1
                else:
                    nxt, n_kept = decoder.advance(logits, on_token), feed.shape[0]
                fed.extend(feed[:n_kept].tolist())
                pos += n_kept
                feed = await spec.next_feed(nxt, decoder, pos, feed.shape[0] - 1 if draft else 0, n_kept - 1 if draft else 0)
            kept = KeptRequest(req, fed, needs) if keep is not None else None
        finally:  # also on cancellation: free the request everywhere
            await spec.close()
            if needs.batch:  # the probation quota's base: what this turn's path computed
                self.probation.served(sum(h.hop.end - h.hop.start for h in req.hops if h.hop.peer_id != LOCAL_PEER_ID)
                                      * (len(fed) - reused))
            if kept is None:
                await self.release(KeptRequest(req, fed))
        if kept is not None:
            keep(kept)
        result = decoder.result(request_stats(req, [self.head.info, self.tail.info]))
        result.stats["kv_reused_tokens"] = reused
        result.stats["batch"] = needs.batch
        if spec.enabled:
            result.stats["speculation"] = spec.stats()
        elif self.config.speculate and params.greedy:
            result.stats["speculation"] = {"off": "a peer for some layers does not advertise speculative steps"}
        return result

    async def release(self, kept: KeptRequest) -> None:
        """End a request on this device and every hop (frees its KV caches)."""
        req, pos = kept.state, len(kept.tokens)
        sid = req.rid.hex()
        self.head.end_request(sid)
        self.tail.end_request(sid)
        await self.router.end(req, req.hops)
        end = RequestEnd(sid, [(h.hop.peer_id, h.hop.start, h.hop.end) for h in req.hops],
                         [(e.info.start, e.info.end) for e in (self.head, self.tail)], pos)
        for hook in self.end_hooks:
            try:
                hook(end)
            except Exception:  # noqa: BLE001 - a hook (control plane) never breaks a request
                log.exception("request end hook failed")
