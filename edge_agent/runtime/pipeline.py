"""One-process pipeline: head -> each middle shard -> tail, all in this process.

It proves the runtime before any network: the same shards a swarm would run, fed the
same arrays, must give exactly the tokens llama.cpp alone gives.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from edge_agent.runtime.engine import EngineOptions, ShardRangeError, StepInput
from edge_agent.runtime.generation import Decoder, GenerationResult
from edge_agent.runtime.sampling import SamplingParams
from edge_agent.runtime.shards import inspect_model, validate_range


def plan_local_ranges(n_layer: int, split: tuple[int, int] = (1, 1), shards: Sequence[tuple[int, int]] | None = None) -> list[tuple[int, int]]:
    """Layer ranges of head, middles and tail: [0,k), the given middle shards (or one), [L-m, L).

    Head and tail follow the swarm's privacy split (``split.policy``), checked in one place."""
    from edge_agent.split.policy import PolicyError, PrivacyPolicy

    k, m = split
    try:
        PrivacyPolicy(k, m).validate(n_layer)
    except PolicyError as exc:
        raise ShardRangeError(f"--split {k}:{m}: {exc}") from None
    mids = list(shards) if shards else ([(k, n_layer - m)] if k < n_layer - m else [])
    expect = k
    for a, b in mids:
        validate_range(a, b, n_layer)
        if a != expect:
            raise ShardRangeError(f"shards must cover layers {k}:{n_layer - m} contiguously; expected a shard starting at {expect}, got {a}:{b}")
        expect = b
    if expect != n_layer - m:
        raise ShardRangeError(f"shards end at layer {expect}, but the tail starts at {n_layer - m}")
    return [(0, k), *mids, (n_layer - m, n_layer)]


class LocalPipeline:
    def __init__(self, model_path: Path | str, split=(1, 1), shards=None, options: EngineOptions | None = None, backend: str = "llamacpp", cache_dir=None):
        from edge_agent.runtime.backends import load_engine
        from edge_agent.runtime.tokenizer import Tokenizer

        self.model_path = Path(model_path)
        info = inspect_model(self.model_path)
        self.ranges = plan_local_ranges(info.n_layer, split, shards)
        self.options = options or EngineOptions()
        self.tokenizer = Tokenizer(self.model_path)
        self.stages = []
        for i, (a, b) in enumerate(self.ranges):
            # head and tail always run on llama.cpp: they hold the tokenizer and LM head
            stage_backend = backend if 0 < i < len(self.ranges) - 1 else "llamacpp"
            self.stages.append(load_engine(stage_backend, self.model_path, a, b, self.options, cache_dir))
        self.stage_ms = [0.0] * len(self.stages)

    def step(self, request_id: str, pos: int, tokens: np.ndarray) -> np.ndarray:
        """Run tokens at ``pos`` through every stage; returns the last row's logits."""
        data: np.ndarray = tokens
        for i, stage in enumerate(self.stages):
            t0 = time.perf_counter()
            data = stage.forward([StepInput(request_id, pos, data)])[0].data
            self.stage_ms[i] += (time.perf_counter() - t0) * 1000.0
        return data

    def stream(self, prompt_tokens: list[int], params: SamplingParams, on_token: Callable[[int, str], None] | None = None) -> GenerationResult:
        request_id = uuid.uuid4().hex
        decoder = Decoder(self.tokenizer, params, prompt_tokens)
        self.stage_ms = [0.0] * len(self.stages)
        pos = 0
        feed = decoder.first_feed()
        try:
            while feed is not None:
                logits = self.step(request_id, pos, feed)
                pos += feed.shape[0]
                feed = decoder.advance(logits, on_token)
        finally:
            for stage in self.stages:
                stage.end_request(request_id)
        per_shard = [
            {"range": f"{a}:{b}", "backend": type(s).__name__, "ms": round(ms, 3)}
            for (a, b), s, ms in zip(self.ranges, self.stages, self.stage_ms)
        ]
        return decoder.result({"per_shard_ms": per_shard})

    def generate(self, prompt: str, params: SamplingParams, chat: bool = False, on_token=None) -> GenerationResult:
        return self.stream(self.prompt_tokens(prompt, chat), params, on_token)

    def prompt_tokens(self, prompt: str, chat: bool = False) -> list[int]:
        return self.tokenizer.prompt_tokens(prompt, chat)

    def close(self) -> None:
        for s in self.stages:
            s.close()
        self.tokenizer.close()
