"""The small interface every runtime backend implements (llama.cpp, ONNX Runtime).

A backend runs one *shard*: the decoder layers ``[start, end)`` of a model, for many
requests at once, each request with its own KV cache. Three shard roles exist:

- ``head``: token ids in (token embedding + first layers), hidden states out;
- ``middle``: hidden states in, hidden states out;
- ``tail``: hidden states in (last layers + final norm + LM head), logits out.

Hidden states are the *pre-norm residual stream* (the ``l_out`` of the last layer run),
float32, shape ``(n_tokens, n_embd)``. The engine never knows about peers or the
network: it is fed arrays and returns arrays. Calls are synchronous (CPU-bound work);
the agent runs them in a worker thread so its event loop stays free.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal, Protocol, Sequence, runtime_checkable

import numpy as np

ShardRole = Literal["head", "middle", "tail", "full"]


class EngineError(Exception):
    """Base class of every error an engine raises for bad input. Never a crash."""


class ShardRangeError(EngineError):
    """The layer range is empty, reversed or outside the model."""


class UnsupportedModelError(EngineError):
    """The model's architecture or tensor layout is not one the runtime handles."""


class CorruptModelError(EngineError):
    """The GGUF file is truncated or malformed."""


class InputShapeError(EngineError):
    """Hidden states or token ids do not have the shape/dtype this shard expects."""


class UnknownRequestError(EngineError):
    """A request id that this engine holds no state for (never started, ended or evicted)."""


class PositionError(EngineError):
    """The positions fed do not continue the request's KV cache (gap, overlap or reorder)."""


class CapacityError(EngineError):
    """No free KV-cache slot or context space for this request."""


class ContextFullError(CapacityError):
    """The request has more positions than a request's context holds (no other node helps)."""


@dataclass(frozen=True)
class ShardInfo:
    """What a loaded shard is; peers compare ``model_hash`` and ``shard_hash``."""

    model_hash: str  # sha256 of the source model's tensor content (see runtime.shards)
    shard_hash: str  # sha256 of this shard's tensor content
    start: int  # first decoder layer, in the source model's numbering
    end: int  # one past the last decoder layer
    n_layer_total: int  # decoder layers in the source model
    n_embd: int
    n_vocab: int  # 0 for middle shards (they carry no vocabulary)
    role: ShardRole
    arch: str = "llama"

    @property
    def n_layers(self) -> int:
        return self.end - self.start


@dataclass
class StepInput:
    """One request's slice of a forward call.

    ``data`` is int32 token ids of shape ``(n,)`` for a head shard, otherwise float32
    hidden states of shape ``(n, n_embd)``. ``pos`` is the position of the first row;
    it must equal the number of positions already in the request's KV cache.
    ``all_logits`` (tail only) asks for logits of every row instead of the last one.

    Speculative decoding (``runtime/drafting.py``) adds two flags. ``rewind``: positions
    ``>= pos`` that the request's cache holds are dropped first (drafts the last pass
    rejected), so ``pos`` may be below what is held. ``draft``: the rows are consecutive
    decode steps, and each row's result must be bit-identical to decoding the rows one
    at a time (what llama.cpp alone does), not to a prefill chunk.
    """

    request_id: str
    pos: int
    data: np.ndarray
    all_logits: bool = False
    rewind: bool = False
    draft: bool = False


@dataclass
class StepOutput:
    request_id: str
    data: np.ndarray  # hidden (n, n_embd) float32, or logits (n_vocab,) / (n, n_vocab) float32
    compute_ms: float = 0.0


