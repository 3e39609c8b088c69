"""Build the ONNX graph of a llama layer range straight from GGUF tensors (onnx.helper only).

Graph I/O (``n`` new rows, ``past`` cached positions, ``total = past + n``)::

    hidden   float32 [n, n_embd]       (head shards: tokens int64 [n])
    rope_cos float32 [n, n_rot]        (c0, c0, c1, c1, ..) and (-s0, s0, -s1, s1, ..) of each row's
    rope_sin float32 [n, n_rot]        position, computed as ggml does (float32 cumulative theta)
    mask     float32 [n, total]        0 where a row may attend, -inf elsewhere (causal)
    past_k.i / past_v.i   kv [n_head_kv, past, head_dim]     for each layer i of the shard
 -> hidden_out float32 [n, n_embd]     (tail shards: logits float32 [n, n_vocab])
    present_k.i / present_v.i   kv [n_head_kv, total, head_dim]

The arithmetic follows llama.cpp's llama graph: RMSNorm * w; Q/K/V; RoPE in ggml's
"normal" mode (consecutive pairs (x[2i], x[2i+1]); GGUF Q/K rows are pre-permuted for it);
GQA (query head h reads kv head h // (n_head / n_head_kv)); softmax(QK^T * scale + mask);
V; output projection; residual; RMSNorm; SwiGLU; residual. Only standard ONNX ops plus
``com.microsoft`` ``MatMulNBits`` (the quantized weights); the model passes onnx.checker. Where llama.cpp rounds to fp16
(an f16 KV cache: K, V, and the Q and softmax rows multiplied with them; activations fed to
F16 weights) the graph rounds too (Cast to float16 and back), which keeps ONNX Runtime's
hidden states within ~1e-6 of llama.cpp's for float weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edge_agent.runtime.engine import UnsupportedModelError
from edge_agent.runtime.onnx_weights import QuantWeight, load_matrix, load_vector

GRAPH_VERSION = 3
OPSET = 18
_LAYER_TENSORS = {
    "attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
    "ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight",
    "attn_q.bias", "attn_k.bias", "attn_v.bias", "attn_output.bias",
}  # fmt: skip


@dataclass(frozen=True)
class GraphSpec:
    """Everything (besides the weights) that decides the graph; part of its cache key."""

    start: int
    end: int
    role: str  # head | middle | tail | full
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_rot: int
    eps: float
    kv_f16: bool  # llama.cpp's f16 KV cache: round K, V (and Q, softmax rows) to fp16
    accuracy_level: int = 4  # MatMulNBits: 4 = int8 activations (llama.cpp does the same)

    @property
    def takes_tokens(self) -> bool:
        return self.role in ("head", "full")

    @property
    def gives_logits(self) -> bool:
        return self.role in ("tail", "full")


class _Builder:
    def __init__(self, spec: GraphSpec):
        self.spec = spec
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0
        self._consts: dict[tuple, str] = {}

    def op(self, op_type: str, *inputs: str, domain: str = "", out: str | None = None, **attrs) -> str:
        self._n += 1
        name = out or f"{op_type.lower()}_{self._n}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [name], name=f"n{self._n}_{op_type}", domain=domain, **attrs))
        return name

    def init(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def ints(self, *values: int) -> str:
        key = ("i64",) + values
        if key not in self._consts:
            self._consts[key] = self.init(f"const_i64_{len(self._consts)}", np.array(values, dtype=np.int64))
        return self._consts[key]

    def scalar(self, value: float) -> str:
        key = ("f32", float(value))
        if key not in self._consts:
            self._consts[key] = self.init(f"const_f32_{len(self._consts)}", np.array(value, dtype=np.float32))
        return self._consts[key]

    # -- arithmetic blocks -------------------------------------------------------------
    def round_f16(self, x: str) -> str:
        return self.op("Cast", self.op("Cast", x, to=TensorProto.FLOAT16), to=TensorProto.FLOAT)

    def rms_norm(self, x: str, weight: np.ndarray, name: str) -> str:
        """x / sqrt(mean(x^2) + eps) * w in standard ops, in the exact pattern ORT fuses into
        one SimplifiedLayerNormalization kernel (Pow, ReduceMean, Add, Sqrt, Div, Mul)."""
        ms = self.op("ReduceMean", self.op("Pow", x, self.scalar(2.0)), self.ints(-1), keepdims=1)
        y = self.op("Div", x, self.op("Sqrt", self.op("Add", ms, self.scalar(self.spec.eps))))
        return self.op("Mul", y, self.init(name, weight))

    def linear(self, x: str, tensors: list, name: str, biases: list | None = None) -> list[str]:
        """x @ W^T for each GGUF matrix; matrices of one layout (Q/K/V, gate/up) share one kernel call.

        Block formats run on MatMulNBits, float ones on MatMul; the outputs are split back.
        """
        ws = [load_matrix(t) for t in tensors]
        sizes = [int(t.shape[1]) for t in tensors]
        k = int(tensors[0].shape[0])
        quant = all(isinstance(w, QuantWeight) for w in ws)
        same = len({(w.bits, w.block) if isinstance(w, QuantWeight) else t.tensor_type.name for w, t in zip(ws, tensors)}) == 1
        if len(ws) > 1 and not same:
            outs = [self.linear(x, [t], f"{name}{j}", None if biases is None else [biases[j]])[0] for j, t in enumerate(tensors)]
            return outs
        if quant:
            w = ws[0] if len(ws) == 1 else _concat_quant(ws)
            y = self.op(
                "MatMulNBits", x, self.init(f"{name}.q", w.packed()), self.init(f"{name}.scales", w.scales.reshape(-1)),
                domain="com.microsoft", K=k, N=sum(sizes), bits=w.bits, block_size=w.block, accuracy_level=self.spec.accuracy_level,
            )  # fmt: skip
            if w.mins is not None:  # + blocksum(x) @ mins^T: the asymmetric part, exact and small
                blocks = self.op("Reshape", x, self.ints(0, k // w.block, w.block))
                sums = self.op("ReduceSum", blocks, self.ints(-1), keepdims=0)
                y = self.op("Add", y, self.op("MatMul", sums, self.init(f"{name}.mins", w.mins.T.copy())))
        else:
            if tensors[0].tensor_type.name == "F16":  # llama.cpp feeds F16 weights fp16 activations
                x = self.round_f16(x)
            y = self.op("MatMul", x, self.init(f"{name}.w", np.concatenate(ws, axis=0).T.copy()))
        if biases is not None and any(bb is not None for bb in biases):
            vec = [load_vector(bb) if bb is not None else np.zeros(n, np.float32) for bb, n in zip(biases, sizes)]
            y = self.op("Add", y, self.init(f"{name}.b", np.concatenate(vec)))
        return [y] if len(sizes) == 1 else self.split(y, sizes, axis=-1)

    def rope(self, x: str, heads: int, cos: str, sin: str) -> str:
        """ggml "normal" RoPE on [n, heads, head_dim]: rotate pairs (x[2i], x[2i+1]) of the first n_rot dims.

        With cos = (c0, c0, c1, c1, ..) and sin = (-s0, s0, -s1, s1, ..) fed by the engine,
        x * cos + swap_pairs(x) * sin gives ggml's x0*c - x1*s, x0*s + x1*c bit for bit.
        """
        s = self.spec
        rest = None
        if s.n_rot < s.head_dim:  # only the first n_rot dims of a head rotate
            x, rest = self.split(x, [s.n_rot, s.head_dim - s.n_rot], axis=2)
        pairs = self.op("Reshape", x, self.ints(0, heads, s.n_rot // 2, 2))
        swapped = self.op("Slice", pairs, self.ints(-1), self.ints(-(2**63)), self.ints(3), self.ints(-1))
        swapped = self.op("Reshape", swapped, self.ints(0, heads, s.n_rot))
        y = self.op("Add", self.op("Mul", x, cos), self.op("Mul", swapped, sin))
        return y if rest is None else self.op("Concat", y, rest, axis=2)

    def split(self, x: str, sizes: list[int], axis: int) -> list[str]:
        self._n += 1
        outs = [f"split_{self._n}_{j}" for j in range(len(sizes))]
        self.nodes.append(helper.make_node("Split", [x, self.ints(*sizes)], outs, name=f"n{self._n}_Split", axis=axis))
        return outs


def build_model(reader, spec: GraphSpec) -> onnx.ModelProto:
    """The ONNX model of layers [spec.start, spec.end) of the GGUF model read by ``reader``."""
    tensors = {t.name: t for t in reader.tensors}
    for name in tensors:
        if name.startswith("blk.") and name.split(".", 2)[2] not in _LAYER_TENSORS:
            raise UnsupportedModelError(f"tensor {name!r} is not part of the llama layer the ONNX backend builds")
    if "rope_freqs.weight" in tensors:
        raise UnsupportedModelError("rope frequency factors (llama 3.1 style) are not supported by the ONNX backend")
    s = spec
    b = _Builder(s)
    kv_type = TensorProto.FLOAT16 if s.kv_f16 else TensorProto.FLOAT
    inputs, outputs = [], []
    if s.takes_tokens:
        inputs.append(helper.make_tensor_value_info("tokens", TensorProto.INT64, ["n"]))
        x = b.op("Gather", b.init("token_embd", _embedding(tensors["token_embd.weight"])), "tokens", axis=0)
    else:
        inputs.append(helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["n", s.n_embd]))
        x = "hidden"
    inputs += [
        helper.make_tensor_value_info("rope_cos", TensorProto.FLOAT, ["n", s.n_rot]),
        helper.make_tensor_value_info("rope_sin", TensorProto.FLOAT, ["n", s.n_rot]),
        helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["n", "total"]),
    ]
    cos = b.op("Unsqueeze", "rope_cos", b.ints(1))  # [n, 1, n_rot]
    sin = b.op("Unsqueeze", "rope_sin", b.ints(1))
    scale = b.scalar(1.0 / float(np.sqrt(s.head_dim)))
    for i, layer in enumerate(range(s.start, s.end)):
        p = f"blk.{layer}."
        t = lambda name: tensors[p + name]  # noqa: E731
        opt = lambda name: tensors.get(p + name)  # noqa: E731
        for kind in ("k", "v"):
            inputs.append(helper.make_tensor_value_info(f"past_{kind}.{i}", kv_type, [s.n_head_kv, "past", s.head_dim]))
            outputs.append(helper.make_tensor_value_info(f"present_{kind}.{i}", kv_type, [s.n_head_kv, "total", s.head_dim]))
        h = b.rms_norm(x, load_vector(t("attn_norm.weight")), f"{p}attn_norm")
        q, k, v = b.linear(h, [t(f"attn_{c}.weight") for c in "qkv"], f"{p}attn_qkv", [opt(f"attn_{c}.bias") for c in "qkv"])
        q = b.rope(b.op("Reshape", q, b.ints(0, s.n_head, s.head_dim)), s.n_head, cos, sin)
        k = b.rope(b.op("Reshape", k, b.ints(0, s.n_head_kv, s.head_dim)), s.n_head_kv, cos, sin)
        v = b.op("Reshape", v, b.ints(0, s.n_head_kv, s.head_dim))
        pk, pv = [
            b.op("Concat", f"past_{kind}.{i}", b.op("Cast", b.op("Transpose", y, perm=[1, 0, 2]), to=kv_type), axis=1, out=f"present_{kind}.{i}")
            for kind, y in (("k", k), ("v", v))
        ]  # fmt: skip
        if s.kv_f16:
            q = b.round_f16(q)
            pk, pv = b.op("Cast", pk, to=TensorProto.FLOAT), b.op("Cast", pv, to=TensorProto.FLOAT)
        # [n, H, D] -> [Hkv, g*n, D]: head h = kv * g + j reads kv head h // g
        qt = b.op("Reshape", b.op("Transpose", q, perm=[1, 0, 2]), b.ints(s.n_head_kv, -1, s.head_dim))
        scores = b.op("Mul", b.op("MatMul", qt, b.op("Transpose", pk, perm=[0, 2, 1])), scale)
        scores = b.op("Add", b.op("Reshape", scores, b.ints(s.n_head, -1, 0)), "mask")  # [H, n, total] + [n, total]
        probs = b.op("Softmax", scores, axis=-1)
        if s.kv_f16:
            probs = b.round_f16(probs)
        att = b.op("MatMul", b.op("Reshape", probs, b.ints(s.n_head_kv, -1, 0)), pv)  # [Hkv, g*n, D]
        att = b.op("Transpose", b.op("Reshape", att, b.ints(s.n_head, -1, s.head_dim)), perm=[1, 0, 2])
        att = b.op("Reshape", att, b.ints(0, s.n_head * s.head_dim))
        x = b.op("Add", x, b.linear(att, [t("attn_output.weight")], f"{p}attn_output", [opt("attn_output.bias")])[0])
        h = b.rms_norm(x, load_vector(t("ffn_norm.weight")), f"{p}ffn_norm")
        gate, up = b.linear(h, [t("ffn_gate.weight"), t("ffn_up.weight")], f"{p}ffn_gate_up")
        act = b.op("Mul", b.op("Mul", gate, b.op("Sigmoid", gate)), up)
        x = b.op("Add", x, b.linear(act, [t("ffn_down.weight")], f"{p}ffn_down")[0])
    if s.gives_logits:
        h = b.rms_norm(x, load_vector(tensors["output_norm.weight"]), "output_norm")
        head = tensors.get("output.weight") or tensors["token_embd.weight"]
        b.op("Identity", b.linear(h, [head], "output")[0], out="logits")
        outputs.insert(0, helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", int(head.shape[1])]))
    else:
        b.op("Identity", x, out="hidden_out")
        outputs.insert(0, helper.make_tensor_value_info("hidden_out", TensorProto.FLOAT, ["n", s.n_embd]))
    graph = helper.make_graph(b.nodes, f"llama_layers_{s.start}_{s.end}", inputs, outputs, b.inits)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)], producer_name="edge-agent"
    )
    model.ir_version = 9
    return model


def _concat_quant(ws: list[QuantWeight]) -> QuantWeight:
    """Stack matrices of one block layout along N (a missing min is a zero min)."""
    mins = None
    if any(w.mins is not None for w in ws):
        mins = np.concatenate([w.mins if w.mins is not None else np.zeros_like(w.scales) for w in ws])
    return QuantWeight(np.concatenate([w.q for w in ws]), ws[0].bits, ws[0].block, np.concatenate([w.scales for w in ws]), mins)


def _embedding(tensor) -> np.ndarray:
    w = load_matrix(tensor)
    return w.dequantize() if isinstance(w, QuantWeight) else w


def rope_tables(positions: np.ndarray, n_rot: int, freq_base: float, freq_scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """The graph's rope_cos/rope_sin [n, n_rot]: ggml's theta_i = p * base^(-2i/n_rot), float32 cumulative."""
    theta_scale = np.float32(np.power(float(np.float32(freq_base)), float(np.float32(-2.0) / np.float32(n_rot))))
    theta = positions.astype(np.float32)
    cols = []
    for _ in range(n_rot // 2):
        cols.append(theta * np.float32(freq_scale))
        theta = (theta * theta_scale).astype(np.float32)
    t = np.stack(cols, axis=1).astype(np.float64)
    cos, sin = np.cos(t).astype(np.float32), np.sin(t).astype(np.float32)
    return np.repeat(cos, 2, axis=1), np.stack([-sin, sin], axis=2).reshape(len(positions), n_rot)
