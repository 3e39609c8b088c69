"""The ONNX Runtime engine: the same shard contract as ``LlamaCppEngine``, on ONNX Runtime.

For devices without a (fast) llama.cpp build (ONNX Runtime Mobile, NPU execution
providers) and as an independent second runtime for redundancy checks. The graph of a
layer range is built from the GGUF tensors (``onnx_graph``, weights mapped exactly by
``onnx_weights``) and cached on disk under ``<cache_dir>/onnx/<key>/``, the key being the
shard's content hash plus every option that changes the graph.

State: per request, the past K/V of each layer as numpy arrays (fed to the graph as
``past_*`` and replaced by its ``present_*`` outputs), so requests never share a cache and
``truncate`` is a slice. Requests run one after another (their past lengths differ).
Results agree with llama.cpp within a tolerance (docs/onnx.md), not bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import onnxruntime as ort

from edge_agent.runtime.engine import (
    CapacityError,
    CorruptModelError,
    EngineError,
    EngineOptions,
    ShardInfo,
    StepInput,
    StepOutput,
    UnsupportedModelError,
    default_threads,
    forward_speculative,
    validate_batch,
    validate_step,
)
from edge_agent.runtime.onnx_graph import GRAPH_VERSION, GraphSpec, build_model, rope_tables
from edge_agent.runtime.shards import (
    KEY_ROLE,
    _field,
    _manifest_hash,
    _reader,
    _shard_tensor_names,
    role_for,
    tensor_manifest,
    validate_range,
)

ONNX_ARCHS = ("llama",)


class _Meta:
    """The header fields the engine needs (what ``shards.inspect_model`` reads, without a second parse)."""

    def __init__(self, reader):
        self.arch = str(_field(reader, "general.architecture", ""))
        key = lambda name, default=0: _field(reader, f"{self.arch}.{name}", default)  # noqa: E731
        first = lambda v: int(max(v) if isinstance(v, list) else v)  # noqa: E731
        self.n_layer = int(key("block_count"))
        self.n_embd = int(key("embedding_length"))
        self.n_head = first(key("attention.head_count"))
        self.n_head_kv = first(key("attention.head_count_kv", self.n_head))
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        self.n_vocab = int(key("vocab_size") or (len(tokens.data) if tokens is not None else 0))
        self.role = str(_field(reader, KEY_ROLE, "full"))
        if self.n_layer < 1 or self.n_embd < 1 or self.n_head < 1:
            raise CorruptModelError("GGUF header lacks block_count, embedding_length or head_count")


def _graph_spec(reader, meta: _Meta, start: int, end: int, role: str, o: EngineOptions) -> tuple[GraphSpec, float, float]:
    """The graph's shape and arithmetic settings from the GGUF header, plus RoPE base and scale."""
    arch = meta.arch
    head_dim = int(_field(reader, f"{arch}.attention.key_length", 0) or meta.n_embd // meta.n_head)
    spec = GraphSpec(
        start=start, end=end, role=role, n_embd=meta.n_embd, n_head=meta.n_head, n_head_kv=meta.n_head_kv,
        head_dim=head_dim, n_rot=int(_field(reader, f"{arch}.rope.dimension_count", head_dim)),
        eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        kv_f16=o.kv_type != "f32", accuracy_level=int(o.extra.get("onnx_accuracy_level", 4)),
    )  # fmt: skip
    scaling = _field(reader, f"{arch}.rope.scaling.type")
    if scaling not in (None, "none", "linear"):
        raise UnsupportedModelError(f"rope scaling {scaling!r} is not supported by the ONNX backend")
    factor = float(_field(reader, f"{arch}.rope.scaling.factor", 1.0) or 1.0)
    freq_scale = 1.0 / factor if scaling == "linear" else 1.0
    return spec, float(_field(reader, f"{arch}.rope.freq_base", 10000.0)), freq_scale


class _RequestCache:
    __slots__ = ("k", "v", "pos")

    def __init__(self, k: list[np.ndarray], v: list[np.ndarray]):
        self.k, self.v, self.pos = k, v, 0


class OnnxEngine:
    """Layers [start, end) of a GGUF llama model on ONNX Runtime (see ``runtime.engine.Engine``)."""

    backend = "onnx"

    def __init__(
        self, model_path: Path | str, start: int, end: int, options: EngineOptions | None = None, cache_dir: Path | str | None = None
    ):
        from edge_agent.config import shard_cache_dir

        self.options = o = options or EngineOptions()
        self.model_path = Path(model_path)
        reader = _reader(self.model_path)  # parsed once: a big vocabulary takes seconds to parse
        meta = _Meta(reader)
        if meta.role != "full":
            raise UnsupportedModelError(f"{model_path} is a {meta.role} shard; give the ONNX backend the source model")
        if meta.arch not in ONNX_ARCHS:
            raise UnsupportedModelError(f"architecture {meta.arch!r} is not supported by the ONNX backend (supported: {', '.join(ONNX_ARCHS)})")
        validate_range(start, end, meta.n_layer)
        role = role_for(start, end, meta.n_layer)
        self.spec, self.freq_base, self.freq_scale = _graph_spec(reader, meta, start, end, role, o)
        # the same content hashes as shards.inspect_model / shards.shard_hash, from one parse
        entries = tensor_manifest(self.model_path, reader)
        keep = {src for src, _ in _shard_tensor_names(reader, start, end, role)}
        self.info = ShardInfo(
            model_hash=_manifest_hash(entries),
            shard_hash=_manifest_hash([e for e in entries if e.name in keep]),
            start=start, end=end, n_layer_total=meta.n_layer, n_embd=meta.n_embd,
            n_vocab=0 if role == "middle" else meta.n_vocab, role=role, arch=meta.arch,
        )  # fmt: skip
        self._n_vocab = meta.n_vocab
        self._kv_dtype = np.float16 if self.spec.kv_f16 else np.float32
        self._open_session(reader, Path(cache_dir) if cache_dir else shard_cache_dir())
        del reader
        self.batches_requests = False  # requests run one after another (their past lengths differ)
        self._out_names = [x.name for x in self._session.get_outputs()]
        self._lock = threading.Lock()
        self._requests: dict[str, _RequestCache] = {}

    @classmethod
    def from_model(
        cls, model_path: Path | str, start: int, end: int, options: EngineOptions | None = None, cache_dir: Path | str | None = None
    ) -> "OnnxEngine":
        """Load layers [start, end) of a whole model (same signature as ``LlamaCppEngine.from_model``)."""
        return cls(model_path, start, end, options, cache_dir)

    # -- graph cache -----------------------------------------------------------------------
    def _open_session(self, reader, cache: Path) -> None:
        o = self.options
        so = ort.SessionOptions()
        so.intra_op_num_threads = o.n_threads or default_threads()
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        providers = o.extra.get("onnx_providers", ["CPUExecutionProvider"])
        for attempt in (0, 1):  # a damaged cache entry (e.g. a deleted weights.bin) is rebuilt once
            self.graph_path = self._ensure_graph(reader, cache)
            try:
                self._session = ort.InferenceSession(str(self.graph_path), so, providers=providers)
                return
            except Exception as exc:  # ORT raises its own exception types for bad graphs
                if attempt:
                    raise EngineError(f"ONNX Runtime could not load {self.graph_path}: {exc}") from exc
                shutil.rmtree(self.graph_path.parent, ignore_errors=True)

    def cache_key(self) -> str:
        blob = json.dumps({"v": GRAPH_VERSION, "shard": self.info.shard_hash, "spec": self.spec.__dict__}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    def _ensure_graph(self, reader, cache_dir: Path) -> Path:
        """Build (once) and return the cached model file; written to a temp dir, then renamed."""
        import onnx

        final = cache_dir / "onnx" / self.cache_key()
        path = final / "model.onnx"
        if path.is_file():
            return path
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=final.parent))
        try:
            model = build_model(reader, self.spec)
            onnx.save_model(model, str(tmp / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                            location="weights.bin", size_threshold=1024)  # fmt: skip
            try:
                os.rename(tmp, final)
            except OSError:  # another process built it first
                if not path.is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return path

    # -- Engine interface ------------------------------------------------------------------
    def positions(self, request_id: str) -> int:
        r = self._requests.get(request_id)
        return 0 if r is None else r.pos

    def check(self, step: StepInput) -> None:
        """Validate one step without touching state (same errors as ``LlamaCppEngine.check``)."""
        req = self._requests.get(step.request_id)
        validate_step(step, self.info, self.options, takes_tokens=self.spec.takes_tokens, n_vocab=self._n_vocab,
                      held=None if req is None else req.pos,
                      has_free_slot=req is not None or len(self._requests) < self.options.max_requests)

    def forward(self, steps: Sequence[StepInput]) -> list[StepOutput]:
        if not steps:
            return []
        with self._lock:  # drafts one row at a time: no multi-row exactness measured here
            return forward_speculative(steps, self.check, self.positions, self._truncate, self._rollback, self._forward, 1)

    def _rollback(self, steps: Sequence[StepInput]) -> None:
        for s in steps:
            if s.pos == 0:
                self._requests.pop(s.request_id, None)
            else:
                self._truncate(s.request_id, s.pos)

    def _forward(self, steps: Sequence[StepInput]) -> list[StepOutput]:
        validate_batch(steps, self.check)
        if len([s for s in steps if s.request_id not in self._requests]) + len(self._requests) > self.options.max_requests:
            raise CapacityError(f"all {self.options.max_requests} request slots are busy")
        t0 = time.perf_counter()
        results = [self._run_step(s) for s in steps]  # (output, new state); committed only if all succeed
        for s, (_, state) in zip(steps, results):
            self._requests[s.request_id] = state
        ms = (time.perf_counter() - t0) * 1000.0
        return [StepOutput(s.request_id, out, ms) for s, (out, _) in zip(steps, results)]

    def end_request(self, request_id: str) -> None:
        with self._lock:
            self._requests.pop(request_id, None)

    def truncate(self, request_id: str, n_positions: int) -> None:
        with self._lock:
            self._truncate(request_id, n_positions)

    def _truncate(self, request_id: str, n_positions: int) -> None:
        r = self._requests.get(request_id)
        if r is not None and 0 <= n_positions < r.pos:
            r.k = [k[:, :n_positions].copy() for k in r.k]
            r.v = [v[:, :n_positions].copy() for v in r.v]
            r.pos = n_positions

    def requests(self) -> list[str]:
        return list(self._requests)

    def close(self) -> None:
        self._requests.clear()
        self._session = None

    # -- decoding --------------------------------------------------------------------------
    def _run_step(self, step: StepInput) -> tuple[np.ndarray, _RequestCache]:
        """Run one request's rows in n_batch chunks; returns the output and its new state."""
        s = self.spec
        old = self._requests.get(step.request_id)
        if old is None:
            empty = np.zeros((s.n_head_kv, 0, s.head_dim), dtype=self._kv_dtype)
            old = _RequestCache([empty] * (s.end - s.start), [empty] * (s.end - s.start))
        state = _RequestCache(list(old.k), list(old.v))
        state.pos = old.pos
        outs = []
        n_batch = max(1, self.options.n_batch)
        for c0 in range(0, step.data.shape[0], n_batch):
            outs.append(self._run_chunk(state, step.data[c0 : c0 + n_batch]))
        if self.spec.gives_logits:
            logits = np.concatenate(outs)
            return (logits if step.all_logits else logits[-1]), state
        return np.concatenate(outs), state

    def _run_chunk(self, state: _RequestCache, data: np.ndarray) -> np.ndarray:
        n, past = data.shape[0], state.pos
        pos = np.arange(past, past + n)
        cos, sin = rope_tables(pos, self.spec.n_rot, self.freq_base, self.freq_scale)
        mask = np.where(np.arange(past + n)[None, :] <= pos[:, None], np.float32(0), np.float32(-np.inf)).astype(np.float32)
        feed = {"rope_cos": cos, "rope_sin": sin, "mask": mask}
        if self.spec.takes_tokens:
            feed["tokens"] = data.astype(np.int64)
        else:
            feed["hidden"] = np.ascontiguousarray(data, dtype=np.float32)
        for i in range(len(state.k)):
            feed[f"past_k.{i}"] = state.k[i]
            feed[f"past_v.{i}"] = state.v[i]
        try:
            res = self._session.run(None, feed)
        except Exception as exc:  # an ORT failure leaves the request's state untouched
            raise EngineError(f"ONNX Runtime failed on shard {self.info.start}:{self.info.end}: {exc}") from exc
        named = dict(zip(self._out_names, res))
        for i in range(len(state.k)):
            state.k[i] = named[f"present_k.{i}"]
            state.v[i] = named[f"present_v.{i}"]
        state.pos = past + n
        return named["logits" if self.spec.gives_logits else "hidden_out"]
