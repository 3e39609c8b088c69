"""The residual-stream capture: the C callback is built and used where a compiler exists,
gives the Python callback's output bit for bit, and a machine that cannot build it falls
back to the Python callback with one log line (real compiler, real llama.cpp)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from conftest import THREADS
from edge_agent.runtime import capture
from edge_agent.runtime.engine import EngineOptions, StepInput
from edge_agent.runtime.llamacpp import LlamaCppEngine

SHAPE = dict(n_layer=4, n_embd=128, n_head=4, n_head_kv=2, n_ff=256, n_vocab=600)
# n_batch 16 / n_ubatch 8: a 21-row prefill crosses chunks and micro-batches, so the
# capture appends several micro-batches per decode call and is reset between calls.
OPTS = EngineOptions(n_ctx_per_request=128, max_requests=2, n_threads=THREADS, n_batch=16, n_ubatch=8)


@pytest.fixture
def fresh_capture(monkeypatch, tmp_path):
    """A clean slate: no cached library decision, an empty build dir."""
    monkeypatch.setenv("EDGE_AGENT_DATA_DIR", str(tmp_path))
    monkeypatch.delenv(capture.CAPTURE_ENV, raising=False)
    capture.native_library.cache_clear()
    yield monkeypatch
    capture.native_library.cache_clear()  # later tests re-decide in their own environment


def load(model, start, end, tmp_path):
    return LlamaCppEngine.from_model(model, start, end, OPTS, cache_dir=tmp_path / "shards")


def run_steps(engine, takes_tokens: bool) -> list[np.ndarray]:
    """Prefill two requests (alone, different lengths), then 4 decode steps batched together."""
    rng = np.random.default_rng(7)

    def rows(n):
        if takes_tokens:
            return rng.integers(3, SHAPE["n_vocab"], n).astype(np.int32)
        return rng.standard_normal((n, SHAPE["n_embd"])).astype(np.float32)

    outs = [o.data for o in engine.forward([StepInput("a", 0, rows(21))])]
    outs += [o.data for o in engine.forward([StepInput("b", 0, rows(5))])]
    for k in range(4):
        outs += [o.data for o in engine.forward([StepInput("a", 21 + k, rows(1)), StepInput("b", 5 + k, rows(1))])]
    return outs


@pytest.mark.parametrize("start,end", [(0, 2), (1, 3)], ids=["head", "middle"])
def test_c_capture_equals_python_capture_bit_for_bit(random_models, fresh_capture, tmp_path, start, end):
    model = random_models("q4_0", **SHAPE)
    assert capture._compiler() is not None, "this test machine has a C compiler (scripts/install.sh needs one)"
    c_engine = load(model, start, end, tmp_path)
    try:
        assert c_engine.capture.kind == "c"
        assert c_engine.batches_requests  # the decode steps above really ran as one batch
        got_c = run_steps(c_engine, takes_tokens=start == 0)
        assert c_engine.capture.calls > 0
    finally:
        c_engine.close()
    assert list((tmp_path / "native").glob("edge-capture-*")), "built into the data dir on first use"

    fresh_capture.setenv(capture.CAPTURE_ENV, "python")
    py_engine = load(model, start, end, tmp_path)
    try:
        assert py_engine.capture.kind == "python"
        got_py = run_steps(py_engine, takes_tokens=start == 0)
    finally:
        py_engine.close()
    assert len(got_c) == len(got_py) == 10
    for a, b in zip(got_c, got_py):
        assert a.shape == b.shape and a.dtype == b.dtype == np.float32
        assert a.tobytes() == b.tobytes()


def test_no_compiler_falls_back_with_one_log_line(random_models, fresh_capture, tmp_path, caplog):
    fresh_capture.delenv("CC", raising=False)
    fresh_capture.setenv("PATH", str(tmp_path / "empty"))  # no cc, gcc or clang to be found
    with caplog.at_level(logging.WARNING, logger=capture.__name__):
        engine = load(random_models("q4_0", **SHAPE), 1, 3, tmp_path)
        try:
            assert engine.capture.kind == "python"
            assert run_steps(engine, takes_tokens=False)[-1].shape == (1, SHAPE["n_embd"])
        finally:
            engine.close()
        load(random_models("q4_0", **SHAPE), 1, 3, tmp_path).close()  # a second engine: no second line
    lines = [r for r in caplog.records if r.name == capture.__name__]
    assert len(lines) == 1 and "no C compiler" in lines[0].getMessage()


def test_failed_build_falls_back(random_models, fresh_capture, tmp_path, caplog):
    fresh_capture.setenv("CC", "false")  # a real compiler command that fails: exit status 1
    with caplog.at_level(logging.WARNING, logger=capture.__name__):
        engine = load(random_models("q4_0", **SHAPE), 1, 3, tmp_path)
        engine.close()
    assert engine.capture.kind == "python"
    assert any("could not build" in r.getMessage() for r in caplog.records)
    assert not list((tmp_path / "native").glob("edge-capture-*"))


def test_env_forces_python_capture(random_models, fresh_capture, tmp_path):
    fresh_capture.setenv(capture.CAPTURE_ENV, "python")
    engine = load(random_models("q4_0", **SHAPE), 1, 3, tmp_path)
    engine.close()
    assert engine.capture.kind == "python"
    assert not (tmp_path / "native").exists()  # nothing compiled when the Python callback is asked for
