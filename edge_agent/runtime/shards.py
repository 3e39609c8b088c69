"""GGUF inspection, content hashing and shard files.

A *shard* is a standalone GGUF holding only decoder layers ``[start, end)`` of a source
model, renumbered from 0, with tensor bytes copied unchanged (no requantization). It
loads in plain llama.cpp as a model with ``end - start`` layers, which is what lets a
node run a partial model with llama.cpp's own kernels.

- ``head`` shards keep the tokenizer and token embedding (tokens go in);
- ``tail`` shards keep the tokenizer, final norm and LM head (logits come out);
- ``middle`` shards carry no vocabulary: a one-row dummy embedding replaces
  ``token_embd`` so the file holds nothing but its layers (hidden states go in and out).

Hashes are over tensor *content* under the source model's tensor names, so a node that
holds the whole model can compute the hash of any shard without writing it, and two
peers can check they hold the same weights whatever file they came from.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edge_agent.runtime.engine import (
    CorruptModelError,
    ShardRangeError,
    ShardRole,
    UnsupportedModelError,
)

# Architectures whose decoder graph llama.cpp builds from per-layer tensors named
# blk.N.* with no cross-layer tensors, so a layer range is a valid model by itself.
SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3")
KEY_SOURCE_HASH = "edge_agent.source_model_hash"
KEY_RANGE = "edge_agent.layer_range"
KEY_ROLE = "edge_agent.role"
KEY_TOTAL_LAYERS = "edge_agent.source_block_count"
_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")
_GLOBAL_INPUT = ("token_embd.weight",)
_GLOBAL_OUTPUT = ("output_norm.weight", "output.weight", "output_norm.bias", "output.bias")
_GLOBAL_SHARED = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")


@dataclass
class TensorEntry:
    name: str
    type: str
    shape: list[int]
    nbytes: int
    sha256: str


@dataclass
class ModelInfo:
    path: str
    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_vocab: int
    context_length: int
    file_size: int
    tensor_types: dict[str, int]
    model_hash: str
    name: str = ""
    role: str = "full"
    layer_range: tuple[int, int] | None = None
    source_model_hash: str | None = None
    source_n_layer: int | None = None
    shard_hash: str = ""  # content hash under source tensor names (== model_hash for a full model)
    tensors: list[TensorEntry] = field(default_factory=list, repr=False)

    def to_dict(self, with_tensors: bool = False) -> dict:
        d = asdict(self)
        if not with_tensors:
            d.pop("tensors")
        return d


def _reader(path: Path):
    import gguf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as exc:  # the reader raises ValueError/IndexError/... on bad bytes
        raise CorruptModelError(f"{path}: not a valid GGUF file ({type(exc).__name__}: {exc})") from exc


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _tensor_sha(t) -> str:
    return hashlib.sha256(memoryview(np.ascontiguousarray(t.data)).cast("B")).hexdigest()


def _manifest_hash(entries: list[TensorEntry]) -> str:
    h = hashlib.sha256(b"edge-agent tensor manifest v1\n")
    for e in sorted(entries, key=lambda e: e.name):
        h.update(f"{e.name}\t{e.type}\t{','.join(map(str, e.shape))}\t{e.sha256}\n".encode())
    return h.hexdigest()


def _hash_cache_path(path: Path) -> Path:
    from edge_agent.config import data_dir

    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:32]
    return data_dir() / "hash-cache" / f"{key}.json"


def tensor_manifest(path: Path, reader=None) -> list[TensorEntry]:
    """Per-tensor content hashes, cached on disk by (path, size, mtime): hashing GBs is slow."""
    path = Path(path)
    cache = _hash_cache_path(path)
    if cache.is_file():
        try:
            return [TensorEntry(**e) for e in json.loads(cache.read_text())]
        except (ValueError, TypeError):
            pass
    reader = reader or _reader(path)
    entries = [
        TensorEntry(t.name, t.tensor_type.name, [int(x) for x in t.shape], int(t.n_bytes), _tensor_sha(t))
        for t in reader.tensors
    ]
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps([asdict(e) for e in entries]))
    except OSError:
        pass
    return entries


_INFO_CACHE: dict[tuple, ModelInfo] = {}


def inspect_model(path: Path | str, with_hash: bool = True) -> ModelInfo:
    """Read a GGUF's header: architecture, shapes, quant types, size and content hash.

    Memoized per process by (path, size, mtime): parsing a large vocabulary in Python
    takes seconds, and loading a pipeline asks about the same files many times.
    """
    path = Path(path)
    try:
        st = path.stat()
    except OSError:
        raise FileNotFoundError(f"model file not found: {path}") from None
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, with_hash)
    hit = _INFO_CACHE.get(key)
    if hit is None:
        hit = _INFO_CACHE[key] = _inspect(path, with_hash)
    return hit


def _inspect(path: Path, with_hash: bool) -> ModelInfo:
    reader = _reader(path)
    arch = _field(reader, "general.architecture")
    if not isinstance(arch, str):
        raise CorruptModelError(f"{path}: no general.architecture key")

    def arch_key(name: str, default=None):
        return _field(reader, f"{arch}.{name}", default)

    n_layer = int(arch_key("block_count", 0) or 0)
    n_embd = int(arch_key("embedding_length", 0) or 0)
    n_head = arch_key("attention.head_count", 0)
    n_head_kv = arch_key("attention.head_count_kv", n_head)
    n_ff = arch_key("feed_forward_length", 0)
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    n_vocab = int(arch_key("vocab_size", 0) or (len(tokens.data) if tokens is not None else 0))
    types: dict[str, int] = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    entries = tensor_manifest(path, reader) if with_hash else []
    rng = _field(reader, KEY_RANGE)
    model_hash = _manifest_hash(entries) if with_hash else ""
    return ModelInfo(
        path=str(path),
        arch=arch,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=int(n_head if not isinstance(n_head, list) else max(n_head)),
        n_head_kv=int(n_head_kv if not isinstance(n_head_kv, list) else max(n_head_kv)),
        n_ff=int(n_ff if not isinstance(n_ff, list) else max(n_ff)),
        n_vocab=n_vocab,
        context_length=int(arch_key("context_length", 0) or 0),
        file_size=path.stat().st_size,
        tensor_types=types,
        model_hash=model_hash,
        name=str(_field(reader, "general.name", "") or ""),
        role=str(_field(reader, KEY_ROLE, "full")),
        layer_range=tuple(rng) if rng else None,
        source_model_hash=_field(reader, KEY_SOURCE_HASH),
        source_n_layer=_field(reader, KEY_TOTAL_LAYERS),
        shard_hash=_source_named_hash(entries, rng) if (with_hash and rng) else model_hash,
        tensors=entries,
    )


def _source_named_hash(entries: list[TensorEntry], rng) -> str:
    """Hash a shard file's tensors under the source model's names, so it equals shard_hash()."""
    start = int(rng[0])
    mapped = []
    for e in entries:
        m = _BLOCK.match(e.name)
        if m:
            mapped.append(TensorEntry(f"blk.{int(m.group(1)) + start}.{m.group(2)}", e.type, e.shape, e.nbytes, e.sha256))
        elif not (e.name == "token_embd.weight" and e.shape[-1] == 1):  # middle shards' dummy
            mapped.append(e)
    return _manifest_hash(mapped)


def role_for(start: int, end: int, n_layer: int) -> ShardRole:
    if start == 0 and end == n_layer:
        return "full"
    if start == 0:
        return "head"
    if end == n_layer:
        return "tail"
    return "middle"


def validate_range(start: int, end: int, n_layer: int) -> None:
    """Check before loading: llama.cpp aborts the whole process on a 0-layer model."""
    if not (isinstance(start, int) and isinstance(end, int)):
        raise ShardRangeError(f"layer range must be integers, got {start!r}:{end!r}")
    if start >= end:
        raise ShardRangeError(f"empty layer range {start}:{end} (need start < end)")
    if start < 0 or end > n_layer:
        raise ShardRangeError(f"layer range {start}:{end} is outside the model's layers 0:{n_layer}")


def parse_range(text: str) -> tuple[int, int]:
    """'A:B' -> (A, B); clear error for anything else."""
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", text or "")
    if not m:
        raise ShardRangeError(f"bad layer range {text!r}: expected A:B, e.g. 4:12")
    return int(m.group(1)), int(m.group(2))


def _shard_tensor_names(reader, start: int, end: int, role: ShardRole) -> list[tuple[str, str]]:
    """(source name, shard name) of every tensor the shard keeps, in file order."""
    names: list[tuple[str, str]] = []
    for t in reader.tensors:
        m = _BLOCK.match(t.name)
        if m:
            layer = int(m.group(1))
            if start <= layer < end:
                names.append((t.name, f"blk.{layer - start}.{m.group(2)}"))
        elif t.name in _GLOBAL_SHARED:
            names.append((t.name, t.name))
        elif t.name in _GLOBAL_INPUT:
            # llama.cpp requires token_embd in every model with a vocabulary; in a tail it
            # is the LM head when tied, else it stays mmapped and untouched (costs no RSS)
            if role in ("head", "full", "tail"):
                names.append((t.name, t.name))
        elif t.name in _GLOBAL_OUTPUT:
            # llama.cpp requires output_norm in every model; the LM head only in the tail
            if t.name.startswith("output_norm") or role in ("tail", "full"):
                names.append((t.name, t.name))
        else:
            raise UnsupportedModelError(f"tensor {t.name!r} is not per-layer nor a known global tensor")
    return names


def shard_hash(model_path: Path | str, start: int, end: int) -> str:
    """Content hash of layers [start, end) (+ the globals the shard's role keeps)."""
    model_path = Path(model_path)
    reader = _reader(model_path)
    info = inspect_model(model_path)
    validate_range(start, end, info.n_layer)
    role = role_for(start, end, info.n_layer)
    keep = {src for src, _ in _shard_tensor_names(reader, start, end, role)}
    return _manifest_hash([e for e in info.tensors if e.name in keep])


def write_shard(
    model_path: Path | str, out_path: Path | str, start: int, end: int, role: ShardRole | None = None
) -> ModelInfo:
    """Write layers [start, end) of a model as a standalone GGUF; returns the shard's info."""
    import gguf

    model_path, out_path = Path(model_path), Path(out_path)
    info = inspect_model(model_path)
    if info.arch not in SUPPORTED_ARCHS:
        raise UnsupportedModelError(
            f"architecture {info.arch!r} is not supported for layer shards (supported: {', '.join(SUPPORTED_ARCHS)})"
        )
    if info.role != "full":
        raise UnsupportedModelError(f"{model_path} is already a shard ({info.role}); split the source model")
    validate_range(start, end, info.n_layer)
    role = role or role_for(start, end, info.n_layer)
    reader = _reader(model_path)
    if _field(reader, f"{info.arch}.embedding_scale") and role in ("middle", "tail"):
        # llama.cpp scales embd inputs too for such models: hidden states fed in would be rescaled
        raise UnsupportedModelError(f"{model_path}: models with an embedding scale cannot be split mid-model")
    arch = info.arch
    n_layer_new = end - start

    tmp = out_path.with_suffix(f"{out_path.suffix}.{os.getpid()}.{os.urandom(4).hex()}.partial")  # concurrent writers
    out_path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(tmp), arch)
    vocabless = role == "middle"
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        if vocabless and key.startswith("tokenizer."):
            continue
        if vocabless and key == f"{arch}.vocab_size":
            continue
        vtype = f.types[0]
        value = f.contents()
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        if key == f"{arch}.block_count":
            value = n_layer_new
        elif sub is not None and key.startswith(f"{arch}.") and isinstance(value, list) and len(value) == info.n_layer:
            value = value[start:end]  # per-layer hyperparameter arrays
        writer.add_key_value(key, value, vtype, sub_type=sub)
    if vocabless:
        writer.add_string("tokenizer.ggml.model", "none")
        writer.add_uint32(f"{arch}.vocab_size", 1)
    writer.add_string(KEY_SOURCE_HASH, info.model_hash)
    writer.add_array(KEY_RANGE, [start, end])
    writer.add_string(KEY_ROLE, role)
    writer.add_uint32(KEY_TOTAL_LAYERS, info.n_layer)

    by_name = {t.name: t for t in reader.tensors}
    for src, dst in _shard_tensor_names(reader, start, end, role):
        t = by_name[src]
        writer.add_tensor(dst, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    if vocabless:
        writer.add_tensor("token_embd.weight", np.zeros((1, info.n_embd), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, out_path)
    return inspect_model(out_path)


def ensure_shard(model_path: Path | str, start: int, end: int, cache_dir: Path | str) -> Path:
    """Return a cached shard file for [start, end), writing it on first use (content-addressed)."""
    model_path = Path(model_path)
    info = inspect_model(model_path)
    validate_range(start, end, info.n_layer)
    if start == 0 and end == info.n_layer:
        return model_path
    out = Path(cache_dir) / f"{info.model_hash[:16]}-{start}-{end}.gguf"
    if not out.is_file():
        write_shard(model_path, out, start, end)
    return out
