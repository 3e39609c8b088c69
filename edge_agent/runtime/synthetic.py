"""Random-weight llama GGUF models, for tests and benchmarks of shape and speed.

Timing does not depend on the weights, and token-exactness tests need any model whose
arithmetic runs through the same kernels, so seeded random weights of the right shape
do both. Quantized variants go through llama.cpp's own quantizer.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

FTYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7, "q4_k_m": 15}
EOS_ID = 2


# Common words first, each with all its prefixes (llama.cpp's SentencePiece tokenizer builds
# a word by merging pieces that are in the vocabulary), so that English prompts tokenize
# into whole words and output detokenizes into words: the tokenizer and the sampler see
# realistic ids, not only bytes.
WORDS = (
    "Once upon a time there was little girl named Lily She loved to play in the park and "
    "The capital of France is Paris Write short poem about sea Hi hello world abc dog cat "
    "sun day one big happy he it with his her friend you I"
).split()


def _pieces(words: list[str]) -> list[str]:
    out: dict[str, None] = {}
    for word in words:
        for n in range(1, len(word) + 1):
            out["\u2581" + word[:n]] = None
    return list(out)


def _vocab(n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    types = [2, 3, 3] + [6] * 256
    pieces = _pieces(WORDS)
    seen, i = set(pieces), 0
    while len(pieces) < n_vocab:  # then made-up words, each once
        if "\u2581" + _word(i) not in seen:
            pieces.append("\u2581" + _word(i))
        i += 1
    for piece in pieces[: max(0, n_vocab - len(tokens))]:
        tokens.append(piece)
        types.append(1)
    tokens, types = tokens[:n_vocab], types[:n_vocab]
    # longer pieces score higher, so merges prefer whole words
    scores = [0.0] * 259 + [len(t) - j * 1e-4 for j, t in enumerate(tokens[259:])]
    return tokens, scores, types


def _word(i: int) -> str:
    """The i-th made-up word: a, b, ..., z, aa, ab, ..."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    out = ""
    i += 1
    while i:
        i, r = divmod(i - 1, 26)
        out = letters[r] + out
    return out


def write_random_f32(path: Path, *, n_layer: int, n_embd: int, n_head: int, n_head_kv: int, n_ff: int, n_vocab: int, seed: int, tied: bool,
                     arch: str = "llama") -> None:
    import gguf

    rng = np.random.default_rng(seed)
    head_dim = n_embd // n_head
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"random-{n_layer}x{n_embd}")
    w.add_context_length(4096)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(0)
    tokens, scores, types = _vocab(n_vocab)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(EOS_ID)
    w.add_unk_token_id(0)

    def mat(rows: int, cols: int, scale: float) -> np.ndarray:
        return (rng.standard_normal((rows, cols), dtype=np.float32) * scale).astype(np.float32)

    def norm() -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(n_embd)).astype(np.float32)

    s_in = 1.0 / np.sqrt(n_embd)
    w.add_tensor("token_embd.weight", mat(n_vocab, n_embd, 1.0))
    for i in range(n_layer):
        w.add_tensor(f"blk.{i}.attn_norm.weight", norm())
        w.add_tensor(f"blk.{i}.attn_q.weight", mat(n_embd, n_embd, s_in))
        w.add_tensor(f"blk.{i}.attn_k.weight", mat(n_head_kv * head_dim, n_embd, s_in))
        w.add_tensor(f"blk.{i}.attn_v.weight", mat(n_head_kv * head_dim, n_embd, s_in))
        if arch == "qwen2":  # Qwen2 has Q/K/V biases
            for name, rows in (("q", n_embd), ("k", n_head_kv * head_dim), ("v", n_head_kv * head_dim)):
                w.add_tensor(f"blk.{i}.attn_{name}.bias", (0.1 * rng.standard_normal(rows)).astype(np.float32))
        if arch == "qwen3":  # Qwen3 normalizes Q and K per head
            for name in ("q", "k"):
                w.add_tensor(f"blk.{i}.attn_{name}_norm.weight", (1.0 + 0.1 * rng.standard_normal(head_dim)).astype(np.float32))
        w.add_tensor(f"blk.{i}.attn_output.weight", mat(n_embd, n_embd, s_in))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", norm())
        w.add_tensor(f"blk.{i}.ffn_gate.weight", mat(n_ff, n_embd, s_in))
        w.add_tensor(f"blk.{i}.ffn_up.weight", mat(n_ff, n_embd, s_in))
        w.add_tensor(f"blk.{i}.ffn_down.weight", mat(n_embd, n_ff, 1.0 / np.sqrt(n_ff)))
    w.add_tensor("output_norm.weight", norm())
    if not tied:
        # A zero row for EOS gives it logit 0 while the best of the other random logits is
        # always positive, so greedy decoding never stops early: exactness tests compare
        # full-length outputs, never two empty ones.
        output = mat(n_vocab, n_embd, s_in)
        output[EOS_ID] = 0.0
        w.add_tensor("output.weight", output)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def quantize(src: Path, dst: Path, ftype: str, threads: int = 0) -> None:
    import llama_cpp as lc

    from edge_agent.runtime.llamacpp import init_backend

    init_backend()
    params = lc.llama_model_quantize_default_params()
    params.ftype = FTYPES[ftype]
    params.nthread = threads
    rc = lc.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({ftype}) failed with {rc}")


def make_random_gguf(
    path: Path | str,
    *,
    n_layer: int = 6,
    n_embd: int = 256,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 512,
    n_vocab: int = 1024,
    ftype: str = "f32",
    seed: int = 0,
    tied: bool = False,
    arch: str = "llama",
) -> Path:
    """Write a random llama model to ``path`` (reused if it exists) and return the path."""
    path = Path(path)
    if path.is_file():
        return path
    if ftype not in FTYPES:
        raise ValueError(f"ftype must be one of {', '.join(FTYPES)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = dict(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv, n_ff=n_ff, n_vocab=n_vocab, seed=seed, tied=tied, arch=arch)
    tmp = path.with_suffix(".f32.partial")
    write_random_f32(tmp, **shape)
    if ftype == "f32":
        tmp.rename(path)
    else:
        partial = path.with_suffix(".partial")
        quantize(tmp, partial, ftype)
        tmp.unlink()
        partial.rename(path)
    return path
