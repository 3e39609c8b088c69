"""How many rows one llama_decode may hold and still equal single-row decodes, bit for bit.

Greedy output through the swarm must equal llama.cpp alone, which decodes one row at a
time. Batching the decode steps of several requests, or verifying several speculative
drafts of one request in one pass, is only allowed where each row's result is
bit-identical to that single-row decode. That is a property of the kernels, not of the
model: ggml picks matmul paths by weight type and row count, and the CPU it runs on.
Measured on an AVX-512 EPYC (docs/split.md): Q4_0, Q4_1 and Q8_0 rows stay identical up to
16 rows; Q4_K matmuls change path at 4 rows, Q6_K at 8; attention without flash attention
differs from 2 rows of one request on. So each engine measures it once, when it loads,
with random inputs on its own kernels, at 2, 4 and 8 rows (at most 22 small decodes:
~0.1 s for SmolLM2 on a quiet machine; a shard probed once in a process is not probed
again). Beyond 8 rows nothing is batched: the gain from larger batches is small next to
the cost of measuring them.
"""

from __future__ import annotations

import numpy as np

from edge_agent.runtime.engine import StepInput

PROBE_ROWS = (2, 4, 8)
_measured: dict[tuple, tuple[int, int]] = {}  # (shard content, settings) -> result, for this process


def _inputs(engine, n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0x5EED)
    if engine.info.role in ("head", "full"):
        return [rng.integers(0, engine._n_vocab, size=1).astype(np.int32) for _ in range(n)]
    return [rng.standard_normal((1, engine.info.n_embd)).astype(np.float32) for _ in range(n)]


def _same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a, b))


def exact_rows(engine, sizes=PROBE_ROWS) -> tuple[int, int]:
    """``(batch_rows, draft_rows)`` for a loaded llama.cpp engine with no requests yet: the
    most rows (among ``sizes``) per decode that equal single rows, for one row of each of
    several requests and for several rows of one request. Uses the engine's own slots and
    frees them; sets ``engine.batch_rows`` / ``draft_rows`` while it measures."""
    n_max = min(max(sizes), engine.options.max_requests, engine.options.n_batch)
    sizes = [n for n in sizes if n <= n_max]
    if not sizes:
        return 1, 1
    o = engine.options
    key = (engine.info.shard_hash, n_max, o.n_batch, o.n_ubatch, o.flash_attn, o.kv_type, o.gpu_layers)
    if key not in _measured:
        _measured[key] = _measure(engine, sizes)
    return _measured[key]


def _measure(engine, sizes: list[int]) -> tuple[int, int]:
    n_max = max(sizes)
    logits = engine.info.role in ("tail", "full")
    xs = _inputs(engine, n_max)
    engine.batch_rows = engine.draft_rows = 1
    names: list[str] = []

    def run(steps: list[StepInput]) -> list[np.ndarray]:
        names.extend(s.request_id for s in steps)
        try:
            return [o.data for o in engine.forward(steps)]
        finally:
            for s in steps:
                engine.end_request(s.request_id)

    try:
        alone = [run([StepInput(f"probe-alone-{i}", 0, x)])[0] for i, x in enumerate(xs)]
        batch = 1
        for n in sizes:
            engine.batch_rows = n
            if not _same(run([StepInput(f"probe-batch-{i}", 0, x) for i, x in enumerate(xs[:n])]), alone):
                break
            batch = n
        engine.batch_rows = batch
        draft = 1
        if engine.options.flash_attn and batch > 1:  # plain attention differs from 2 rows of one request on
            seq = np.concatenate(xs)
            singles = []
            for r in range(len(xs)):  # one request fed a row at a time, as decode does
                singles.append(engine.forward([StepInput("probe-seq", r, seq[r:r + 1], all_logits=logits)])[0].data)
            engine.end_request("probe-seq")
            rows = np.concatenate(singles) if singles[0].ndim == 2 else None
            for n in (n for n in sizes if n <= batch):
                engine.draft_rows = n
                out = run([StepInput("probe-draft", 0, seq[:n], all_logits=logits, draft=True)])[0]
                if rows is None or not np.array_equal(out, rows[:n]):
                    break
                draft = n
        return batch, draft
    finally:
        for name in {*names, "probe-seq"}:
            engine.end_request(name)
