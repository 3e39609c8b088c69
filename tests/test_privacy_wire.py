"""What never leaves the client, observed during a real split generation (peer processes).

Every frame the client's links send and receive is recorded (the channel's send/recv are
wrapped: observation, nothing is faked), and the client's TLS connections go through a
loopback TCP relay that keeps the raw bytes a passive observer would see."""

from __future__ import annotations

import socket
import threading

import numpy as np

from conftest import reference_tokens
from edge_agent.transport.frames import DType, MsgType
from swarm_util import peers, swarm_generate  # noqa: F401 - peers is a fixture

PROMPT = "Maria Rossi lives at 12 Via Roma and her card ends 4417"


class Relay:
    """Loopback TCP relay to ``target`` that records every byte in both directions."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.wire = bytearray()
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._sockets: list[socket.socket] = [self._server]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:  # closed by stop()
                return
            upstream = socket.create_connection(self.target)
            self._sockets += [conn, upstream]
            for src, dst in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                with self._lock:
                    self.wire += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def stop(self) -> None:
        for s in self._sockets:
            s.close()


def test_only_hidden_states_leave_the_client_and_the_wire_is_encrypted(tmp_path, peers, tiny_model, monkeypatch):
    from edge_agent.directory import PeerDirectory
    from edge_agent.transport import tls

    peer = peers(tiny_model, "1:4")  # tiny: 5 layers; the client keeps 0:1 and 4:5
    relay = Relay(("127.0.0.1", peer.ready["tls_port"]))
    real_connect, real_dir_connect = tls.connect, PeerDirectory._connect
    sent, received = [], []

    async def via_relay(identity, swarm, host, port, *args, **kw):  # every TLS connection to the peer
        if port == peer.ready["tls_port"]:
            port = relay.port
        return await real_connect(identity, swarm, host, port, *args, **kw)

    async def recording_connect(self, entry):
        channel = await real_dir_connect(self, entry)
        send, recv, set_receiver = channel.send, channel.recv, channel.set_receiver

        async def record_send(frame):
            sent.append(frame)
            await send(frame)

        async def record_recv():
            frame = await recv()
            received.append(frame)
            return frame

        def record_set_receiver(receiver):  # the link takes replies in the channel's receive callback
            def recording(frame):
                taken = receiver(frame)
                if taken:
                    received.append(frame)
                return taken

            set_receiver(recording)

        channel.send, channel.recv, channel.set_receiver = record_send, record_recv, record_set_receiver
        return channel

    monkeypatch.setattr(tls, "connect", via_relay)
    monkeypatch.setattr(PeerDirectory, "_connect", recording_connect)
    try:
        prompt, res = swarm_generate(tmp_path, tiny_model, PROMPT, 12, [peer])
    finally:
        relay.stop()
    assert res.token_ids == reference_tokens(tiny_model, prompt, 12)
    assert [h["peer_id"] for h in res.stats["path"]] == [peer.agent_id]

    n_embd = 64
    acts_out = [f for f in sent if f.type == MsgType.ACTIVATION]
    acts_in = [f for f in received if f.type == MsgType.ACTIVATION]
    # one prefill frame (every prompt row) and one row per decode step but the last
    assert [f.n_positions for f in acts_out] == [len(prompt)] + [1] * 11
    assert len(acts_in) == len(acts_out)
    for f in acts_out + acts_in:  # hidden states only: f32 [rows, n_embd] for layers 1:4, never logits
        assert (f.type, f.dtype, f.layer_start, f.layer_end) == (MsgType.ACTIVATION, DType.F32, 1, 4)
        assert f.shape == (f.n_positions, n_embd)
        assert np.isfinite(f.array()).all()
    tokens_i32 = np.asarray(prompt, dtype="<i4").tobytes()
    for f in sent + received:
        assert f.type in (MsgType.ACTIVATION, MsgType.CONTROL, MsgType.END_REQUEST, MsgType.ACK, MsgType.ERROR, MsgType.CLOSE)
        assert f.dtype in (DType.F32, DType.U8), f"{f.type.name} carries {f.dtype.name}"
        if f.type != MsgType.ACTIVATION:  # control messages name no tokens or logits
            assert tokens_i32 not in bytes(f.payload)
            text = bytes(f.payload).decode("utf-8", "replace").lower()
            assert "logit" not in text and "token" not in text, text[:200]

    # the passive observer: everything went through the relay, encrypted
    wire = bytes(relay.wire)
    shipped = sum(len(f.payload) for f in acts_out + acts_in)
    assert len(wire) > shipped
    assert PROMPT.encode() not in wire and b"Maria" not in wire
    for f in acts_out + acts_in:
        payload = bytes(f.payload)
        for i in range(0, len(payload) - 32, 256):  # any 32 raw float bytes would give the frame away
            assert payload[i : i + 32] not in wire
    assert b'"op"' not in wire  # not even control JSON is readable