def default_threads() -> int:
    """Compute threads when the user gives none: every core this process may run on."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


@dataclass(frozen=True)
class Arithmetic:
    """The settings that change results bit-wise: every hop of a request must run with the
    client's own, or greedy output would silently differ from llama.cpp alone.

    Nodes advertise theirs (capability record ``ar``, hop server ``info``); the client never
    routes to a node whose settings differ (``differences``)."""

    backend: str  # "llamacpp" or "onnx": other kernels, other rounding
    n_ubatch: int  # micro-batch rows: the matmul shapes of a prefill chunk
    flash_attn: bool
    kv_type: str

    def to_text(self) -> str:
        """Compact form for the capability record, e.g. ``llamacpp/512/0/f16``."""
        return f"{self.backend}/{self.n_ubatch}/{int(self.flash_attn)}/{self.kv_type}"

    @classmethod
    def from_text(cls, text: str) -> "Arithmetic":
        """Parse ``to_text``'s form (untrusted: raises ValueError on anything else)."""
        parts = text.split("/") if isinstance(text, str) and len(text) <= 64 else []
        if len(parts) != 4 or not parts[1].isdigit() or parts[2] not in ("0", "1") or not all(parts):
            raise ValueError(f"malformed arithmetic settings {str(text)[:64]!r}")
        return cls(parts[0], int(parts[1]), parts[2] == "1", parts[3])

    def describe(self) -> dict[str, str]:
        return {"backend": self.backend, "n_ubatch": str(self.n_ubatch), "flash_attn": "on" if self.flash_attn else "off",
                "kv_type": self.kv_type}

    def differences(self, theirs: "Arithmetic", whose: str = "peer") -> list[str]:
        """One line per setting that differs, naming both values (empty: compatible)."""
        mine, other = self.describe(), theirs.describe()
        return [f"{k} {other[k]} on the {whose}, {mine[k]} on this device" for k in mine if mine[k] != other[k]]


@dataclass
class EngineOptions:
    """How a shard runs. The settings that change arithmetic (``arithmetic``) must be equal
    on every node of a request and on the reference; the client routes only to nodes whose
    advertised settings equal its own."""

    n_ctx_per_request: int = 2048
    max_requests: int = 8
    n_batch: int = 512
    n_ubatch: int = 512
    n_threads: int | None = None
    flash_attn: bool = False
    kv_type: Literal["f16", "f32", "q8_0"] = "f16"
    gpu_layers: int = 0  # >0 offloads that many layers when llama.cpp has a GPU backend
    # Several requests' decode steps (or one request's drafts) in one llama_decode: "auto"
    # measures, when the engine loads, how many rows stay bit-identical to single rows
    # (runtime/exactness.py: kernels differ by weight type and row count); "off": one row
    # per decode; "on": trust every batch (tests only).
    batch_decode: Literal["auto", "on", "off"] = "auto"
    extra: dict = field(default_factory=dict)

    def arithmetic(self, backend: str) -> Arithmetic:
        """The settings that must match across nodes for token-exact output (``n_ubatch`` as
        llama.cpp applies it: never above ``n_batch``)."""
        return Arithmetic(backend, min(self.n_batch, self.n_ubatch), self.flash_attn, self.kv_type)


@runtime_checkable
class Engine(Protocol):
    """One loaded shard. Implementations: ``runtime.llamacpp.LlamaCppEngine``, ``runtime.onnx.OnnxEngine``."""

    info: ShardInfo
    options: EngineOptions
    backend: str  # "llamacpp" | "onnx" (see ``Arithmetic``)

    def forward(self, steps: Sequence[StepInput]) -> list[StepOutput]:
        """Run the shard for one or more requests, batched into one decode where possible.

        A request seen for the first time must start at ``pos == 0``. Raises an
        ``EngineError`` subclass for bad input; state of other requests is untouched.
        """
        ...

    def positions(self, request_id: str) -> int:
        """Positions held in the request's KV cache (0 for an unknown request)."""
        ...

    def end_request(self, request_id: str) -> None:
        """Free the request's KV cache. Unknown ids are ignored (ending is idempotent)."""
        ...

    def truncate(self, request_id: str, n_positions: int) -> None:
        """Drop KV entries at positions >= n_positions (used before a replay)."""
        ...

    def close(self) -> None:
        ...


