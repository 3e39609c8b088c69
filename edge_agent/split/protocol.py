"""The split-inference wire protocol, imported by both sides (hop server and client).

Frames are ``transport.frames.Frame``; this module says what they mean for split
inference: how an activation step, its reply, an error and the control messages look,
and how an untrusted reply is checked. Errors travel as codes (``ErrorCode``), never as
text to be matched: the message is for people, the code for programs. docs/split.md
lists every message.
"""

from __future__ import annotations

import enum
import json

import numpy as np

from edge_agent.runtime.engine import ContextFullError
from edge_agent.transport import DType, Flag, Frame, MsgType

MAX_CONTROL_BYTES = 64 * 1024
NO_REQUEST = b"\x00" * 16  # request id of messages that belong to no request (info, route, weights)


class ErrorCode(str, enum.Enum):
    """``code`` of an ERROR frame. Engine errors travel as their class name."""

    NO_SHARD = "no_shard"  # the node does not serve these layers
    BAD_DTYPE = "bad_dtype"  # hidden states must be f32
    BAD_FRAME = "bad_frame"  # the frame could not be handled at all
    BUSY = "busy"  # too many steps queued on the shard
    EVICTED = "evicted"  # the request idled past the node's timeout: replay from position 0
    NEXT_HOP_UNREACHABLE = "next_hop_unreachable"  # chain mode: the node could not forward
    BAD_ROUTE = "bad_route"
    BAD_CONTROL = "bad_control"
    WEIGHTS = "weights"  # a weight-transfer request failed
    CONTEXT_FULL = "context_full"  # the request outgrew the node's context: no other peer helps
    # engine errors (runtime.engine), by class name
    INPUT_SHAPE = "InputShapeError"
    POSITION = "PositionError"
    UNKNOWN_REQUEST = "UnknownRequestError"
    CAPACITY = "CapacityError"
    # client-side failures (never on the wire)
    PEER_LOST = "peer_lost"
    DEADLINE = "deadline"
    BAD_REPLY = "bad_reply"
    UNREACHABLE = "unreachable"
    INCOMPATIBLE = "incompatible"  # the peer's arithmetic settings differ from the client's

    def __str__(self) -> str:  # the wire form, also in f-strings and messages
        return self.value


class HopFailed(Exception):
    """A hop could not produce its step: peer lost, error reply, bad reply or no answer in time."""

    def __init__(self, peer_id: str, reason: str, code: str = "error", permanent: bool = True):
        super().__init__(f"peer {peer_id[:12]}: {reason}")
        self.peer_id, self.reason, self.code, self.permanent = peer_id, reason, str(code), permanent


def engine_error_code(exc: Exception) -> str:
    """The wire code of an engine error: its class name, but ``context_full`` for a full context."""
    return ErrorCode.CONTEXT_FULL.value if isinstance(exc, ContextFullError) else type(exc).__name__


def error_frame(request_id: bytes, step: int, code: str, message: str, start: int = 0, end: int = 0, seq: int = 0) -> Frame:
    body = json.dumps({"code": str(code), "message": message}).encode()
    return Frame.from_bytes(MsgType.ERROR, body, request_id=request_id, step=step, layer_start=start, layer_end=end, seq=seq)


def error_reply(frame: Frame, code: str, message: str) -> Frame:
    """The ERROR answer to ``frame`` (same request, step, layers and seq)."""
    return error_frame(frame.request_id, frame.step, code, message, frame.layer_start, frame.layer_end, frame.seq)


def parse_error(frame: Frame) -> tuple[str, str]:
    """(code, message) of an ERROR frame; tolerant of junk (the peer is untrusted)."""
    try:
        body = json.loads(bytes(frame.payload[:MAX_CONTROL_BYTES]).decode("utf-8"))
        return str(body.get("code", "error"))[:64], str(body.get("message", ""))[:2000]
    except (ValueError, AttributeError, RecursionError):
        return "error", bytes(frame.payload[:200]).decode("utf-8", "replace")


def control_frame(body: dict, seq: int = 0) -> Frame:
    return Frame.from_bytes(MsgType.CONTROL, json.dumps(body).encode(), request_id=NO_REQUEST, seq=seq)


def parse_control(frame: Frame) -> dict | None:
    """The JSON object of a CONTROL frame, or None if it is not one (untrusted bytes)."""
    try:
        msg = json.loads(bytes(frame.payload[:MAX_CONTROL_BYTES]).decode("utf-8"))
    except (ValueError, RecursionError):
        return None
    return msg if isinstance(msg, dict) else None


def activation(request_id: bytes, pos: int, x: np.ndarray, start: int, end: int, seq: int, flags: int = 0) -> Frame:
    """One step's input for layers ``[start, end)``: rows ``pos .. pos + len(x)`` as f32."""
    if x.shape[0] > 1:
        flags |= int(Flag.PREFILL)
    return Frame.from_array(MsgType.ACTIVATION, x, request_id=request_id, step=pos, n_positions=x.shape[0],
                            layer_start=start, layer_end=end, seq=seq, flags=flags)


def check_reply(peer_id: str, reply: Frame, pos: int, start: int, end: int, shape: tuple[int, ...]) -> np.ndarray:
    """The output rows of an ACTIVATION reply, or ``HopFailed(bad_reply)`` if it does not answer
    the step sent (wrong type, step, layers, dtype or shape, or not finite)."""
    if reply.type != MsgType.ACTIVATION or reply.step != pos or (reply.layer_start, reply.layer_end) != (start, end):
        raise HopFailed(peer_id, "reply does not match the request (wrong type, step or layers)", ErrorCode.BAD_REPLY)
    out = reply.array()
    if reply.dtype != DType.F32 or out.shape != shape or not np.isfinite(out).all():
        raise HopFailed(peer_id, f"reply is {reply.dtype.name} {out.shape}, expected F32 {shape}, or not finite",
                        ErrorCode.BAD_REPLY)
    return np.array(out)  # a writable copy: the payload buffer belongs to the frame


def route_message(request_id: bytes, nxt: dict | None) -> dict:
    """Chain mode: tell a hop where its output goes (``None``: answer the client)."""
    return {"op": "route", "request": request_id.hex(), "next": nxt}


def valid_next(nxt, chain_supported: bool) -> bool:
    """A chain route's next hop, as sent by an untrusted client: types and ranges checked."""
    if not chain_supported or not isinstance(nxt, dict):
        return False
    ints = [nxt.get(k) for k in ("port", "start", "end")]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in ints):
        return False
    port, start, end = ints
    return (isinstance(nxt.get("peer_id"), str) and len(nxt["peer_id"]) == 64 and isinstance(nxt.get("host"), str)
            and len(nxt["host"]) <= 255 and 0 < port < 65536 and 0 <= start < end <= 65535)
