"""A node's compute class: what decides its rounding, so an auditor knows how close an honest
re-execution must come (docs/accountability.md, "Tolerance tiers").

Two engines of one class run the same machine code on the same data: llama.cpp on the CPU
was measured bit-exact across thread counts and batch compositions, so an auditor of the
same class may use a tight tolerance. The class must pin *every* source of rounding, because
one float32 ulp of difference anywhere is amplified to ~0.5 % relative RMS by a few layers
(llama.cpp re-quantizes activations to 8 bits before each quantized matmul, and a changed
rounding there is 1/127 of a block, not an ulp: ``bench/audit.py``). So it covers the
runtime and its version, the CPU features the build reports (``llama_print_system_info``:
AVX2 vs AVX-512 code paths differ by ~0.5 %), the content of its compute libraries (one
version built by two compilers, or with ``-march=native`` on two machines, is two
classes), the C library (libm's sinf/cosf/expf feed RoPE and softmax), the operating system
and architecture, and whether layers run on a GPU (its backend's build flags come from the
same report). The arithmetic settings (n_ubatch, flash attention, KV type) are not part of
it: a client routes only to peers whose settings equal its own.

Text form, advertised in the capability record (``cc``): ``<8 hex>:<readable>``, e.g.
``3f0c9a12:llamacpp-0.3.36-cpu-avx512``. The hash covers the whole description; the readable
part is for people and carries no meaning a hash collision could exploit.
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

# the best instruction set the build reports, for the readable part (first match wins)
_ISA_ORDER = ("AVX512", "AVX2", "AVX", "SSE3", "SVE", "NEON")
_READABLE = re.compile(r"[^a-z0-9.]+")
MAX_READABLE = 40
MAX_HASHED_BYTES = 64 << 20  # a bigger library (a GPU backend's) is identified by name and size: hashing it would stall startup


@dataclass(frozen=True)
class ComputeClass:
    backend: str  # "llamacpp" or "onnx"
    version: str  # the runtime's version
    device: str  # "cpu" or "gpu"
    system: str  # the runtime's own report of its build (CPU features, GPU backend flags)
    machine: str  # OS, architecture and C library: libm and code paths differ across them
    build: str = ""  # hash of the runtime's compute libraries

    @property
    def exact(self) -> bool:
        """Where bit-exactness across threads and batching was measured: llama.cpp on the CPU."""
        return self.backend == "llamacpp" and self.device == "cpu"

    def description(self) -> str:
        return "\n".join((self.backend, self.version, self.device, self.system, self.machine, self.build))

    def to_text(self) -> str:
        digest = hashlib.blake2b(self.description().encode(), digest_size=4).hexdigest()
        isa = next((f.lower() for f in _ISA_ORDER if re.search(rf"\b{f}\s*=\s*1\b", self.system)), "")
        readable = _READABLE.sub("-", f"{self.backend}-{self.version}-{self.device}-{isa}".lower()).strip("-")
        return f"{digest}:{readable[:MAX_READABLE]}"


def compute_class(backend: str, gpu_layers: int = 0) -> ComputeClass:
    """This process's class for engines of ``backend`` ("llamacpp" or "onnx") run with
    ``gpu_layers`` offloaded (counts only where the build can offload)."""
    return _compute_class(backend, gpu_layers > 0)


@lru_cache(maxsize=4)
def _compute_class(backend: str, offload: bool) -> ComputeClass:
    machine = "-".join((platform.system(), platform.machine(), *platform.libc_ver()))
    if backend == "llamacpp":
        import llama_cpp

        gpu = offload and bool(llama_cpp.llama_supports_gpu_offload())
        system = " ".join(llama_cpp.llama_print_system_info().decode("utf-8", "replace").split())
        libs = Path(os.environ.get("LLAMA_CPP_LIB_PATH") or Path(llama_cpp.__file__).parent / "lib")
        return ComputeClass(backend, llama_cpp.__version__, "gpu" if gpu else "cpu", system, machine, _libraries_hash(libs))
    import onnxruntime

    return ComputeClass(backend, onnxruntime.__version__, onnxruntime.get_device().lower(), "", machine)


def _libraries_hash(directory: Path) -> str:
    """blake2b over llama.cpp's libraries in ``directory`` (each file once, symlinks resolved).
    Where they cannot be found the build is not pinned: a class of this process alone, which
    no auditor shares (the cross-class tier), rather than a guess that could share one."""
    h = hashlib.blake2b(digest_size=16)
    names = ("libggml", "libllama", "ggml", "llama")
    files = sorted({p.resolve() for p in directory.iterdir() if p.name.startswith(names)}) if directory.is_dir() else []
    if not files:
        return "unpinned-" + os.urandom(8).hex()
    for path in files:
        size = path.stat().st_size
        h.update(f"{path.name}\0{size}\0".encode())
        if size <= MAX_HASHED_BYTES:
            h.update(path.read_bytes())
    return h.hexdigest()