def validate_step(step: StepInput, info: ShardInfo, options: EngineOptions, *, takes_tokens: bool, n_vocab: int,
                  held: int | None, has_free_slot: bool) -> None:
    """The checks every backend makes before touching state (``held``: positions cached, None if unknown)."""
    data = step.data
    if takes_tokens:
        if not isinstance(data, np.ndarray) or data.ndim != 1 or data.dtype != np.int32:
            raise InputShapeError(f"{info.role} shard takes int32 token ids of shape (n,), got "
                                  f"{getattr(data, 'dtype', type(data))} {getattr(data, 'shape', '')}")
        if data.size and (int(data.min()) < 0 or int(data.max()) >= n_vocab):
            raise InputShapeError(f"token id out of range [0, {n_vocab})")
    else:
        if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != info.n_embd or data.dtype != np.float32:
            raise InputShapeError(
                f"shard {info.start}:{info.end} takes float32 hidden states of shape (n, {info.n_embd}), "
                f"got {getattr(data, 'dtype', type(data))} {tuple(getattr(data, 'shape', ()))}"
            )
        if not np.isfinite(data).all():
            raise InputShapeError("hidden states contain NaN or Inf")
    n = data.shape[0]
    if n < 1:
        raise InputShapeError("a step needs at least one position")
    if held is None and step.pos != 0:
        raise UnknownRequestError(
            f"request {step.request_id!r} is unknown to shard {info.start}:{info.end} "
            f"(never started, ended or evicted); replay it from position 0"
        )
    held = held or 0
    if step.rewind:  # drops what it holds from pos on first
        held = min(held, step.pos)
    if step.draft and n > MAX_DRAFT_ROWS:
        raise InputShapeError(f"a draft step has at most {MAX_DRAFT_ROWS} rows, got {n}")
    if step.pos != held:
        kind = "gap" if step.pos > held else "overlap"
        raise PositionError(f"request {step.request_id!r}: position {step.pos} does not follow the {held} held ({kind})")
    if held + n > options.n_ctx_per_request:
        raise ContextFullError(f"request {step.request_id!r}: {held + n} positions exceed the context of {options.n_ctx_per_request}")
    if held == 0 and step.pos == 0 and not has_free_slot:
        raise CapacityError(f"all {options.max_requests} request slots are busy")


MAX_DRAFT_ROWS = 16  # a draft step's rows (last token + drafts): --speculate is at most 15


def forward_speculative(steps: Sequence[StepInput], check, positions, truncate, rollback, forward_once,
                        rows_per_pass: int) -> list[StepOutput]:
    """An engine's ``forward`` around its one backend call, under its lock: every step is
    validated first (a rewinding one against what it will hold), then rewinding steps drop
    their rejected drafts, then draft steps run in passes of at most ``rows_per_pass`` rows.
    A pass that fails after others ran rolls every step's request back to its ``pos``
    (``rollback``), so a bad step never leaves another request's cache advanced."""
    validate_batch(steps, check)
    for s in steps:
        if s.rewind and positions(s.request_id) > s.pos:
            truncate(s.request_id, s.pos)
    if not any(s.draft and s.data.shape[0] > rows_per_pass for s in steps):
        return forward_once(steps)
    try:
        return forward_rows(steps, forward_once, rows_per_pass)
    except EngineError:
        rollback(steps)
        raise


def forward_rows(steps: Sequence[StepInput], forward_once, per_pass: int = 1) -> list[StepOutput]:
    """Run ``draft`` steps ``per_pass`` rows at a time: pass r holds the r-th piece of every
    draft step (and, in pass 0, every other step whole), so concurrent requests still share
    each engine call. For engines whose steps of more rows are not bit-identical to single
    rows (llama.cpp's attention without flash attention, some matmuls: runtime/exactness.py)."""
    rows = [-(-s.data.shape[0] // per_pass) if s.draft else 1 for s in steps]
    parts: list[list[np.ndarray]] = [[] for _ in steps]
    ms = 0.0
    for r in range(max(rows)):
        idx = [i for i, n in enumerate(rows) if r < n]
        a = r * per_pass
        batch = [StepInput(steps[i].request_id, steps[i].pos + a, steps[i].data[a:a + per_pass], steps[i].all_logits,
                           draft=True) if steps[i].draft else steps[i] for i in idx]
        outs = forward_once(batch)
        ms += outs[0].compute_ms if outs else 0.0
        for i, out in zip(idx, outs):
            parts[i].append(out.data)
    # rows of hidden states (or of all_logits) are stacked; a tail asked for the last row's logits gets those
    return [StepOutput(s.request_id, np.concatenate(p) if p[0].ndim == 2 else p[-1], ms) for s, p in zip(steps, parts)]


def validate_batch(steps: Sequence[StepInput], check) -> None:
    """One forward call's steps: each request at most once, and every step valid (under the engine's lock)."""
    ids = [s.request_id for s in steps]
    if len(set(ids)) != len(ids):
        raise InputShapeError("one forward call may hold each request once")
    for s in steps:
        check(s)
