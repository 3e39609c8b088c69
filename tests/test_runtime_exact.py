"""Token-exactness of the one-process pipeline against llama.cpp alone (real llama.cpp, no mocks)."""

from __future__ import annotations

import pytest

from conftest import N_CTX, THREADS, reference_tokens
from edge_agent.runtime.engine import EngineOptions
from edge_agent.runtime.pipeline import LocalPipeline
from edge_agent.runtime.sampling import SamplingParams

OPTS = EngineOptions(n_ctx_per_request=N_CTX, max_requests=2, n_threads=THREADS)


def pipeline_tokens(model, split, shards, prompt, n):
    pipe = LocalPipeline(model, split, shards, OPTS)
    try:
        toks = pipe.prompt_tokens(prompt)
        res = pipe.stream(toks, SamplingParams(max_tokens=n))
        return toks, res.token_ids
    finally:
        pipe.close()


@pytest.mark.parametrize(
    "split,shards",
    [((1, 1), None), ((2, 1), [(2, 3), (3, 4)]), ((1, 2), [(1, 2), (2, 3)]), ((4, 1), None)],
)
def test_tiny_matches_llama_cpp(tiny_model, split, shards):
    prompt_tokens, got = pipeline_tokens(tiny_model, split, shards, "Once upon a time", 48)
    assert got == reference_tokens(tiny_model, prompt_tokens, 48)
    assert len(got) == 48  # random models never pick EOS greedily (synthetic.py): a full-length comparison


@pytest.mark.slow
@pytest.mark.parametrize("split,shards", [((1, 1), None), ((3, 2), [(3, 12), (12, 20), (20, 28)])])
def test_smollm_matches_llama_cpp(smollm_path, split, shards):
    prompt_tokens, got = pipeline_tokens(smollm_path, split, shards, "The capital of France is", 24)
    want = reference_tokens(smollm_path, prompt_tokens, 24)
    assert got == want


@pytest.mark.parametrize("ftype", ["f32", "q8_0", "q4_0", "q4_k_m"])
def test_random_models_match_llama_cpp(random_models, ftype):
    model = random_models(ftype)
    prompt_tokens, got = pipeline_tokens(model, (2, 1), [(2, 4), (4, 5)], "hello world abc", 32)
    assert got == reference_tokens(model, prompt_tokens, 32)
    assert len(got) == 32


def test_long_prompt_crosses_batch_boundary(random_models):
    """A prompt longer than n_batch is decoded in the same chunks as llama.cpp's."""
    model = random_models("q8_0")
    opts = EngineOptions(n_ctx_per_request=512, max_requests=1, n_threads=THREADS, n_batch=64, n_ubatch=64)
    pipe = LocalPipeline(model, (1, 1), [(1, 3), (3, 5)], opts)
    try:
        prompt_tokens = [1] + [(i * 37) % 900 + 100 for i in range(150)]
        got = pipe.stream(prompt_tokens, SamplingParams(max_tokens=8)).token_ids
    finally:
        pipe.close()
    assert got == reference_tokens(model, prompt_tokens, 8, n_ctx=512, n_batch=64)
    assert len(got) == 8


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_other_llama_family_archs_match(random_models, arch):
    model = random_models("q8_0", arch=arch)
    prompt_tokens, got = pipeline_tokens(model, (1, 2), [(1, 3), (3, 4)], "hello world", 24)
    assert got == reference_tokens(model, prompt_tokens, 24)
    assert len(got) == 24
