"""A thin client: a device that holds only its own layers' shard files, not the whole model.

The head shard ``[0, k)`` carries the vocabulary, chat template and token embedding; the
tail shard ``[n - m, n)`` the final norm and LM head (runtime/shards.py). That is all a
``SwarmClient`` needs to tokenize, embed and sample; the rest of the swarm serves every
layer in between. Without the whole model such a client cannot run a layer itself (no
local fallback, no ``--privacy local``) nor re-execute its peers' layers (no audits).

``fetch_thin`` gets both shards from a peer that shares the model's weights, each verified
tensor by tensor against the model's content hash (``weights.fetch_shard``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edge_agent.runtime.engine import EngineError
from edge_agent.runtime.shards import inspect_model


@dataclass(frozen=True)
class ThinModel:
    """What a thin client runs from: its head and tail shard files and the model they belong to."""

    head: Path
    tail: Path
    model_hash: str
    n_layer: int
    title: str  # the model's general.name

    @property
    def name(self) -> str:
        """The model's name as the API reports it (a whole model's is its file name)."""
        return re.sub(r"[^A-Za-z0-9._-]+", "-", self.title).strip("-") or f"model-{self.model_hash[:12]}"

    def __str__(self) -> str:
        return f"{self.head} + {self.tail}"


def thin_model(head: Path, tail: Path) -> ThinModel:
    """Check that ``head`` and ``tail`` are the first and last layers of one model; EngineError if not."""
    h, t = inspect_model(head, with_hash=False), inspect_model(tail, with_hash=False)
    if h.role != "head" or t.role != "tail":
        raise EngineError(f"a thin client needs a head and a tail shard, got {h.role} {head.name} and {t.role} {tail.name}")
    if not h.source_model_hash or h.source_model_hash != t.source_model_hash or h.source_n_layer != t.source_n_layer:
        raise EngineError(f"{head.name} and {tail.name} are shards of different models")
    return ThinModel(Path(head), Path(tail), h.source_model_hash, int(h.source_n_layer), h.name)


def check_ranges(model: ThinModel, head_range: tuple[int, int], tail_range: tuple[int, int]) -> None:
    """The privacy policy's client ranges must be exactly the layers the shard files hold."""
    held = (tuple(inspect_model(model.head, with_hash=False).layer_range), tuple(inspect_model(model.tail, with_hash=False).layer_range))
    if held != (tuple(head_range), tuple(tail_range)):
        raise EngineError(f"this thin client holds layers {held[0]} and {held[1]}, but its policy needs "
                          f"{tuple(head_range)} and {tuple(tail_range)} on this device (fetch those ranges)")


@dataclass(frozen=True)
class WeightOffer:
    """A peer that shares a model's weights, and what a thin client of that model would fetch."""

    peer_id: str
    model_hash: str  # the full content hash of the peer's manifest
    n_layer: int
    sizes: tuple[int, int]  # bytes of the head and tail shard files

    @property
    def total_bytes(self) -> int:
        return sum(self.sizes)


async def weight_offer(link, model_hash_prefix: str, k: int = 1, m: int = 1) -> WeightOffer:
    """Ask a weights-sharing peer for its model (whose hash must start with ``model_hash_prefix``:
    what its signed record advertises, or a known model's full hash) and its head and tail shards' sizes."""
    from edge_agent.split.weights import read_manifest, shard_size

    model_hash, n_layer, manifest = await read_manifest(link, model_hash_prefix)
    if not 0 < k <= n_layer - m < n_layer:
        raise EngineError(f"a {n_layer}-layer model has no head of {k} and tail of {m} layers with a middle to serve")
    sizes = (await shard_size(link, 0, k, manifest), await shard_size(link, n_layer - m, n_layer, manifest))
    return WeightOffer(link.peer_id, model_hash, n_layer, sizes)


def no_local_layers(start: int, end: int):
    """The local fallback's loader of a thin client: it holds no other layers."""
    raise EngineError(f"this device holds only its head and tail shards, not layers {start}:{end}: "
                      "open the whole model's GGUF to run layers here")


async def fetch_thin(link, offer: WeightOffer, dest: Path, k: int = 1, m: int = 1,
                     progress: Callable[[int, int], None] | None = None) -> ThinModel:
    """Fetch (and verify) the head [0, k) and tail [n - m, n) shards of ``offer``'s model from ``link``.

    ``progress(done, total)`` counts both files' bytes."""
    from edge_agent.split.weights import fetch_shard

    model_hash, n_layer = offer.model_hash, offer.n_layer
    paths: list[Path] = []
    for i, (a, b) in enumerate([(0, k), (n_layer - m, n_layer)]):
        before = sum(offer.sizes[:i])
        report = (lambda done, _size, before=before: progress(before + done, offer.total_bytes)) if progress else None
        final = dest / f"{model_hash[:16]}-{a}-{b}.gguf"
        if final.is_file():  # fetched and verified before
            paths.append(final)
            if report:
                report(offer.sizes[i], offer.sizes[i])
            continue
        paths.append(await fetch_shard(link, model_hash, a, b, dest, report))
    return thin_model(*paths)
