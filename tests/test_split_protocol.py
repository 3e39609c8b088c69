"""The pieces both sides of a hop share, without processes: arithmetic settings, wire
protocol helpers, error codes and the test-hooks gate (fast unit tests)."""

from __future__ import annotations

import numpy as np
import pytest

from edge_agent.directory import arithmetic_mismatch
from edge_agent.runtime.engine import Arithmetic, CapacityError, ContextFullError, EngineOptions, PositionError
from edge_agent.split.protocol import ErrorCode, HopFailed, activation, check_reply, engine_error_code, parse_control
from edge_agent.split.testhooks import ENABLE_ENV, TestHooks
from edge_agent.transport import Flag, Frame, MsgType


def test_arithmetic_round_trips_and_names_each_difference():
    mine = EngineOptions().arithmetic("llamacpp")
    assert mine == Arithmetic("llamacpp", 512, False, "f16") and Arithmetic.from_text(mine.to_text()) == mine
    assert EngineOptions(n_batch=256, n_ubatch=512).arithmetic("llamacpp").n_ubatch == 256  # as llama.cpp applies it
    theirs = Arithmetic("onnx", 8, True, "f16")
    assert mine.differences(theirs) == ["backend onnx on the peer, llamacpp on this device",
                                        "n_ubatch 8 on the peer, 512 on this device",
                                        "flash_attn on on the peer, off on this device"]
    assert mine.differences(mine) == []


@pytest.mark.parametrize("junk", ["", "llamacpp/512/0", "llamacpp/x/0/f16", "llamacpp/512/2/f16", "a//0/f16", "x" * 100, None])
def test_untrusted_arithmetic_text_is_refused(junk):
    with pytest.raises(ValueError):
        Arithmetic.from_text(junk)
    assert "valid arithmetic" in arithmetic_mismatch(EngineOptions().arithmetic("llamacpp"), junk)


def test_context_full_travels_as_its_own_code():
    assert engine_error_code(ContextFullError("x")) == ErrorCode.CONTEXT_FULL == "context_full"
    assert isinstance(ContextFullError("x"), CapacityError)
    assert engine_error_code(CapacityError("slots")) == "CapacityError"
    assert engine_error_code(PositionError("gap")) == "PositionError"


def test_reply_check_refuses_what_does_not_answer_the_step():
    x = np.ones((1, 8), dtype=np.float32)
    sent = activation(b"r" * 16, 5, x, 2, 4, seq=1)
    assert not sent.flags & Flag.PREFILL and activation(b"r" * 16, 0, np.ones((3, 8), np.float32), 2, 4, 1).flags & Flag.PREFILL
    good = Frame.from_array(MsgType.ACTIVATION, x * 2, request_id=b"r" * 16, step=5, n_positions=1, layer_start=2, layer_end=4)
    out = check_reply("p", good, 5, 2, 4, x.shape)
    assert out.flags.writeable and float(out[0, 0]) == 2.0
    bad = [Frame.from_array(MsgType.ACTIVATION, x, step=6, layer_start=2, layer_end=4),  # other step
           Frame.from_array(MsgType.ACTIVATION, x, step=5, layer_start=2, layer_end=3),  # other layers
           Frame.from_array(MsgType.ACTIVATION, x.astype(np.float16), step=5, layer_start=2, layer_end=4),
           Frame.from_array(MsgType.ACTIVATION, np.ones((2, 8), np.float32), step=5, layer_start=2, layer_end=4),
           Frame.from_array(MsgType.ACTIVATION, x * np.nan, step=5, layer_start=2, layer_end=4),
           Frame.from_bytes(MsgType.CONTROL, b"{}", step=5, layer_start=2, layer_end=4)]
    for frame in bad:
        with pytest.raises(HopFailed) as err:
            check_reply("p", frame, 5, 2, 4, x.shape)
        assert err.value.code == ErrorCode.BAD_REPLY


def test_control_parsing_tolerates_junk():
    assert parse_control(Frame.from_bytes(MsgType.CONTROL, b"[" * 70000)) is None
    assert parse_control(Frame.from_bytes(MsgType.CONTROL, b"[1]")) is None
    assert parse_control(Frame.from_bytes(MsgType.CONTROL, b'{"op": "info"}')) == {"op": "info"}


def test_test_hooks_are_refused_unless_enabled(monkeypatch):
    monkeypatch.delenv(ENABLE_ENV, raising=False)
    TestHooks().check_enabled()  # none set: fine
    with pytest.raises(ValueError, match=ENABLE_ENV):
        TestHooks(delay_ms=5).check_enabled()
    monkeypatch.setenv(ENABLE_ENV, "1")
    TestHooks(delay_ms=5, claim_model_hash="ab" * 32).check_enabled()
