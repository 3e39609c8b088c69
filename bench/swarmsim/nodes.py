"""Simulated devices: what they are, what they claim, how far apart they are.

The model is a 70B-class llama (80 layers, ~510 MB of Q4_K_M weights per layer). Decoding
one token through one layer reads that layer's weights once, so ``ms_per_layer`` is
weights / memory bandwidth; the layers a device serves are what ~80% of its memory holds.
``slots`` is how many requests it serves at once; it is advertised as free KV memory
(``slots * span * KV_MB_PER_LAYER``), so the planner's memory check is the load check.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Optional

from nacl.signing import SigningKey

from edge_agent.discovery.capabilities import ARITH_KEY, Capabilities
from edge_agent.discovery.identity import Identity, SwarmKey
from edge_agent.split.planner import PeerCapability

N_LAYER = 80
REMOTE = (1, 79)  # PrivacyPolicy(k=1, m=1): the client keeps layers 0 and 79
LAYER_WEIGHTS_MB = 510.0
KV_MB_PER_LAYER = 8.0  # one request, 2048 positions, GQA 8 x 128, f16: 2 * 8 * 128 * 2 B * 2048
MODEL_HASH = "3f2a9c01d4e5b6a7"
SWARM = SwarmKey.from_secret("swarm-sim-private-swarm-secret-0123456789")


@dataclass(frozen=True)
class DeviceClass:
    name: str
    share: float
    memory_gb: tuple[float, float]
    bandwidth_gbs: tuple[float, float]
    slots: int


CLASSES = (  # shares of a volunteer swarm; bandwidths: LPDDR4X/5 phones, Pi-class SBCs, laptops up to M-series, consumer GPUs
    DeviceClass("phone", 0.35, (3, 6), (25, 50), 1),
    DeviceClass("sbc", 0.15, (4, 8), (8, 17), 1),
    DeviceClass("laptop", 0.35, (8, 24), (50, 200), 2),
    DeviceClass("gpu", 0.15, (12, 24), (360, 1000), 8),
)
SYBIL_TRUE_MS = 25.0  # 1,000 identities on an attacker's few machines: each gets a sliver of them


@dataclass(eq=False)
class Node:
    idx: int
    agent_id: str
    kind: str
    pos: tuple[float, float]
    ms_per_layer: float  # the truth
    claimed_ms: float  # what its signed record says
    span: tuple[int, int]
    slots: int
    record_bytes: int  # its real sealed TXT record
    joined_at: float
    sybil: bool = False
    reputation: Optional[float] = None  # None: no history yet
    staked: bool = False  # put up stake when it joined (the verification issue's; here a flag)
    gone_at: float = math.inf
    graceful: bool = True
    kv_used_mb: float = 0.0
    good_steps: int = 0
    first_used: Optional[float] = None
    first_seen: Optional[float] = None  # first time a client fetched its record
    first_offered: Optional[float] = None  # first time a client handed it to the planner
    holds: dict = field(default_factory=dict)  # request id -> KV MB held
    kv: dict = field(default_factory=dict)  # (request id, layer) -> simulated KV state

    @property
    def dht_id(self) -> int:
        return int(self.agent_id[:16], 16)

    @property
    def kv_capacity_mb(self) -> float:
        return self.slots * (self.span[1] - self.span[0]) * KV_MB_PER_LAYER

    @property
    def on_probation(self) -> bool:
        """No stake and no history: the newcomer rule applies (``view``)."""
        return self.reputation is None and not self.staked

    def alive(self, t: float) -> bool:
        return self.joined_at <= t < self.gone_at

    def capability(self, rtt_ms: float, advertised_free_mb: float, reputation: Optional[float]) -> PeerCapability:
        return PeerCapability(self.agent_id, (self.span,), advertised_free_mb, self.claimed_ms, rtt_ms,
                              reputation=reputation, layer_bytes_mb=KV_MB_PER_LAYER)


def seeded_identity(rng: random.Random) -> Identity:
    """A real Ed25519 identity from the simulation's seed, so a run can be repeated."""
    return Identity(SigningKey(rng.randbytes(32)))


def rtt_ms(a: tuple[float, float], b: tuple[float, float]) -> float:
    """1 ms next door to 100 ms across the unit square (one plane for the world's latencies)."""
    return 1.0 + 99.0 * math.dist(a, b) / math.sqrt(2.0)


def sealed_record(identity: Identity, span: tuple[int, int], free_mb: int, ms: float, backend: str) -> bytes:
    """The real signed capability record (TXT wire form) this node would advertise."""
    caps = Capabilities(agent_id=identity.agent_id, signal_port=8470, tls_port=8471,
                        shards=((MODEL_HASH, span[0], span[1]),), free_mem_mb=free_mb, ms_per_layer=ms,
                        backend=backend, extra=((ARITH_KEY, "llamacpp/512/0/f16"),))
    return caps.sealed(identity, SWARM).to_txt()


def draw_node(idx: int, rng: random.Random, now: float, choose_span=None, sybil: bool = False) -> Node:
    """A device drawn from CLASSES (or a Sybil claiming a fast GPU holding every remote layer).

    ``choose_span(width) -> (start, end)`` places an honest node's layers (the real
    ``choose_range_to_serve`` over what it has learned); None: uniformly at random."""
    identity = seeded_identity(rng)
    pos = (rng.random(), rng.random())
    if sybil:
        span, claimed, true, slots, kind = REMOTE, 0.5, SYBIL_TRUE_MS, 8, "sybil"
    else:
        cls = rng.choices(CLASSES, weights=[c.share for c in CLASSES])[0]
        memory_mb = rng.uniform(*cls.memory_gb) * 1024
        true = claimed = round(LAYER_WEIGHTS_MB / rng.uniform(*cls.bandwidth_gbs), 3)
        width = max(1, min(REMOTE[1] - REMOTE[0], int(memory_mb * 0.8 // LAYER_WEIGHTS_MB)))
        if choose_span is not None:
            span = choose_span(width)
        else:  # the established swarm: starts uniform, ranges cut at the ends, so every layer is as covered
            start = rng.randint(REMOTE[0] - width + 1, REMOTE[1] - 1)
            span = (max(REMOTE[0], start), min(REMOTE[1], start + width))
        slots, kind = cls.slots, cls.name
    free = int(slots * (span[1] - span[0]) * KV_MB_PER_LAYER)
    record = sealed_record(identity, span, free, claimed, "gpu" if kind in ("gpu", "sybil") else "llamacpp")
    return Node(idx, identity.agent_id, kind, pos, true, claimed, span, slots, len(record), now, sybil=sybil)
