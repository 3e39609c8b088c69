"""The token loop's bookkeeping, shared by the one-process pipeline and the swarm client.

``Decoder`` turns logits into tokens (sampling, EOS, stop strings, max tokens) and keeps
the timing numbers users expect (TTFT, TBT, tokens/s). It does no I/O and runs no
model: whoever drives it feeds it the logits of each step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from edge_agent.runtime.sampling import Sampler, SamplingParams, find_stop


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (EOS or stop string) or "length"
    stats: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "prompt_tokens": self.prompt_tokens,
            "finish_reason": self.finish_reason,
            "stats": self.stats,
        }


class Decoder:
    def __init__(self, tokenizer, params: SamplingParams, prompt_tokens: list[int]):
        if not prompt_tokens:
            raise ValueError("the prompt is empty after tokenization")
        self.tokenizer = tokenizer
        self.params = params
        self.sampler = Sampler(params)
        self.prompt_tokens = list(prompt_tokens)
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self._t_start = time.perf_counter()
        self._t_tokens: list[float] = []
        self._emitted = 0  # characters of text already handed out by new_text()

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.params.max_tokens == 0

    def feed(self, logits: np.ndarray) -> int | None:
        """Sample the next token; returns it, or None if generation ended on this step."""
        token = self.sampler.sample(logits, self.prompt_tokens + self.tokens)
        self._t_tokens.append(time.perf_counter())
        if self.tokenizer.is_end(token):
            self.finish_reason = "stop"
            return None
        self.tokens.append(token)
        if self.params.stop and find_stop(self.tokenizer.decode(self.tokens), self.params.stop) >= 0:
            self.finish_reason = "stop"
        elif len(self.tokens) >= self.params.max_tokens:
            self.finish_reason = "length"
        return token

    def advance(self, logits: np.ndarray, on_token=None) -> np.ndarray | None:
        """Sample from ``logits``, stream the token, return what to feed next (None: done)."""
        token = self.feed(logits)
        if token is None:
            return None
        if on_token:
            on_token(token, self.new_text())
        return None if self.finished else np.asarray([token], dtype=np.int32)

    def advance_drafts(self, rows: np.ndarray, drafts: Sequence[int], on_token=None) -> tuple[int, np.ndarray | None]:
        """A speculative pass fed ``[last token, *drafts]``; ``rows[i]`` are the logits after its
        i-th token. Samples row by row, as one-token steps would, streaming each token, while
        the sample equals the next draft. Returns (drafts accepted, what to feed next or None):
        the cache positions worth keeping are the pass's first ``accepted + 1``."""
        for i, row in enumerate(rows):
            token = self.feed(row)
            if token is None:
                return i, None
            if on_token:
                on_token(token, self.new_text())
            if self.finished:
                return i, None
            if i >= len(drafts) or token != drafts[i]:
                return i, np.asarray([token], dtype=np.int32)
        raise ValueError("a pass has one row of logits per token fed")

    def first_feed(self) -> np.ndarray | None:
        return None if self.finished else np.asarray(self.prompt_tokens, dtype=np.int32)

    @property
    def text(self) -> str:
        text = self.tokenizer.decode(self.tokens)
        cut = find_stop(text, self.params.stop) if self.params.stop else -1
        return text[:cut] if cut >= 0 else text

    def new_text(self) -> str:
        """Text produced since the last call (for streaming); holds back a partial UTF-8 char."""
        text = self.text
        if not self.finished and text.endswith("\ufffd"):
            text = text[:-1]
        chunk, self._emitted = text[self._emitted :], max(self._emitted, len(text))
        return chunk

    def stats(self) -> dict:
        ts = self._t_tokens
        ttft = (ts[0] - self._t_start) * 1000.0 if ts else None
        gaps = np.diff(ts) * 1000.0 if len(ts) > 1 else np.array([])
        decode_s = ts[-1] - ts[0] if len(ts) > 1 else 0.0
        return {
            "ttft_ms": round(ttft, 3) if ttft is not None else None,
            "tbt_ms": round(float(gaps.mean()), 3) if gaps.size else None,
            "tbt_p50_ms": round(float(np.median(gaps)), 3) if gaps.size else None,
            "tokens_per_s": round((len(ts) - 1) / decode_s, 3) if decode_s > 0 else None,
            "prompt_tokens": len(self.prompt_tokens),
            "completion_tokens": len(self.tokens),
        }

    def result(self, extra_stats: dict | None = None) -> GenerationResult:
        stats = self.stats()
        stats.update(extra_stats or {})
        return GenerationResult(self.text, list(self.tokens), len(self.prompt_tokens), self.finish_reason or "length", stats)
