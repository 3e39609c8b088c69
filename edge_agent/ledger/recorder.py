"""From HopRecords to signed records: commitments on the node, receipts on the client.

Both sides cut a (request, node, layer range)'s steps into the same chunks: a frame of
several positions (a prefill piece, a replay) is a chunk of its own; single-position
decode steps are grouped ``chunk_size`` at a time; whatever is open when the client asks
is closed then. So the client can recompute each chunk's input and output hashes from
what it sent and received, and check the node's signed commitment against them.

The node signs a chunk when it closes (about 30 us per 32 tokens) and queues it for the
store; the client fetches a hop's commitments once, at the end of the request, checks
them off the event loop and then both sign one receipt. Nothing here is awaited by the
token loop: ``observe`` only appends to a list.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

from edge_agent.discovery.identity import Identity, public_key_from_agent_id, verify
from edge_agent.ledger import wire
from edge_agent.ledger.fingerprint import Accumulator
from edge_agent.ledger.encoding import (CLIENT_CONTEXT, FLAG_REPLAY, NODE_CONTEXT, ZERO32, CommitmentBody, EncodingError,
                                        ReceiptBody, chunk_hash, decode_receipt_body)
from edge_agent.ledger.records import Commitment, Receipt
from edge_agent.ledger.store import LedgerStore
from edge_agent.ledger.wire import Msg

log = logging.getLogger(__name__)
CHUNK_SIZE = 32
MAX_OPEN = 4096  # (request, range) chains kept in memory; the oldest are dropped first
MAX_CHUNKS_PER_HOP = 2000  # = wire.MAX_RECORDS: one COMMITS reply


@dataclass
class _Step:
    step: int
    n: int
    input_digest: bytes
    output_digest: bytes
    compute_ms: float
    replay: bool
    wall_ms: float = 0.0
    budget_ms: float | None = None


def chunks_of(steps: list[_Step], chunk_size: int) -> list[list[_Step]]:
    """The chunking rule both sides apply (see the module docstring)."""
    out: list[list[_Step]] = []
    cur: list[_Step] = []
    for s in steps:
        if s.n > 1:
            if cur:
                out.append(cur)
                cur = []
            out.append([s])
        else:
            cur.append(s)
            if len(cur) == chunk_size:
                out.append(cur)
                cur = []
    if cur:
        out.append(cur)
    return out


def _body_for(chunk: list[_Step], index: int, prev: bytes, fingerprint: bytes, **fixed) -> CommitmentBody:
    return CommitmentBody(chunk=index, fingerprint=fingerprint, step_start=chunk[0].step, step_end=chunk[-1].step + chunk[-1].n,
                          inputs_hash=chunk_hash([s.input_digest for s in chunk]),
                          outputs_hash=chunk_hash([s.output_digest for s in chunk]),
                          compute_us=int(sum(s.compute_ms for s in chunk) * 1000), prev=prev,
                          flags=FLAG_REPLAY if any(s.replay for s in chunk) else 0, **fixed)


@dataclass
class _Chain:
    """One (request, layer range) on the node: the open chunk and the signed ones."""

    fixed: dict
    open: list[_Step] = field(default_factory=list)
    fingerprint: Accumulator = field(default_factory=Accumulator)  # of the open chunk's outputs
    signed: list[Commitment] = field(default_factory=list)
    steps: int = 0

    @property
    def head(self) -> bytes:
        return self.signed[-1].id if self.signed else ZERO32


class NodeRecorder:
    """A hop server's side: sign commitments per chunk, sign receipts the client proposes."""

    def __init__(self, identity: Identity, store: LedgerStore, shard_hashes: Callable[[int, int], tuple[str, str]],
                 chunk_size: int = CHUNK_SIZE) -> None:
        self.identity = identity
        self.store = store
        self.shard_hashes = shard_hashes  # (start, end) -> (model hash hex, shard hash hex)
        self.chunk_size = chunk_size
        self.chains: OrderedDict[tuple[str, int, int], _Chain] = OrderedDict()

    def observe(self, rec) -> None:
        if rec.side != "node":
            return
        key = (rec.request_id, rec.start, rec.end)
        chain = self.chains.get(key)
        if chain is None:
            model_hash, shard_hash = self.shard_hashes(rec.start, rec.end)
            chain = self.chains[key] = _Chain(dict(request_id=bytes.fromhex(rec.request_id), node=self.identity.public_key,
                                                   layer_start=rec.start, layer_end=rec.end,
                                                   model_hash=bytes.fromhex(model_hash), shard_hash=bytes.fromhex(shard_hash)))
            while len(self.chains) > MAX_OPEN:
                self.chains.popitem(last=False)
        step = _Step(rec.step, rec.n_positions, rec.input_digest, rec.output_digest, rec.compute_ms, rec.replay)
        chain.steps += rec.n_positions
        if step.n > 1:
            self._close(chain)
        chain.open.append(step)
        if rec.output is not None:
            chain.fingerprint.add(rec.step, rec.output)
        if step.n > 1:
            self._close(chain)
        else:
            if len(chain.open) >= self.chunk_size:
                self._close(chain)

    def _close(self, chain: _Chain) -> None:
        if not chain.open:
            return
        body = _body_for(chain.open, len(chain.signed), chain.head, chain.fingerprint.finish(), **chain.fixed)
        chain.open, chain.fingerprint = [], Accumulator()
        if len(chain.signed) >= MAX_CHUNKS_PER_HOP:
            return  # a request this long gets no more commitments (bounded memory); the receipt will say so
        c = Commitment.sign(self.identity, body)
        chain.signed.append(c)
        self.store.add(commitments=[c])

    async def handle(self, kind: Msg, r: wire.Reader, peer: str) -> bytes:
        if kind == Msg.COMMITS_GET:
            request_id, start, end = wire.read_commits_get(r)
            chain = self.chains.get((request_id.hex(), start, end))
            if chain is None:
                return wire.error("no work recorded for this request and layers")
            self._close(chain)
            return wire.items(Msg.COMMITS, [c.to_bytes() for c in chain.signed])
        body, client_sig = wire.read_receipt_sign(r)
        return self._countersign(body, client_sig, peer)

    def _countersign(self, raw: bytes, client_sig: bytes, peer: str) -> bytes:
        try:
            f = decode_receipt_body(raw)
        except EncodingError as exc:
            return wire.error(f"malformed receipt: {exc.reason}")
        chain = self.chains.get((f.request_id.hex(), f.layer_start, f.layer_end))
        problem = None
        if f.node != self.identity.public_key:
            problem = "receipt names another node"
        elif public_key_from_agent_id(peer) != f.client or not verify(f.client, CLIENT_CONTEXT + raw, client_sig):
            problem = "receipt is not signed by the client asking"
        elif chain is None:
            problem = "no work recorded for this request and layers"
        elif (f.chain_head, f.chunks, f.steps) != (chain.head, len(chain.signed), chain.steps) or chain.open:
            problem = "receipt does not match this node's commitments"
        elif f.model_hash != chain.fixed["model_hash"]:
            problem = "receipt names another model"
        if problem:
            return wire.error(problem)
        node_sig = Receipt.node_signature(self.identity, raw)
        self.store.add(receipts=[Receipt(raw, node_sig, client_sig)])
        self.chains.pop((f.request_id.hex(), f.layer_start, f.layer_end), None)
        return wire.pack(Msg.RECEIPT_SIGNED, node_sig)


