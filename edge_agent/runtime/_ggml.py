"""The few ggml C functions the llama.cpp engine needs to read a graph tensor.

llama.cpp has no public API for "the residual stream after layer N"
(``llama_get_embeddings`` returns it *after* the final norm, which loses its scale).
The graph-eval callback sees every node instead; these helpers name a node and copy
its data out of whatever backend buffer holds it (CPU or GPU), for the Python callback,
and hand the same functions' addresses to the C one (``capture``).
"""

from __future__ import annotations

import ctypes
import pathlib

import llama_cpp

_LIB_DIR = pathlib.Path(llama_cpp.__file__).parent / "lib"


def _load_ggml_base() -> ctypes.CDLL:
    for name in ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll"):
        path = _LIB_DIR / name
        if path.exists():
            return ctypes.CDLL(str(path))
    raise OSError(f"libggml-base not found next to llama_cpp in {_LIB_DIR}")


_lib = _load_ggml_base()
_lib.ggml_get_name.argtypes = [ctypes.c_void_p]
_lib.ggml_get_name.restype = ctypes.c_void_p
_lib.ggml_nbytes.argtypes = [ctypes.c_void_p]
_lib.ggml_nbytes.restype = ctypes.c_size_t
_lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
_lib.ggml_backend_tensor_get.restype = None

_name_offset: int | None = None


def name_offset(tensor: int) -> int:
    """Offset of ``name`` inside ``struct ggml_tensor`` (found once, from a live tensor)."""
    global _name_offset
    if _name_offset is None:
        _name_offset = _lib.ggml_get_name(tensor) - tensor
    return _name_offset


def tensor_name_is(tensor: int, name_z: bytes) -> bool:
    """Cheap check (hot path: called for every graph node); ``name_z`` ends with NUL."""
    return ctypes.string_at(tensor + name_offset(tensor), len(name_z)) == name_z


def nbytes(tensor: int) -> int:
    return _lib.ggml_nbytes(tensor)


def copy_out(tensor: int, dst_ptr: int, size: int) -> None:
    _lib.ggml_backend_tensor_get(tensor, dst_ptr, 0, size)


def address(function_name: str) -> int:
    """A ggml function's address, for C code that calls it without linking to ggml."""
    return ctypes.cast(getattr(_lib, function_name), ctypes.c_void_p).value
