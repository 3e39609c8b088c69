"""Getting a layer range's weights from a peer, checked tensor by tensor.

A node that lacks the model file asks a peer that has it for (1) the model's tensor
manifest, whose hash must equal the model hash the node was told to serve (so the
manifest cannot be forged), then (2) the shard file for its range, in resumable chunks
over the fast direct transport. Every tensor of the downloaded shard is hashed and must
equal the manifest's entry for it; a single mismatch and the file is refused and
deleted. A node therefore never serves weights whose hash differs from what it
advertises.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from edge_agent.runtime.shards import TensorEntry, _manifest_hash, ensure_shard, inspect_model, tensor_manifest
from edge_agent.transport import Frame, MsgType

CHUNK_BYTES = 4 << 20
MAX_MANIFEST_BYTES = 16 << 20
MAX_RANGES_SERVED = 8  # distinct shard files a node writes on peers' behalf
METADATA_ALLOWANCE = 64 << 20  # a shard file = its tensors + metadata (vocabulary) + alignment


class WeightsError(Exception):
    """The peer's weights do not match the model hash we were given (tampered or wrong model)."""


class WeightSource:
    """Serves this node's model file to peers that lack it (the hop server calls ``handle``)."""

    def __init__(self, model_path: Path, cache_dir: Path):
        import threading

        self.model_path = Path(model_path)
        self.cache_dir = Path(cache_dir)
        self.info = inspect_model(self.model_path)
        self._lock = threading.Lock()
        self._ranges: set[tuple[int, int]] = set()

    def handle(self, msg: dict) -> tuple[dict, bytes]:
        op = msg.get("op")
        if op == "manifest":
            entries = [asdict(e) for e in tensor_manifest(self.model_path)]
            return {"model_hash": self.info.model_hash, "n_layer": self.info.n_layer}, json.dumps(entries).encode()
        start, end = msg.get("start"), msg.get("end")
        if not (isinstance(start, int) and isinstance(end, int)) or (start, end) == (0, self.info.n_layer):
            raise ValueError("weights are shared per layer range, not as a whole model")
        with self._lock:  # one writer per shard file; a bounded number of them
            if (start, end) not in self._ranges and len(self._ranges) >= MAX_RANGES_SERVED:
                raise ValueError(f"this node already prepared {MAX_RANGES_SERVED} ranges for peers")
            path = ensure_shard(self.model_path, start, end, self.cache_dir)  # validates the range
            self._ranges.add((start, end))
        if op == "shard_info":
            return {"size": path.stat().st_size}, b""
        if op == "chunk":
            offset, length = msg.get("offset", 0), msg.get("length", CHUNK_BYTES)
            if not (isinstance(offset, int) and isinstance(length, int)) or offset < 0 or length < 0:
                raise ValueError("offset and length must be non-negative integers")
            length = min(length, CHUNK_BYTES)
            with open(path, "rb") as f:
                f.seek(offset)
                return {"offset": offset}, f.read(length)
        raise ValueError(f"unknown weights op {op!r}")


def verify_shard(path: Path, manifest: list[TensorEntry], model_hash: str, start: int, end: int) -> None:
    """Refuse a shard whose tensors or metadata do not belong to ``model_hash`` layers [start, end)."""
    by_name = {e.name: e for e in manifest}
    info = inspect_model(path, with_hash=False)
    if info.source_model_hash != model_hash or tuple(info.layer_range or ()) != (start, end):
        raise WeightsError(f"shard metadata names model {info.source_model_hash} layers {info.layer_range}, "
                           f"expected {model_hash[:16]} layers {start}:{end}")
    import re

    block = re.compile(r"^blk\.(\d+)\.(.+)$")
    expected = {n for n in by_name if (m := block.match(n)) and start <= int(m.group(1)) < end}
    present: set[str] = set()
    for e in tensor_manifest(path):
        m = block.match(e.name)
        src = f"blk.{int(m.group(1)) + start}.{m.group(2)}" if m else e.name
        if e.name == "token_embd.weight" and e.shape[-1] == 1:
            continue  # a middle shard's one-row dummy, not model weights
        want = by_name.get(src)
        if want is None or (want.sha256, want.type, want.shape) != (e.sha256, e.type, e.shape):
            raise WeightsError(f"tensor {src} does not match the manifest of model {model_hash[:16]} (tampered weights)")
        present.add(src)
    if not expected <= present:
        raise WeightsError(f"shard lacks {len(expected - present)} tensors of layers {start}:{end} (incomplete or tampered)")


