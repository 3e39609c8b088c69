"""User mistakes through the real `edge-agent` command (subprocesses): one line, a hint, exit
code 2, never a traceback. Peers are real `join` processes on loopback; the wrong swarm key,
the missing layers and the used port are real; multicast is blocked in a network namespace
this test creates (skipped where namespaces cannot be made: no root, no iproute2)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from swarm_util import start_peer

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str, env: dict | None = None, prefix: tuple[str, ...] = (), timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ if env is None else env)
    env.pop("EDGE_AGENT_SWARM_KEY", None)
    return subprocess.run([*prefix, sys.executable, "-m", "edge_agent", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def assert_user_error(res: subprocess.CompletedProcess, *words: str) -> None:
    """Exit 2, stderr an `error:` line (with ``words``) and a `hint:` line, and no traceback."""
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith(("error:", "hint:"))]
    assert [ln.split(":", 1)[0] for ln in lines] == ["error", "hint"], res.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])


@pytest.fixture(scope="module")
def alpha_peer(tmp_path_factory, tiny_model):
    """A node of swarm 'alpha' serving layers 1:3 of the 5-layer tiny model, started with
    --share-gpu on this CPU-only llama.cpp build."""
    base = tmp_path_factory.mktemp("alpha")
    peer = start_peer(tiny_model, "1:3", base / "peer", "--swarm-key", "alpha", "--share-gpu", "--ctx", "128")
    yield peer
    peer.stop()


def test_share_gpu_without_a_gpu_says_once_that_it_serves_on_the_cpu(alpha_peer):
    import llama_cpp

    assert not llama_cpp.llama_supports_gpu_offload()  # this machine's build: CPU only
    assert alpha_peer.ready["gpu_layers"] == 0
    log = alpha_peer.log.read_text()
    assert log.count("serves on the CPU") == 1, log


def _run(model: Path, peer, key: str, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    return cli("run", "-m", str(model), "--no-mdns", "--peer", peer.address, "--swarm-key", key, "--discover", "1",
               "--ctx", "128", "-n", "2", "--data-dir", str(tmp_path), *extra, "Once upon a time")


def test_wrong_swarm_key_says_so(alpha_peer, tiny_model, tmp_path):
    res = _run(tiny_model, alpha_peer, "beta", tmp_path, "--no-local-fallback")
    assert_user_error(res, "no peer of this swarm answered: check the swarm key")
    assert "serves layer" not in res.stderr


def test_wrong_swarm_key_with_local_fallback_notes_it(alpha_peer, tiny_model, tmp_path):
    res = _run(tiny_model, alpha_peer, "beta", tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "no peer of this swarm answered (check the swarm key)" in res.stderr


def test_no_route_names_the_missing_layers(alpha_peer, tiny_model, tmp_path):
    # the client keeps layers 0 and 4; the only peer serves 1:3, nobody layer 3
    res = _run(tiny_model, alpha_peer, "alpha", tmp_path, "--no-local-fallback")
    assert_user_error(res, "no peer serves layer 3")


def test_missing_model(tmp_path):
    assert_user_error(cli("generate", "-m", str(tmp_path / "nope.gguf"), "hi"), "model file not found")
    env = dict(os.environ, EDGE_AGENT_MODEL=str(tmp_path / "gone.gguf"))
    assert_user_error(cli("join", "--no-mdns", env=env), "EDGE_AGENT_MODEL points to a missing file")


def test_corrupt_model(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"this is not a GGUF file" * 10)
    assert_user_error(cli("model", "info", str(bad)), "not a usable GGUF model")
    assert_user_error(cli("join", "-m", str(bad), "--layers", "1:2", "--no-mdns", "--data-dir", str(tmp_path)),
                      "not a usable GGUF model")
    assert_user_error(cli("generate", "-m", str(bad), "hi"), "not a usable GGUF model")


def test_layers_out_of_bounds(tiny_model, tmp_path):
    assert_user_error(cli("join", "-m", str(tiny_model), "--layers", "2:9", "--no-mdns", "--data-dir", str(tmp_path)),
                      "outside the model's layers 0:5")
    assert_user_error(cli("join", "-m", str(tiny_model), "--layers", "3", "--no-mdns"), "bad layer range")
    assert_user_error(cli("model", "split", str(tiny_model), "--layers", "4:2", "-o", str(tmp_path / "x.gguf")),
                      "empty layer range")


def test_port_in_use(tiny_model, tmp_path):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        res = cli("join", "-m", str(tiny_model), "--layers", "1:3", "--no-mdns", "--host", "127.0.0.1", "--port", str(port),
                  "--ctx", "64", "--data-dir", str(tmp_path / "j"))
        assert_user_error(res, "port in use", str(port))
        res = cli("serve", "-m", str(tiny_model), "--no-mdns", "--port", str(port), "--discover", "0", "--ctx", "64",
                  "--data-dir", str(tmp_path / "s"))
        assert_user_error(res, "in use", str(port))


def test_max_memory_too_small(tiny_model, smollm_path, tmp_path):
    res = cli("join", "-m", str(smollm_path), "--layers", "1:15", "--max-memory", "100M", "--no-mdns", "--data-dir", str(tmp_path))
    assert_user_error(res, "--max-memory 100M is below what 14 layers need")
    assert_user_error(cli("join", "-m", str(tiny_model), "--max-memory", "lots", "--no-mdns"), "--max-memory needs a size")


def test_bad_peer_address():
    assert_user_error(cli("run", "--no-mdns", "--peer", "nowhere", "hi"))


@contextmanager
def _namespace_without_multicast():
    """A network namespace whose only interface is loopback (no multicast to another machine)."""
    from netns_util import _ip, netns_unavailable_reason

    reason = netns_unavailable_reason()
    if reason:
        pytest.skip(reason)
    name = f"ea-cli-{os.getpid() % 10000}"
    _ip("netns", "add", name)
    try:
        _ip("-n", name, "link", "set", "lo", "up")
        yield ("ip", "netns", "exec", name)
    finally:
        _ip("netns", "del", name, check=False)


def test_multicast_blocked(tiny_model, tmp_path):
    with _namespace_without_multicast() as inside:
        res = cli("peers", "--timeout", "0.5", "--data-dir", str(tmp_path), prefix=inside)
        assert_user_error(res, "no peers seen", "multicast is off")
        assert "--peer HOST:PORT" in res.stderr
        res = cli("run", "-m", str(tiny_model), "--discover", "0.5", "--no-local-fallback", "--ctx", "64",
                  "--data-dir", str(tmp_path), "hi", prefix=inside)
        assert_user_error(res, "no peer of this swarm answered: multicast is off")
