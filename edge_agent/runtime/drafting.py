"""Draft tokens for speculative decoding, from the context itself (no second model).

Prompt lookup (llama.cpp's lookup decoding, Hugging Face's ``prompt_lookup_num_tokens``):
when the text so far ends with an n-gram that occurred earlier, guess that what followed it
then follows it again. Summaries, edits, code and quotes repeat their input, so guesses are
often right there, and a wrong guess costs only rows that the verifying pass throws away.

The swarm verifies ``[last token, draft 1 .. draft k]`` in one pass through every hop, and
greedy sampling keeps the drafts up to the first one it would not have chosen itself
(``generation.Decoder.advance_drafts``), so the output is that of one-token steps.
"""

from __future__ import annotations

from typing import Sequence


class PromptLookup:
    """An index of the context's n-grams (n = ``max_ngram`` down to ``min_ngram``), each
    mapped to the most recent earlier position it started at, updated as tokens arrive:
    drafting costs a few dict lookups per token, not a scan of the context."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError("need 1 <= min_ngram <= max_ngram")
        self.ngrams = range(max_ngram, min_ngram - 1, -1)
        self.tokens: list[int] = []
        self._index: dict[tuple[int, ...], int] = {}  # n-gram -> start of its latest occurrence with a successor

    def extend(self, tokens: Sequence[int]) -> None:
        for t in tokens:
            self.tokens.append(int(t))
            end = len(self.tokens) - 1  # the n-grams ending just before this token now have a successor
            for n in self.ngrams:
                if end - n >= 0:
                    self._index[tuple(self.tokens[end - n:end])] = end - n

    def draft(self, limit: int) -> list[int]:
        """Up to ``limit`` tokens that followed the longest n-gram the context ends with."""
        if limit <= 0:
            return []
        for n in self.ngrams:
            if len(self.tokens) < n:
                continue
            start = self._index.get(tuple(self.tokens[-n:]))
            if start is not None:
                return self.tokens[start + n:start + n + limit]
        return []
