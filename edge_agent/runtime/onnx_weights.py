"""GGUF tensors -> ONNX Runtime weights, without changing a single weight value.

Every ggml block format used by llama models is an affine map of small unsigned
integers per block: ``w = (q - 2**(bits-1)) * scale + min``. ``com.microsoft``
``MatMulNBits`` computes ``x @ ((q - zp) * scale)`` with the default zero point
``zp = 2**(bits-1)`` on its fast int8 path; the ``min`` part (the asymmetric formats
Q4_1, Q5_1, Q4_K, Q5_K) is the small exact correction ``blocksum(x) @ min`` added after
it (a float zero point would also express it, but ORT runs that on a path ~20x slower).

| ggml   | MatMulNBits         | q stored             | scale          | min            |
|--------|---------------------|----------------------|----------------|----------------|
| Q4_0   | 4 bits, block 32    | q                    | d              | -              |
| Q4_1   | 4 bits, block 32    | q                    | d              | m + 8d         |
| Q8_0   | 8 bits, block 32    | q + 128              | d              | -              |
| Q5_0   | 8 bits, block 32    | q + 112              | d              | -              |
| Q5_1   | 8 bits, block 32    | q + 128              | d              | m              |
| Q4_K   | 4 bits, block 32    | q                    | d*sc           | 8*d*sc - dmin*m|
| Q5_K   | 8 bits, block 32    | q + 128              | d*sc           | -dmin*m        |
| Q6_K   | 8 bits, block 16    | q + 96               | d*sc           | -              |

Float types (F32, F16, BF16) become float32 ``MatMul`` weights; any other type is
dequantized with ``gguf.quants`` to float32 (exact values, more memory) with a warning.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from edge_agent.runtime.engine import UnsupportedModelError

QK_K = 256


@dataclass
class QuantWeight:
    """``W[n, k] = (q[n, k] - 2**(bits-1)) * scales[n, k // block] + mins[n, k // block]``."""

    q: np.ndarray  # uint8 (N, K), values in [0, 2**bits)
    bits: int
    block: int
    scales: np.ndarray  # float32 (N, K // block)
    mins: np.ndarray | None  # float32 (N, K // block), or None when symmetric

    def dequantize(self) -> np.ndarray:
        n, k = self.q.shape
        q = self.q.astype(np.float32).reshape(n, k // self.block, self.block) - float(1 << (self.bits - 1))
        w = q * self.scales[:, :, None]
        if self.mins is not None:
            w = w + self.mins[:, :, None]
        return w.reshape(n, k)

    def packed(self) -> np.ndarray:
        """MatMulNBits' B: (N, K // block, block * bits // 8), 4-bit pairs low nibble first."""
        n, k = self.q.shape
        if self.bits == 8:
            return np.ascontiguousarray(self.q.reshape(n, k // self.block, self.block))
        pairs = self.q.reshape(n, k // 2, 2)
        b = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).astype(np.uint8)
        return np.ascontiguousarray(b.reshape(n, k // self.block, self.block // 2))


def _f16(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """ggml 32-element nibble layout: byte j holds element j (low) and j + 16 (high)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _qh_bits(qh: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1 high bits: bit j of the little-endian uint32 belongs to element j."""
    u = np.ascontiguousarray(qh).view("<u4")  # (B, 1)
    return ((u >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)


def _q4_0(b):
    d, qs = _f16(b[:, 0:2]), b[:, 2:18]
    return _nibbles(qs), 4, 32, d[:, 0], None


def _q4_1(b):
    d, m, qs = _f16(b[:, 0:2])[:, 0], _f16(b[:, 2:4])[:, 0], b[:, 4:20]
    return _nibbles(qs), 4, 32, d, m + np.float32(8) * d


def _q8_0(b):
    d, qs = _f16(b[:, 0:2])[:, 0], b[:, 2:34].view(np.int8)
    return (qs.astype(np.int16) + 128).astype(np.uint8), 8, 32, d, None


def _q5_0(b):
    d, qh, qs = _f16(b[:, 0:2])[:, 0], b[:, 2:6], b[:, 6:22]
    q = _nibbles(qs) | (_qh_bits(qh) << 4)  # 0..31, value (q - 16) * d
    return q + np.uint8(112), 8, 32, d, None


def _q5_1(b):
    d, m, qh, qs = _f16(b[:, 0:2])[:, 0], _f16(b[:, 2:4])[:, 0], b[:, 4:8], b[:, 8:24]
    q = _nibbles(qs) | (_qh_bits(qh) << 4)  # value q * d + m
    return q + np.uint8(128), 8, 32, d, m


def _scale_min_k4(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = scales.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)  # (B, 8) each


def _k_sub32(qs: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K: 4 chunks of 32 bytes; sub-block 2c is the low nibbles, 2c+1 the high."""
    c = qs.reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    return (c & 0x0F).reshape(-1, QK_K)


def _q4_k(b):
    d, dmin = _f16(b[:, 0:2])[:, 0:1], _f16(b[:, 2:4])[:, 0:1]
    sc, mn = _scale_min_k4(b[:, 4:16])
    scale, low = d * sc, dmin * mn  # value = scale * q - low
    return _k_sub32(b[:, 16:144]), 4, 32, scale, np.float32(8) * scale - low


def _q5_k(b):
    d, dmin = _f16(b[:, 0:2])[:, 0:1], _f16(b[:, 2:4])[:, 0:1]
    sc, mn = _scale_min_k4(b[:, 4:16])
    qh = b[:, 16:48]  # bit s of qh[l] is the high bit of element l of sub-block s
    high = ((qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1).reshape(-1, QK_K)
    q = _k_sub32(b[:, 48:176]) | (high << 4)
    return q + np.uint8(128), 8, 32, d * sc, -(dmin * mn)


def _q6_k(b):
    ql, qh, sc, d = b[:, 0:128], b[:, 128:192], b[:, 192:208].view(np.int8), _f16(b[:, 208:210])[:, 0:1]
    lo = (ql.reshape(-1, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & 0x0F
    hi = (qh.reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 0x03
    q = lo.reshape(-1, 2, 128) | (hi.reshape(-1, 2, 128) << 4)  # 0..63, value (q - 32) * d * sc
    return q.reshape(-1, QK_K) + np.uint8(96), 8, 16, d * sc.astype(np.float32), None


# ggml type name -> (bytes per block, elements per block, unpacker)
_UNPACK = {
    "Q4_0": (18, 32, _q4_0),
    "Q4_1": (20, 32, _q4_1),
    "Q8_0": (34, 32, _q8_0),
    "Q5_0": (22, 32, _q5_0),
    "Q5_1": (24, 32, _q5_1),
    "Q4_K": (144, QK_K, _q4_k),
    "Q5_K": (176, QK_K, _q5_k),
    "Q6_K": (210, QK_K, _q6_k),
}
FLOAT_TYPES = ("F32", "F16", "BF16")
QUANT_TYPES = tuple(_UNPACK)


def unpack_quant(type_name: str, raw: np.ndarray, n: int, k: int) -> QuantWeight:
    """A GGUF quantized matrix (raw bytes, N rows of K elements) as a ``QuantWeight``."""
    size, per, fn = _UNPACK[type_name]
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1, size)
    if blocks.shape[0] * per != n * k:
        raise UnsupportedModelError(f"{type_name} tensor of {blocks.shape[0]} blocks does not hold {n}x{k} values")
    q, bits, block, scales, mins = fn(blocks)
    scales = np.asarray(scales, dtype=np.float32).reshape(n, k // block)
    mins = None if mins is None else np.asarray(mins, dtype=np.float32).reshape(n, k // block)
    return QuantWeight(np.ascontiguousarray(q, dtype=np.uint8).reshape(n, k), bits, block, scales, mins)


def load_matrix(tensor) -> QuantWeight | np.ndarray:
    """A GGUF 2-D weight (GGUFReader tensor, ggml shape [K, N]) as QuantWeight or float32 (N, K)."""
    import gguf

    k, n = int(tensor.shape[0]), int(tensor.shape[1])
    name = tensor.tensor_type.name
    if name in _UNPACK:
        return unpack_quant(name, tensor.data, n, k)
    if name == "F32":
        return np.asarray(tensor.data, dtype=np.float32).reshape(n, k)
    if name == "F16":
        return np.asarray(tensor.data, dtype=np.float16).astype(np.float32).reshape(n, k)
    warnings.warn(f"{tensor.name}: {name} has no MatMulNBits mapping; dequantized to float32 (slower, 4-8x memory)", stacklevel=2)
    try:
        return gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32).reshape(n, k)
    except NotImplementedError as exc:
        raise UnsupportedModelError(f"{tensor.name}: ggml type {name} cannot be dequantized ({exc})") from exc


def load_vector(tensor) -> np.ndarray:
    """A 1-D GGUF tensor (norm weights, biases) as float32."""
    import gguf

    if tensor.tensor_type.name in ("F32", "F16"):
        return np.asarray(tensor.data).astype(np.float32).reshape(-1)
    return gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32).reshape(-1)
