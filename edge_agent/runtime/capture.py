"""Capture of the residual stream (graph node ``l_out-{n-1}``) during ``llama_decode``.

ggml's scheduler calls the graph-eval callback for *every* graph node (ask=True: "do you
want this one?") until the target, then once more (ask=False) to hand it over. A Python
callback takes the GIL for each of those 818 calls per step of a 22-layer shard, so any
other Python thread that holds it (a node's event loop under load) can stall a step in
the middle of the graph; measured in docs/benchmarks.md (issue 18): harmless alone, the
worst outliers next to a thread that runs bytecode.

``NativeCapture`` is the same callback in ~20 lines of C, so ``llama_decode`` runs
without the GIL from start to end. The C code links against nothing: the three ggml
functions it calls arrive as pointers in its ``user_data`` struct, taken via ctypes from
the libggml-base that llama-cpp-python ships. It is compiled on first use with the system
C compiler (``$CC``, else ``cc``/``gcc``/``clang``) into ``<data dir>/native/`` and reused
after that. Why not a setuptools extension: the package stays pure Python (one wheel for
every platform, no build step for ``pip install -e``), and a machine without a compiler
just gets the Python callback instead of a failed install.

``PythonCapture`` is that fallback (no compiler, a failed build, or
``EDGE_AGENT_CAPTURE=python``); both write into the same caller-owned buffer and give
bit-identical output, since both copy the same tensor bytes.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import llama_cpp as lc
import numpy as np

from edge_agent.runtime import _ggml

log = logging.getLogger(__name__)

# Set to "python" to force the Python callback (debugging, and the fallback's own test).
CAPTURE_ENV = "EDGE_AGENT_CAPTURE"

_C_SOURCE = r"""
#include <stdbool.h>
#include <stddef.h>
#include <string.h>

/* Mirrors CaptureState in capture.py; the ggml functions come in as pointers so this
   file needs no ggml headers and links against nothing. */
struct capture_state {
    const char *(*get_name)(const void *tensor);
    size_t (*nbytes)(const void *tensor);
    void (*tensor_get)(const void *tensor, void *data, size_t offset, size_t size);
    const char *target;   /* node name to capture, NUL-terminated */
    char *buffer;         /* caller-owned; one micro-batch's rows are appended per capture */
    size_t capacity;      /* bytes */
    size_t used;          /* bytes written since the caller reset it */
    long long calls;      /* times the scheduler called us (profiling) */
    int overflow;         /* a tensor did not fit: the caller raises, nothing was written */
};

bool edge_capture_node(void *tensor, bool ask, void *user_data) {
    struct capture_state *s = (struct capture_state *)user_data;
    s->calls++;
    if (ask)
        return strcmp(s->get_name(tensor), s->target) == 0;
    size_t n = s->nbytes(tensor);
    if (n > s->capacity - s->used) {
        s->overflow = 1;
        return false;
    }
    s->tensor_get(tensor, s->buffer + s->used, 0, n);
    s->used += n;
    return false; /* stop the graph: the final norm and LM head are not ours to run */
}
"""


class CaptureState(ctypes.Structure):
    _fields_ = [
        ("get_name", ctypes.c_void_p),
        ("nbytes", ctypes.c_void_p),
        ("tensor_get", ctypes.c_void_p),
        ("target", ctypes.c_char_p),
        ("buffer", ctypes.c_void_p),
        ("capacity", ctypes.c_size_t),
        ("used", ctypes.c_size_t),
        ("calls", ctypes.c_longlong),
        ("overflow", ctypes.c_int),
    ]


class _Capture:
    """Shared half: the buffer, its state struct, and reading the rows back."""

    kind = ""

    def __init__(self, target: str, max_rows: int, n_embd: int):
        self._target = target.encode() + b"\0"
        self._buffer = np.empty(max_rows * n_embd, dtype=np.float32)
        self.state = CaptureState(
            target=self._target, buffer=self._buffer.ctypes.data, capacity=self._buffer.nbytes
        )
        self.user_data = ctypes.cast(ctypes.pointer(self.state), ctypes.c_void_p)
        self.callback: object = None  # a lc.ggml_backend_sched_eval_callback, set by subclasses

    @property
    def calls(self) -> int:
        return int(self.state.calls)

    def reset(self) -> None:
        self.state.used = 0
        self.state.overflow = 0

    def take(self) -> np.ndarray | None:
        """The captured values (a copy: the buffer is reused next decode); None on overflow."""
        if self.state.overflow:
            return None
        return self._buffer[: self.state.used // 4].copy()


class NativeCapture(_Capture):
    kind = "c"

    def __init__(self, lib: ctypes.CDLL, target: str, max_rows: int, n_embd: int):
        super().__init__(target, max_rows, n_embd)
        self.state.get_name = _ggml.address("ggml_get_name")
        self.state.nbytes = _ggml.address("ggml_nbytes")
        self.state.tensor_get = _ggml.address("ggml_backend_tensor_get")
        # Built from the C function's address, so no Python trampoline is involved.
        self.callback = lc.ggml_backend_sched_eval_callback(ctypes.cast(lib.edge_capture_node, ctypes.c_void_p).value)


class PythonCapture(_Capture):
    kind = "python"

    def __init__(self, target: str, max_rows: int, n_embd: int):
        super().__init__(target, max_rows, n_embd)
        self.callback = lc.ggml_backend_sched_eval_callback(self._on_graph_node)

    def _on_graph_node(self, tensor, ask, _user_data):
        s = self.state
        s.calls += 1
        if ask:
            return _ggml.tensor_name_is(tensor, self._target)
        size = _ggml.nbytes(tensor)
        if size > s.capacity - s.used:
            s.overflow = 1
            return False
        _ggml.copy_out(tensor, s.buffer + s.used, size)
        s.used += size
        return False


def make_capture(target: str, max_rows: int, n_embd: int) -> _Capture:
    """The C capture where it can be built, else the Python one (never fails)."""
    if os.environ.get(CAPTURE_ENV, "").lower() != "python":
        lib = native_library()
        if lib is not None:
            return NativeCapture(lib, target, max_rows, n_embd)
    return PythonCapture(target, max_rows, n_embd)


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


@functools.lru_cache(maxsize=1)
def native_library() -> ctypes.CDLL | None:
    """Load the compiled callback, building it first if needed; None (logged once) if not possible."""
    if os.environ.get(CAPTURE_ENV, "").lower() == "python":
        return None
    cc = _compiler()
    if cc is None:
        log.warning("no C compiler found: the residual-stream capture uses the slower Python callback")
        return None
    try:
        return ctypes.CDLL(str(_build(cc)))
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("could not build the C capture callback (%s): using the slower Python callback", exc)
        return None


def _build(cc: str) -> Path:
    from edge_agent.config import data_dir

    suffix = {"darwin": ".dylib", "win32": ".dll"}.get(sys.platform, ".so")
    # The name pins the source, compiler and machine, so a stale or foreign build is never loaded.
    key = hashlib.sha256(f"{_C_SOURCE}|{cc}|{platform.machine()}|{sys.platform}".encode()).hexdigest()[:16]
    out_dir = data_dir() / "native"
    target = out_dir / f"edge-capture-{key}{suffix}"
    if target.is_file():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        src = Path(tmp) / "capture.c"
        src.write_text(_C_SOURCE)
        built = Path(tmp) / f"capture{suffix}"
        proc = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(built), str(src)],
                              capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise OSError(f"{cc} exited {proc.returncode}: {proc.stderr.strip()[:300]}")
        os.replace(built, target)  # atomic: concurrent processes never load a half-written file
    return target
