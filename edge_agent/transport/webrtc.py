"""WebRTC transport (aiortc data channels): for peers that cannot reach each other directly.

Usage mirrors tls.py:
    server = await webrtc.listen(identity, swarm, host, signalling_port, on_channel)
    channel = await webrtc.connect(identity, swarm, host, signalling_port, ice_servers=None)
The channel machinery is in rtc.py, the authenticated HTTP offer/answer in signalling.py.
iceServers is [] unless configured: no public STUN/TURN.
"""

from .rtc import FRAGMENT_SIZE, HIGH_WATERMARK, LOW_WATERMARK, WebRtcChannel, is_loopback
from .signalling import WebRtcServer, connect, listen

__all__ = ["WebRtcChannel", "WebRtcServer", "connect", "listen", "is_loopback", "FRAGMENT_SIZE",
           "HIGH_WATERMARK", "LOW_WATERMARK"]