@dataclass
class _Hop:
    """What the client saw of one (request, peer, range)."""

    steps: list[_Step] = field(default_factory=list)


class ClientRecorder:
    """The client's side: remember what each hop was sent and answered; at the end, check
    the hop's commitments against it and countersign one receipt per hop."""

    def __init__(self, identity: Identity, store: LedgerStore, model_hash: str, chunk_size: int = CHUNK_SIZE,
                 bytes_per_position: int = 0) -> None:
        self.identity = identity
        self.store = store
        self.model_hash = bytes.fromhex(model_hash)
        self.chunk_size = chunk_size
        self.bytes_per_position = bytes_per_position  # n_embd * 4: activation bytes per position, each way
        self.hops: OrderedDict[tuple[str, str, int, int], _Hop] = OrderedDict()
        self.failures: list[str] = []  # hops whose commitments did not check out (for telemetry and tests)
        self._tasks: set[asyncio.Task] = set()
        self._by_request: dict[str, asyncio.Task] = {}
        self.unverified: dict[str, list[tuple[str, int]]] = {}  # request -> (peer, first position) with no verified commitments
        self.peers: set[str] = set()  # every peer that did work for us (the end-of-run sync pushes to them)
        self.on_commitments: Callable | None = None  # (request, peer, start, end, commitments) once verified: audits
        self.on_settled: Callable | None = None  # (request) once every hop's commitments were checked: chain audits

    def observe(self, rec) -> None:
        if rec.side != "client":
            return
        key = (rec.request_id, rec.peer_id, rec.start, rec.end)
        self.peers.add(rec.peer_id)
        hop = self.hops.get(key)
        if hop is None:
            hop = self.hops[key] = _Hop()
            while len(self.hops) > MAX_OPEN:
                self.hops.popitem(last=False)
        hop.steps.append(_Step(rec.step, rec.n_positions, rec.input_digest, rec.output_digest, rec.compute_ms, rec.replay,
                               rec.wall_ms, rec.budget_ms))

    def request_ended(self, request_id: str, hops: list[tuple[str, int, int]], local: list[tuple[int, int]],
                      positions: int, request_for: Callable) -> None:
        """The client's hook at the end of a request: finalize it in the background (``drain`` waits)."""
        self.peers.update(h[0] for h in hops)
        task = asyncio.get_running_loop().create_task(self.finalize(request_id, request_for, hops, local, positions))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self._by_request[request_id] = task
        task.add_done_callback(lambda _t: self._by_request.pop(request_id, None))

    async def finished(self, request_id: str, timeout_s: float = 60.0) -> list[tuple[str, int]]:
        """Wait (bounded) until this request's receipts are settled (and its audits started);
        returns the (peer, first position) of hops whose commitments did not check out.
        TimeoutError if they are not settled within ``timeout_s``."""
        task = self._by_request.get(request_id)
        if task is not None:
            _, pending = await asyncio.wait([task], timeout=timeout_s)
            if pending:
                raise TimeoutError(f"the receipts of request {request_id[:8]} were not settled in {timeout_s:.0f} s")
        return self.unverified.pop(request_id, [])

    async def drain(self, timeout_s: float = 30.0) -> None:
        """Wait for requests still being finalized (before closing the links they use)."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout_s)

    async def finalize(self, request_id: str, request_for: Callable, hops: list[tuple[str, int, int]],
                       local: list[tuple[int, int]], positions: int) -> list[Receipt]:
        """Close a request: a countersigned receipt per remote hop, a self-signed one per local range.

        ``request_for(peer_id)`` -> an async ledger request function for that peer, or None for
        this device's own fallback hop. ``hops`` (the final path) adds hops the client has no
        records of (their commitments are checked for signatures and links only). Once every
        hop is settled, ``on_settled`` starts the audits that need them all (chain mode).
        """
        out = []
        keys = [k for k in self.hops if k[0] == request_id]
        keys += [(request_id, *h) for h in hops if (request_id, *h) not in keys]
        for key in keys:
            hop = self.hops.pop(key, None)
            _, peer_id, start, end = key
            try:
                request = await request_for(peer_id)
                if request is None:  # the client's own fallback hop: like its head and tail
                    local = [*local, (start, end)]
                    continue
                out.append(await self._remote_receipt(request_id, peer_id, start, end, hop, request))
            except Exception as exc:  # noqa: BLE001 - a refusal, a dead peer, junk: no receipt, never a crash
                reason = getattr(exc, "reason", None) or repr(exc)
                self.failures.append(f"{peer_id[:12]} {start}:{end}: {reason}")
                first = hop.steps[0].step if hop is not None and hop.steps else 0
                self.unverified.setdefault(request_id, []).append((peer_id, first))  # its work cannot be checked
                log.warning("no receipt from %s for layers %d:%d: %s", peer_id[:12], start, end, reason)
        ended = int(time.time() * 1000)
        for start, end in local:
            body = ReceiptBody(bytes.fromhex(request_id), self.identity.public_key, self.identity.public_key, start, end,
                               self.model_hash, positions, 0, ZERO32, 0, 0, 0, 0, 0, ended)
            out.append(Receipt.sign_both(self.identity, body))
        if self.on_settled is not None:
            self.on_settled(request_id)
        await asyncio.wrap_future(self.store.add(receipts=[r for r in out if r.fields.node == self.identity.public_key]))
        return out

    async def _remote_receipt(self, request_id: str, peer_id: str, start: int, end: int, hop: _Hop, request) -> Receipt:
        node = public_key_from_agent_id(peer_id)
        reply = await _ask(request, wire.commits_get(bytes.fromhex(request_id), start, end), Msg.COMMITS)
        commitments = [Commitment.from_bytes(x) for x in wire.read_commitments(reply)]
        steps = hop.steps if hop is not None else None
        expected = chunks_of(steps, self.chunk_size) if steps is not None else None
        problem = await asyncio.to_thread(_check_chain, commitments, expected, node, request_id, start, end, self.model_hash)
        if problem:
            raise ReceiptRefused(problem)
        if self.on_commitments is not None:
            self.on_commitments(request_id, peer_id, start, end, commitments)
        decode = [s for s in steps or () if s.n == 1 and s.budget_ms is not None]
        met = sum(1 for s in decode if s.wall_ms <= s.budget_ms)
        positions = sum(s.n for s in steps) if steps is not None else sum(c.fields.step_end - c.fields.step_start for c in commitments)
        body = ReceiptBody(bytes.fromhex(request_id), node, self.identity.public_key, start, end, self.model_hash, positions,
                           len(commitments), commitments[-1].id if commitments else ZERO32, met, len(decode) - met,
                           positions * self.bytes_per_position, positions * self.bytes_per_position,
                           sum(c.fields.compute_us for c in commitments), int(time.time() * 1000))
        raw = Receipt.encode_body(body)
        client_sig = Receipt.client_signature(self.identity, raw)
        signed = await _ask(request, wire.receipt_sign(raw, client_sig), Msg.RECEIPT_SIGNED)
        node_sig = signed.take(64)
        signed.done()
        if not verify(node, NODE_CONTEXT + raw, node_sig):
            raise ReceiptRefused("the node's receipt signature does not verify")
        receipt = Receipt(raw, node_sig, client_sig)
        self.store.add(receipts=[receipt], commitments=commitments)
        return receipt


class ReceiptRefused(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


async def _ask(request, payload: bytes, expect: Msg) -> wire.Reader:
    kind, r = wire.unpack(await request(payload))
    if kind == Msg.ERROR:
        raise ReceiptRefused("node refused: " + r.take(len(r.data)).decode("utf-8", "replace"))
    if kind != expect:
        raise ReceiptRefused(f"node answered {kind.name}, expected {expect.name}")
    return r


def _check_chain(commitments: list[Commitment], expected: list[list[_Step]] | None, node: bytes | None, request_id: str,
                 start: int, end: int, model_hash: bytes) -> str | None:
    """Signatures, linkage, and agreement with what the client itself sent and received
    (``expected`` None: no records of this hop; a chain hop's records know only its first input
    and last output)."""
    if expected is not None and len(commitments) != len(expected):
        return f"{len(commitments)} commitments for {len(expected)} chunks the client saw"
    if not commitments:
        return "no commitments"
    prev = ZERO32
    for i, c in enumerate(commitments):
        problem = c.problem()
        if problem:
            return f"chunk {i}: {problem}"
        f = c.fields
        if (f.node, f.request_id.hex(), f.layer_start, f.layer_end, f.chunk, f.prev, f.model_hash) != (
                node, request_id, start, end, i, prev, model_hash):
            return f"chunk {i}: not this hop's chain"
        prev = c.id
        if expected is None:
            continue
        chunk = expected[i]
        if (f.step_start, f.step_end) != (chunk[0].step, chunk[-1].step + chunk[-1].n):
            return f"chunk {i}: steps {f.step_start}:{f.step_end} differ from what the client sent"
        if _known_differs(f.inputs_hash, [s.input_digest for s in chunk]) or _known_differs(
                f.outputs_hash, [s.output_digest for s in chunk]):
            return f"chunk {i}: activation hashes differ from what the client sent and received"
    return None


def _known_differs(committed: bytes, digests: list[bytes]) -> bool:
    """The committed hash is not that of ``digests``; an empty digest (a chain hop's side the
    client never saw, ``split.chain``) leaves the chunk to the auditor's recomputation."""
    return all(digests) and committed != chunk_hash(digests)
