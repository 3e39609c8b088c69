"""Transport layer: the frame codec and authenticated channels (TLS 1.3 and WebRTC).

The transport moves frames between verified peers; it knows nothing about layers or models.
See docs/transport.md for the wire format, handshakes and measured performance.
"""

from .channel import Channel, FrameChannel
from .errors import FrameError, HandshakeError, PeerLostError, SequenceError, TransportError
from .frames import (DType, Flag, Frame, MsgType, Reassembler, SequenceGuard, decode, encode, fragment)

__all__ = ["Channel", "FrameChannel", "FrameError", "HandshakeError", "PeerLostError", "SequenceError",
           "TransportError", "DType", "Flag", "Frame", "MsgType", "Reassembler", "SequenceGuard", "decode",
           "encode", "fragment"]
