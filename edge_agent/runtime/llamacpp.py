"""The llama.cpp engine: one shard GGUF, many requests, each with its own KV cache.

How a partial model runs on llama.cpp's own kernels:
- the shard file *is* a small llama model (layers renumbered from 0, see ``shards``);
- hidden states go in through ``llama_batch.embd`` (head shards take token ids);
- the residual stream after the shard's last layer is the graph node ``l_out-{n-1}``;
  a graph-eval callback (in C where it can be built, see ``capture``) copies it out and
  stops the graph there, so the final norm and LM head never run on head/middle shards;
- one context with ``n_seq_max`` sequences and a non-unified KV cache gives every
  request its own cache stream starting at cell 0, exactly as a lone request has, which
  keeps attention arithmetic bit-identical to a single-request run.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from pathlib import Path
from typing import Sequence

import llama_cpp as lc
import numpy as np

from edge_agent.runtime.capture import make_capture
from edge_agent.runtime.engine import (
    CapacityError,
    EngineError,
    EngineOptions,
    InputShapeError,
    ShardInfo,
    StepInput,
    StepOutput,
    UnsupportedModelError,
    default_threads,
    forward_speculative,
    validate_batch,
    validate_step,
)
from edge_agent.runtime.exactness import exact_rows
from edge_agent.runtime.shards import SUPPORTED_ARCHS, ensure_shard, inspect_model

_KV_TYPES = {"f16": lc.GGML_TYPE_F16, "f32": lc.GGML_TYPE_F32, "q8_0": lc.GGML_TYPE_Q8_0}
_backend_lock = threading.Lock()
_backend_ready = False


def init_backend() -> None:
    """llama.cpp's global init, once per process; silences its per-load logging."""
    global _backend_ready
    with _backend_lock:
        if not _backend_ready:
            lc.llama_backend_init()
            _silence_logs()
            _backend_ready = True


_log_cb = None


def _silence_logs() -> None:
    global _log_cb
    if os.environ.get("EDGE_AGENT_LLAMA_LOG"):
        return

    @lc.llama_log_callback
    def _quiet(level, text, user_data):  # pragma: no cover - C callback
        return None

    _log_cb = _quiet
    lc.llama_log_set(_log_cb, ctypes.c_void_p(0))


def release_file_pages(path: Path) -> int:
    """Drop this process's resident pages of a mmapped model file; returns bytes advised.

    llama.cpp maps the whole file with MAP_POPULATE and then copies most CPU weights into
    repacked buffers, so without this a shard costs its file size twice in RSS. The map
    is shared and read-only: pages still in use (tensors that were not repacked) fault
    back in from the page cache on first touch, and nothing can be lost.
    """
    import sys

    if not sys.platform.startswith("linux"):
        return 0
    target = str(Path(path).resolve())
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madv_dontneed = 4
    total = 0
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].strip() == target and parts[1].startswith("r"):
                    lo, hi = (int(x, 16) for x in parts[0].split("-"))
                    if libc.madvise(lo, hi - lo, madv_dontneed) == 0:
                        total += hi - lo
    except OSError:
        return 0
    return total


