"""Transport layer: the frame codec and authenticated channels (TLS 1.3 and WebRTC).

The transport moves frames between verified peers. It knows nothing about models: a frame's
layer range is a routing key it carries, never interprets (the split protocol does).
See docs/transport.md for the wire format, handshakes and measured performance.
"""

from .channel import Channel, FrameChannel
from .errors import FrameError, HandshakeError, PeerLostError, TransportError
from .frames import DType, Flag, Frame, MsgType, Reassembler, decode, encode, fragment

__all__ = ["Channel", "FrameChannel", "FrameError", "HandshakeError", "PeerLostError", "TransportError", "DType",
           "Flag", "Frame", "MsgType", "Reassembler", "decode", "encode", "fragment"]
