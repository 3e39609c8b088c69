"""Engine behaviour: interleaved requests, batching, and clear errors for bad input."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import N_CTX, THREADS
from edge_agent.runtime.engine import (
    CorruptModelError,
    EngineOptions,
    InputShapeError,
    PositionError,
    ShardRangeError,
    StepInput,
    UnknownRequestError,
    UnsupportedModelError,
)
from edge_agent.runtime.llamacpp import LlamaCppEngine
from edge_agent.runtime.shards import inspect_model, shard_hash, write_shard

OPTS = EngineOptions(n_ctx_per_request=N_CTX, max_requests=4, n_threads=THREADS)


def hidden_inputs(tiny_model, prompts):
    """Head outputs for a few prompts, used as middle-shard inputs."""
    head = LlamaCppEngine.from_model(tiny_model, 0, 1, OPTS)
    try:
        return [head.forward([StepInput(f"h{i}", 0, np.asarray(p, dtype=np.int32))])[0].data for i, p in enumerate(prompts)]
    finally:
        head.close()


def run_alone(engine, rid, h, split_at):
    a = engine.forward([StepInput(rid, 0, h[:split_at])])[0].data
    outs = [a]
    for r in range(split_at, h.shape[0]):
        outs.append(engine.forward([StepInput(rid, r, h[r : r + 1])])[0].data)
    engine.end_request(rid)
    return np.concatenate(outs)


@pytest.mark.slow
def test_interleaved_and_batched_requests_equal_alone(tiny_model):
    prompts = [[1, 403, 407, 261, 378, 31, 9, 100], [1, 200, 201, 202, 203, 204, 205, 206], [1, 50, 60, 70, 80, 90, 99, 98]]
    hs = hidden_inputs(tiny_model, prompts)
    mid = LlamaCppEngine.from_model(tiny_model, 1, 4, OPTS)
    try:
        alone = [run_alone(mid, f"solo{i}", h, 4) for i, h in enumerate(hs)]
        # interleaved one request at a time
        outs = {i: [mid.forward([StepInput(f"r{i}", 0, h[:4])])[0].data] for i, h in enumerate(hs)}
        for r in range(4, 8):
            for i, h in enumerate(hs):
                outs[i].append(mid.forward([StepInput(f"r{i}", r, h[r : r + 1])])[0].data)
        for i in range(3):
            mid.end_request(f"r{i}")
        # batched: all requests' decode steps in one llama_decode
        bouts = {i: [] for i in range(3)}
        for i, h in enumerate(hs):
            bouts[i].append(mid.forward([StepInput(f"b{i}", 0, h[:4])])[0].data)
        for r in range(4, 8):
            res = mid.forward([StepInput(f"b{i}", r, h[r : r + 1]) for i, h in enumerate(hs)])
            for i, o in enumerate(res):
                bouts[i].append(o.data)
        assert not mid.batches_requests  # F32 weights: one decode per request (see EngineOptions)
        for i in range(3):
            assert np.array_equal(np.concatenate(outs[i]), alone[i])
            assert np.array_equal(np.concatenate(bouts[i]), alone[i])
    finally:
        mid.close()


@pytest.mark.parametrize("ftype", ["q4_0", "q8_0", "q4_k_m"])
def test_batched_decode_is_exact_for_quantized_weights(random_models, ftype):
    mid = LlamaCppEngine.from_model(random_models(ftype), 1, 4, OPTS)
    rng = np.random.default_rng(1)
    hs = [rng.standard_normal((6, 256)).astype(np.float32) for _ in range(3)]
    try:
        assert mid.batches_requests
        alone = [run_alone(mid, f"s{i}", h, 4) for i, h in enumerate(hs)]
        outs = {i: [mid.forward([StepInput(f"b{i}", 0, h[:4])])[0].data] for i, h in enumerate(hs)}
        mid.end_request("b1")  # a hole in the slots: llama.cpp splits micro-batches there
        for r in (4, 5):
            res = mid.forward([StepInput(f"b{i}", r, h[r : r + 1]) for i, h in enumerate(hs) if i != 1][::-1])
            for o in res:
                outs[int(o.request_id[1:])].append(o.data)
        for i in (0, 2):
            assert np.array_equal(np.concatenate(outs[i]), alone[i])
    finally:
        mid.close()


def test_end_request_frees_slot_and_forgets(tiny_model):
    mid = LlamaCppEngine.from_model(tiny_model, 1, 4, EngineOptions(n_ctx_per_request=N_CTX, max_requests=1, n_threads=THREADS))
    h = np.zeros((2, 64), dtype=np.float32)
    try:
        mid.forward([StepInput("a", 0, h)])
        assert mid.positions("a") == 2
        mid.end_request("a")
        mid.end_request("a")  # idempotent
        with pytest.raises(UnknownRequestError):
            mid.forward([StepInput("a", 2, h[:1])])
        mid.forward([StepInput("b", 0, h)])  # the only slot is free again
    finally:
        mid.close()


def test_bad_inputs_get_clear_errors(tiny_model):
    mid = LlamaCppEngine.from_model(tiny_model, 1, 4, OPTS)
    ok = np.zeros((3, 64), dtype=np.float32)
    try:
        with pytest.raises(InputShapeError, match="shape"):
            mid.forward([StepInput("x", 0, np.zeros((3, 65), dtype=np.float32))])
        with pytest.raises(InputShapeError, match="float32"):
            mid.forward([StepInput("x", 0, ok.astype(np.float16))])
        with pytest.raises(InputShapeError, match="NaN"):
            mid.forward([StepInput("x", 0, np.full((1, 64), np.nan, dtype=np.float32))])
        with pytest.raises(UnknownRequestError):
            mid.forward([StepInput("never-seen", 5, ok)])
        mid.forward([StepInput("x", 0, ok)])
        with pytest.raises(PositionError, match="gap"):
            mid.forward([StepInput("x", 7, ok[:1])])
        with pytest.raises(PositionError, match="overlap"):
            mid.forward([StepInput("x", 1, ok[:1])])
        # state survived the refusals
        assert mid.positions("x") == 3
        mid.forward([StepInput("x", 3, ok[:1])])
    finally:
        mid.close()
    head = LlamaCppEngine.from_model(tiny_model, 0, 1, OPTS)
    try:
        with pytest.raises(InputShapeError, match="token"):
            head.forward([StepInput("t", 0, np.asarray([1, 99999], dtype=np.int32))])
        with pytest.raises(InputShapeError, match="int32"):
            head.forward([StepInput("t", 0, np.zeros((2, 64), dtype=np.float32))])
    finally:
        head.close()


@pytest.mark.parametrize("rng", [(0, 0), (3, 2), (0, 6), (-1, 2), (5, 9)])
def test_bad_ranges_refused_before_loading(tiny_model, tmp_path, rng):
    with pytest.raises(ShardRangeError):
        LlamaCppEngine.from_model(tiny_model, *rng, OPTS, cache_dir=tmp_path)


def test_corrupt_and_truncated_gguf(tiny_model, tmp_path):
    data = tiny_model.read_bytes()
    trunc = tmp_path / "trunc.gguf"
    trunc.write_bytes(data[: len(data) // 3])
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + b"\xff" * 200)
    for bad in (trunc, junk):
        with pytest.raises(CorruptModelError):
            LlamaCppEngine.from_model(bad, 1, 2, OPTS, cache_dir=tmp_path)


def test_non_llama_architecture_refused(tiny_model, tmp_path):
    import gguf

    src = gguf.GGUFReader(str(tiny_model))
    out = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(out), "gpt2")
    w.add_block_count(2)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    del src
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        LlamaCppEngine.from_model(out, 0, 1, OPTS, cache_dir=tmp_path)


def test_shard_files_keep_bytes_and_hash(tiny_model, tmp_path):
    import gguf

    info = write_shard(tiny_model, tmp_path / "mid.gguf", 1, 3)
    assert info.role == "middle" and info.n_layer == 2 and info.layer_range == (1, 3)
    assert info.shard_hash == shard_hash(tiny_model, 1, 3)
    assert info.source_model_hash == inspect_model(tiny_model).model_hash
    src = {t.name: t for t in gguf.GGUFReader(str(tiny_model)).tensors}
    for t in gguf.GGUFReader(str(tmp_path / "mid.gguf")).tensors:
        if t.name.startswith("blk."):
            layer = int(t.name.split(".")[1]) + 1
            orig = src["blk.%d.%s" % (layer, t.name.split(".", 2)[2])]
            assert t.tensor_type == orig.tensor_type
            assert bytes(t.data.tobytes()) == bytes(orig.data.tobytes())
    head = write_shard(tiny_model, tmp_path / "head.gguf", 0, 2)
    tail = write_shard(tiny_model, tmp_path / "tail.gguf", 3, 5)
    assert (head.role, tail.role) == ("head", "tail")
    assert head.n_vocab == tail.n_vocab == 512 and info.n_vocab == 1
    assert len({head.shard_hash, tail.shard_hash, info.shard_hash}) == 3
