"""How far ONNX Runtime's logits stray from llama.cpp's on a real quantized model, per kernel path.

    .venv/bin/python bench/onnx_spread.py [--accuracy-levels 4 1] [--tokens 16]
    PYTHONPATH=/path/to/avx2-only/llama_cpp .venv/bin/python bench/onnx_spread.py   # another ggml build

SmolLM2-135M Q4_1 (the installed model) runs whole on both runtimes, teacher-forced on
llama.cpp's own greedy continuation of a few prompts. For each position it prints what the
ONNX test (tests/test_onnx.py) relies on: llama.cpp's top-2 margin, the largest logit
difference among llama.cpp's top tokens, and the *deficit* of ONNX's choice (how far below
llama.cpp's best logit the token ONNX picks lies; 0 when both pick the same). The test's
tolerance is derived from these numbers on several kernel paths: docs/onnx.md.

Kernel paths: llama.cpp/ggml picks its SIMD kernels at build time (a build with
-DGGML_NATIVE=OFF -DGGML_AVX512=OFF runs the AVX2 ones on any CPU), ONNX Runtime's MLAS picks
at run time from the CPU, and its accuracy level selects int8 (4) or float (1) activations
in MatMulNBits.
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np

from edge_agent.config import packaged_model
from edge_agent.runtime.engine import EngineOptions, StepInput
from edge_agent.runtime.llamacpp import LlamaCppEngine
from edge_agent.runtime.onnx import OnnxEngine
from edge_agent.runtime.tokenizer import Tokenizer

PROMPTS = ("The capital of France is", "Once upon a time", "def fibonacci(n):", "The three primary colors are",
           "Water boils at", "My favourite food is")
TOP = 5  # logits compared among llama.cpp's top tokens (the ones a greedy choice can land on)


def greedy(engine: LlamaCppEngine, prompt: list[int], n: int) -> list[int]:
    feed, pos, out = np.asarray(prompt, dtype=np.int32), 0, []
    for _ in range(n):
        out.append(int(np.argmax(engine.forward([StepInput("g", pos, feed)])[0].data)))
        pos += feed.shape[0]
        feed = np.asarray(out[-1:], dtype=np.int32)
    engine.end_request("g")
    return out


def spread(accuracy_level: int, n_tokens: int, threads: int) -> dict[str, np.ndarray]:
    model = packaged_model()
    opts = EngineOptions(n_ctx_per_request=256, max_requests=2, n_threads=threads, extra={"onnx_accuracy_level": accuracy_level})
    tok = Tokenizer(model)
    margins, top_diffs, deficits, rel_rms = [], [], [], []
    with tempfile.TemporaryDirectory() as cache:
        ox, lc = OnnxEngine.from_model(model, 0, 30, opts, cache), LlamaCppEngine.from_model(model, 0, 30, opts, cache)
        try:
            for i, text in enumerate(PROMPTS):
                prompt = tok.encode(text)
                seq = np.asarray(prompt + greedy(lc, prompt, n_tokens), dtype=np.int32)
                ref = lc.forward([StepInput(f"l{i}", 0, seq, all_logits=True)])[0].data[len(prompt) - 1 : -1]
                got = ox.forward([StepInput(f"o{i}", 0, seq, all_logits=True)])[0].data[len(prompt) - 1 : -1]
                lc.end_request(f"l{i}")
                ox.end_request(f"o{i}")
                top = np.argsort(ref, axis=-1)[:, -TOP:]
                top2 = np.take_along_axis(ref, top[:, -2:], -1)
                margins.append(top2[:, 1] - top2[:, 0])
                top_diffs.append(np.abs(np.take_along_axis(got - ref, top, -1)).max(-1))
                deficits.append(ref.max(-1) - np.take_along_axis(ref, got.argmax(-1)[:, None], -1)[:, 0])
                rel_rms.append(np.sqrt(((got - ref) ** 2).mean(-1) / (ref**2).mean(-1)))
        finally:
            ox.close()
            lc.close()
            tok.close()
    return {"margin": np.concatenate(margins), "top_diff": np.concatenate(top_diffs), "deficit": np.concatenate(deficits),
            "rel_rms": np.concatenate(rel_rms)}


def main() -> None:
    import llama_cpp

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--accuracy-levels", type=int, nargs="+", default=[4, 1])
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    print(f"llama.cpp from {llama_cpp.__file__}; system info: {llama_cpp.llama_print_system_info().decode().strip()}")
    for level in args.accuracy_levels:
        s = spread(level, args.tokens, args.threads)
        d, t = s["deficit"], s["top_diff"]
        flips = d > 0
        print(f"accuracy_level {level}: {len(d)} positions, {flips.sum()} argmax flips; "
              f"top-{TOP} |logit diff| p50 {np.median(t):.3f} p99 {np.quantile(t, 0.99):.3f} max {t.max():.3f}; "
              f"logits rel RMS p50 {np.median(s['rel_rms']):.3f} max {s['rel_rms'].max():.3f}; "
              f"deficit of ONNX's choice max {d.max():.3f}; "
              f"llama.cpp margins at the flips: {np.array2string(s['margin'][flips], precision=3)}")


if __name__ == "__main__":
    main()