async def fetch_shard(link, model_hash: str, start: int, end: int, dest_dir: Path,
                      progress: Callable[[int, int], None] | None = None) -> Path:
    """Download and verify layers [start, end) of ``model_hash`` from a peer; resumable."""
    _, _, manifest = await read_manifest(link, model_hash)  # a full hash: only that model's manifest passes
    size = await shard_size(link, start, end, manifest)
    dest_dir.mkdir(parents=True, exist_ok=True)
    final = dest_dir / f"{model_hash[:16]}-{start}-{end}.gguf"
    partial = final.with_suffix(".gguf.partial")
    done = partial.stat().st_size if partial.exists() else 0
    with open(partial, "ab") as f:
        while done < size:
            _, data = await _ask(link, {"op": "chunk", "start": start, "end": end, "offset": done, "length": CHUNK_BYTES})
            if not data or len(data) > CHUNK_BYTES:
                raise WeightsError("peer sent an empty or oversized chunk")
            data = data[: size - done]
            f.write(data)
            done += len(data)
            if progress:
                progress(done, size)
    try:
        await asyncio.to_thread(verify_shard, partial, manifest, model_hash, start, end)
    except Exception as exc:  # noqa: BLE001 - whatever is wrong with the file, it goes
        partial.unlink(missing_ok=True)
        raise exc if isinstance(exc, WeightsError) else WeightsError(f"downloaded shard is unusable: {exc}") from exc
    os.replace(partial, final)
    return final


async def read_manifest(link, model_hash_prefix: str) -> tuple[str, int, list[TensorEntry]]:
    """The peer's model (full content hash, n_layer, manifest), whose hash must start with
    ``model_hash_prefix`` (what its signed capability record advertises)."""
    head, body = await _ask(link, {"op": "manifest"})
    if len(body) > MAX_MANIFEST_BYTES:
        raise WeightsError("manifest too large")
    try:
        manifest = [TensorEntry(**e) for e in json.loads(body.decode("utf-8"))]
    except (ValueError, TypeError) as exc:
        raise WeightsError(f"malformed manifest: {exc}") from None
    model_hash, n_layer = _manifest_hash(manifest), head.get("n_layer") if isinstance(head, dict) else None
    if not model_hash.startswith(model_hash_prefix) or not isinstance(n_layer, int) or n_layer < 1:
        raise WeightsError(f"peer {link.peer_id[:12]} offers a manifest whose hash is not {model_hash_prefix[:16]}: "
                           "wrong or tampered model")
    return model_hash, n_layer, manifest


async def shard_size(link, start: int, end: int, manifest: list[TensorEntry]) -> int:
    """The size of the peer's shard file for [start, end), checked to be plausible."""
    head, _ = await _ask(link, {"op": "shard_info", "start": start, "end": end})
    expected = sum(e.nbytes for e in manifest) + METADATA_ALLOWANCE  # a shard is never larger than its model
    size = head.get("size") if isinstance(head, dict) else None
    if not isinstance(size, int) or not 0 < size <= expected:
        raise WeightsError(f"peer {link.peer_id[:12]} announces an implausible shard size {size!r}")
    return size


async def _ask(link, msg: dict) -> tuple[dict, bytes]:
    """A weights request: JSON header in a CONTROL frame; reply = JSON header line + raw bytes."""
    frame = Frame.from_bytes(MsgType.CONTROL, json.dumps({"weights": msg}).encode(), seq=link.next_seq())
    reply = await link.request(frame, 120.0)
    raw = bytes(reply.frame.payload)
    head, _, body = raw.partition(b"\n")
    try:
        return json.loads(head.decode("utf-8")), body
    except (ValueError, RecursionError) as exc:
        raise WeightsError(f"malformed weights reply: {exc}") from None
