"""How many rows one llama_decode may hold and still equal single-row decodes, bit for bit.

Greedy output through the swarm must equal llama.cpp alone, which decodes one row at a
time. Batching the decode steps of several requests, or verifying several speculative
drafts of one request in one pass, is only allowed where each row's result is
bit-identical to that single-row decode. That is a property of the kernels, not of the
model: ggml picks matmul paths by weight type and row count, and the CPU it runs on.
Measured on an AVX-512 EPYC (docs/split.md): Q4_0, Q4_1 and Q8_0 rows stay identical up to
16 rows; Q4_K matmuls change path at 4 rows, Q6_K at 8; attention without flash attention
differs from 2 rows of one request on. So each engine measures it once, when it loads,
with random inputs on its own kernels, at every size from 2 to 8 rows (about 30 small
decodes: ~0.1-0.2 s for SmolLM2 on a quiet machine; a shard probed once in a process is
not probed again).
"""

from __future__ import annotations

import numpy as np

from edge_agent.runtime.engine import StepInput

PROBE_MAX_ROWS = 8  # beyond this nothing is batched: larger batches gain little next to measuring them
PROBE_PREFIX = 64  # positions cached before the draft rows are measured
_measured: dict[tuple, tuple[int, int]] = {}  # (shard content, settings) -> result, for this process


def _inputs(engine, n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0x5EED)
    if engine.info.role in ("head", "full"):
        return [rng.integers(0, engine._n_vocab, size=1).astype(np.int32) for _ in range(n)]
    return [rng.standard_normal((1, engine.info.n_embd)).astype(np.float32) for _ in range(n)]


def _same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a, b))


def exact_rows(engine, max_rows: int = PROBE_MAX_ROWS) -> tuple[int, int]:
    """``(batch_rows, draft_rows)`` for a loaded llama.cpp engine with no requests yet: the
    most rows per decode, up to ``max_rows``, that equal single rows, for one row of each of
    several requests (every size from 2 up: a batch's last group may be any size) and for
    several rows of one request (drafts, after a prefix, since attention kernels may
    depend on the cache's length). Uses the engine's own slots and frees them."""
    o = engine.options
    key = (engine.info.shard_hash, max_rows, o.max_requests, o.n_ctx_per_request, o.n_batch, o.n_ubatch, o.flash_attn,
           o.kv_type, o.gpu_layers)
    if key not in _measured:
        _measured[key] = _measure(engine, max_rows)
    return _measured[key]


def _largest_exact(sizes, same) -> int:
    best = 1
    for n in sizes:
        if not same(n):
            break
        best = n
    return best


def _measure(engine, max_rows: int) -> tuple[int, int]:
    o = engine.options
    logits = engine.info.role in ("tail", "full")
    engine.batch_rows = engine.draft_rows = 1
    names: set[str] = set()

    def run(steps: list[StepInput]) -> list[np.ndarray]:
        names.update(s.request_id for s in steps)
        try:
            return [out.data for out in engine.forward(steps)]
        finally:
            for s in steps:
                engine.end_request(s.request_id)

    try:
        n_batch = min(max_rows, o.max_requests, o.n_batch)
        xs = _inputs(engine, n_batch)
        alone = [run([StepInput(f"probe-alone-{i}", 0, x)])[0] for i, x in enumerate(xs)]

        def batch_same(n: int) -> bool:
            engine.batch_rows = n
            return _same(run([StepInput(f"probe-batch-{i}", 0, x) for i, x in enumerate(xs[:n])]), alone)

        batch = _largest_exact(range(2, n_batch + 1), batch_same)
        engine.batch_rows = batch
        draft = 1
        prefix = min(PROBE_PREFIX, o.n_ctx_per_request - max_rows)
        n_draft = min(max_rows, o.n_batch, o.n_ctx_per_request)
        if o.flash_attn and n_draft > 1 and prefix >= 0:  # plain attention differs from 2 rows of one request on
            head = np.concatenate(_inputs(engine, prefix)) if prefix else None
            seq = np.concatenate(_inputs(engine, n_draft))
            if head is not None:
                engine.forward([StepInput("probe-seq", 0, head)])
            singles = [engine.forward([StepInput("probe-seq", prefix + r, seq[r:r + 1], all_logits=logits)])[0].data
                       for r in range(n_draft)]  # one request fed a row at a time, as decode does
            engine.end_request("probe-seq")
            rows = np.concatenate(singles) if singles[0].ndim == 2 else None

            def draft_same(n: int) -> bool:
                engine.draft_rows = n
                if head is not None:
                    engine.forward([StepInput("probe-draft", 0, head)])
                out = run([StepInput("probe-draft", prefix, seq[:n], all_logits=logits, draft=True)])[0]
                return rows is not None and np.array_equal(out, rows[:n])

            draft = _largest_exact(range(2, n_draft + 1), draft_same)
        return batch, draft
    finally:
        for name in {*names, "probe-seq"}:
            engine.end_request(name)