class LlamaCppEngine:
    """A loaded shard (see ``runtime.engine.Engine``)."""

    backend = "llamacpp"

    def __init__(self, shard_path: Path | str, options: EngineOptions | None = None):
        init_backend()
        self.options = options or EngineOptions()
        meta = inspect_model(shard_path)
        if meta.arch not in SUPPORTED_ARCHS:
            raise UnsupportedModelError(f"architecture {meta.arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHS)})")
        if meta.n_layer < 1:
            raise UnsupportedModelError(f"{shard_path}: a model needs at least one layer")
        start, end = meta.layer_range or (0, meta.n_layer)
        total = meta.source_n_layer or meta.n_layer
        self.info = ShardInfo(
            model_hash=meta.source_model_hash or meta.model_hash,
            shard_hash=meta.shard_hash,
            start=int(start),
            end=int(end),
            n_layer_total=int(total),
            n_embd=meta.n_embd,
            n_vocab=0 if meta.role == "middle" else meta.n_vocab,
            role=meta.role,  # type: ignore[arg-type]
            arch=meta.arch,
        )
        self.path = Path(shard_path)
        self._lock = threading.Lock()
        self._slots: dict[str, int] = {}
        self._positions: dict[int, int] = {}
        self._free = list(range(self.options.max_requests))[::-1]
        float_weights = any(t.name.startswith("blk.") and len(t.shape) == 2 and t.type in ("F32", "F16", "BF16") for t in meta.tensors)
        self._load(f"l_out-{meta.n_layer - 1}")
        mode = self.options.batch_decode
        # Rows per llama_decode that are bit-identical to single rows: ``batch_rows`` for one
        # row of each of several requests, ``draft_rows`` for several rows of one request
        # (speculative drafts). Kernels decide it, per weight type and row count (on AVX-512,
        # Q4_K matmuls change path at 4 rows, Q6_K at 8; plain attention at 2): measured here.
        if mode == "off" or (mode == "auto" and float_weights):
            self.batch_rows = self.draft_rows = 1
        elif mode == "on":
            self.batch_rows = self.options.n_batch
            self.draft_rows = self.options.n_batch if self.options.flash_attn else 1  # plain attention: inexact from 2 rows
        else:
            try:
                self.batch_rows, self.draft_rows = exact_rows(self)
            except Exception:
                self.close()
                raise
        self.batches_requests = self.batch_rows > 1

    @classmethod
    def from_model(
        cls, model_path: Path | str, start: int, end: int, options: EngineOptions | None = None, cache_dir: Path | str | None = None
    ) -> "LlamaCppEngine":
        """Load layers [start, end) of a whole model, writing (or reusing) the shard file."""
        from edge_agent.config import shard_cache_dir

        return cls(ensure_shard(model_path, start, end, cache_dir or shard_cache_dir()), options)

    # -- setup -----------------------------------------------------------------------------
    def _load(self, capture_node: str) -> None:
        o = self.options
        mparams = lc.llama_model_default_params()
        mparams.n_gpu_layers = o.gpu_layers
        self._model = lc.llama_model_load_from_file(str(self.path).encode(), mparams)
        if not self._model:
            raise EngineError(f"llama.cpp could not load {self.path}")
        release_file_pages(self.path)
        cparams = lc.llama_context_default_params()
        cparams.n_seq_max = o.max_requests
        cparams.n_ctx = o.n_ctx_per_request * o.max_requests
        cparams.kv_unified = False
        cparams.n_batch = o.n_batch
        cparams.n_ubatch = min(o.n_batch, o.n_ubatch)
        threads = o.n_threads or default_threads()
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        cparams.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_ENABLED if o.flash_attn else lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
        cparams.type_k = _KV_TYPES[o.kv_type]
        cparams.type_v = _KV_TYPES[o.kv_type]
        cparams.no_perf = True
        self._produces_hidden = self.info.role in ("head", "middle")
        if self._produces_hidden:
            # Sized for the most rows one llama_decode call gets (one n_batch chunk).
            self.capture = make_capture(capture_node, o.n_batch, self.info.n_embd)
            cparams.cb_eval = self.capture.callback
            cparams.cb_eval_user_data = self.capture.user_data
        self._ctx = lc.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            lc.llama_model_free(self._model)
            raise CapacityError(f"llama.cpp could not create a context for {self.path} (out of memory?)")
        self._mem = lc.llama_get_memory(self._ctx)
        self._takes_tokens = self.info.role in ("head", "full")
        embd = 0 if self._takes_tokens else self.info.n_embd
        self._batch = lc.llama_batch_init(o.n_batch, embd, 1)
        self._n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self._model))

    # -- Engine interface ------------------------------------------------------------------
    def positions(self, request_id: str) -> int:
        slot = self._slots.get(request_id)
        return 0 if slot is None else self._positions[slot]

    def check(self, step: StepInput) -> None:
        """Validate one step without touching state (a hop server filters bad frames with it)."""
        slot = self._slots.get(step.request_id)
        validate_step(step, self.info, self.options, takes_tokens=self._takes_tokens, n_vocab=self._n_vocab,
                      held=None if slot is None else self._positions[slot], has_free_slot=slot is not None or bool(self._free))

    def forward(self, steps: Sequence[StepInput]) -> list[StepOutput]:
        if not steps:
            return []
        with self._lock:
            return forward_speculative(steps, self.check, self.positions, self._truncate, self._rollback, self._forward,
                                       self.draft_rows)

    def _forward(self, steps: Sequence[StepInput]) -> list[StepOutput]:
        validate_batch(steps, self.check)
        new = [s for s in steps if s.request_id not in self._slots]
        if len(new) > len(self._free):
            raise CapacityError(f"all {self.options.max_requests} request slots are busy")
        for s in new:
            slot = self._free.pop()
            self._slots[s.request_id] = slot
            self._positions[slot] = 0
        t0 = time.perf_counter()
        outputs = self._run(steps)
        ms = (time.perf_counter() - t0) * 1000.0
        return [StepOutput(s.request_id, out, ms) for s, out in zip(steps, outputs)]

    def end_request(self, request_id: str) -> None:
        with self._lock:
            slot = self._slots.pop(request_id, None)
            if slot is not None:
                lc.llama_memory_seq_rm(self._mem, slot, -1, -1)
                self._positions.pop(slot, None)
                self._free.append(slot)

    def truncate(self, request_id: str, n_positions: int) -> None:
        with self._lock:
            self._truncate(request_id, n_positions)

    def _truncate(self, request_id: str, n_positions: int) -> None:
        slot = self._slots.get(request_id)
        if slot is not None and n_positions < self._positions[slot]:
            lc.llama_memory_seq_rm(self._mem, slot, n_positions, -1)
            self._positions[slot] = n_positions

    def requests(self) -> list[str]:
        return list(self._slots)

    def close(self) -> None:
        if getattr(self, "_ctx", None):
            lc.llama_batch_free(self._batch)
            lc.llama_free(self._ctx)
            lc.llama_model_free(self._model)
            self._ctx = None

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    # -- decoding --------------------------------------------------------------------------
    def _run(self, steps: Sequence[StepInput]) -> list[np.ndarray]:
        """Batch one-row steps (decode) into llama_decode calls of at most ``batch_rows``; run
        longer steps (prefill, drafts) alone.

        llama.cpp splits a multi-sequence batch into micro-batches of consecutive sequence
        ids, so captured rows come back grouped by slot: one-row steps sorted by slot keep
        that order equal to ours. Prefill runs alone, in the same n_batch chunks llama.cpp
        alone would use, which keeps its arithmetic identical.
        """
        out: list[np.ndarray | None] = [None] * len(steps)
        singles = sorted((i for i, s in enumerate(steps) if s.data.shape[0] == 1), key=lambda i: self._slots[steps[i].request_id])
        groups = [singles[g : g + self.batch_rows] for g in range(0, len(singles), self.batch_rows)]
        groups += [[i] for i, s in enumerate(steps) if s.data.shape[0] > 1]
        for group in groups:
            for i, arr in zip(group, self._run_group([steps[i] for i in group])):
                out[i] = arr
        return out  # type: ignore[return-value]

    def _run_group(self, steps: Sequence[StepInput]) -> list[np.ndarray]:
        rows = [(si, r) for si, s in enumerate(steps) for r in range(s.data.shape[0])]
        hidden: list[list[np.ndarray]] = [[] for _ in steps]
        logits: list[list[np.ndarray]] = [[] for _ in steps]
        n_batch = self.options.n_batch
        for c0 in range(0, len(rows), n_batch):
            chunk = rows[c0 : c0 + n_batch]
            self._fill_batch(steps, chunk)
            if self._produces_hidden:
                self.capture.reset()
            rc = lc.llama_decode(self._ctx, self._batch)
            if rc != 0:
                self._rollback(steps)
                if rc == 1:
                    raise CapacityError("llama.cpp found no KV cache slot for this batch")
                raise EngineError(f"llama_decode failed with code {rc}")
            for si, _ in chunk:
                self._positions[self._slots[steps[si].request_id]] += 1
            if self._produces_hidden:
                block = self.capture.take()  # every micro-batch's rows, in order
                if block is None or block.size != len(chunk) * self.info.n_embd:
                    self._rollback(steps)
                    got = "too many" if block is None else block.size
                    raise EngineError(f"captured {got} values for {len(chunk)} rows: the last layer output was not captured")
                block = block.reshape(len(chunk), self.info.n_embd)
                for i, (si, _) in enumerate(chunk):
                    hidden[si].append(block[i])
            else:
                self._collect_logits(steps, chunk, logits)
        if self._produces_hidden:
            return [np.stack(h) for h in hidden]
        return [np.stack(lg) if steps[i].all_logits else lg[-1] for i, lg in enumerate(logits)]

    def _wants_output(self, step: StepInput, row: int) -> bool:
        # Hidden-state shards need every row; the tail marks only what llama.cpp alone
        # would (the last row), since the model's last layer computes only output rows.
        return self._produces_hidden or step.all_logits or row == step.data.shape[0] - 1

    def _fill_batch(self, steps: Sequence[StepInput], chunk: list[tuple[int, int]]) -> None:
        b = self._batch
        b.n_tokens = len(chunk)
        n_embd = self.info.n_embd
        for i, (si, r) in enumerate(chunk):
            s = steps[si]
            if self._takes_tokens:
                b.token[i] = int(s.data[r])
            b.pos[i] = s.pos + r
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = self._slots[s.request_id]
            b.logits[i] = self._wants_output(s, r)
        if not self._takes_tokens:
            block = np.ascontiguousarray(np.concatenate([steps[si].data[r : r + 1] for si, r in chunk]), dtype=np.float32)
            if block.shape != (len(chunk), n_embd):  # never copy past the batch's buffer
                raise InputShapeError(f"hidden block {block.shape} does not fit the batch ({len(chunk)}, {n_embd})")
            ctypes.memmove(b.embd, block.ctypes.data, block.nbytes)

    def _collect_logits(self, steps, chunk, logits) -> None:
        for i, (si, r) in enumerate(chunk):
            if self._wants_output(steps[si], r):
                ptr = lc.llama_get_logits_ith(self._ctx, i)  # i: the row's index in the batch
                logits[si].append(np.ctypeslib.as_array(ptr, shape=(self._n_vocab,)).copy())

    def _rollback(self, steps) -> None:
        """A failed decode leaves no partial state: drop what this call added (requests it
        never reached, or already rolled back, are skipped)."""
        for s in steps:
            slot = self._slots.get(s.request_id)
            if slot is None:
                continue
            lc.llama_memory_seq_rm(self._mem, slot, s.pos, -1)
            self._positions[slot] = s.pos
            if s.pos == 0:
                self._slots.pop(s.request_id)
                self._positions.pop(slot, None)
                self._free.append(slot)
