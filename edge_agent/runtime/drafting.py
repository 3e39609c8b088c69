"""Draft tokens for speculative decoding: from the context itself, or from a small model.

Prompt lookup (llama.cpp's lookup decoding, Hugging Face's ``prompt_lookup_num_tokens``):
when the text so far ends with an n-gram that occurred earlier, guess that what followed it
then follows it again. Summaries, edits, code and quotes repeat their input, so guesses are
often right there, and a wrong guess costs only rows that the verifying pass throws away.

When the user gives a small model with the same vocabulary (``--draft-model``), it drafts
where the context has no match (``ModelDrafter``), run whole on the client.

The swarm verifies ``[last token, draft 1 .. draft k]`` in one pass through every hop, and
greedy sampling keeps the drafts up to the first one it would not have chosen itself
(``generation.Decoder.advance_drafts``), so the output is that of one-token steps.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from edge_agent.runtime.engine import EngineError, StepInput


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


class DraftModelError(EngineError):
    """The draft model cannot draft for this model (another vocabulary)."""


class ModelDrafter:
    """Drafts from a small model with the same vocabulary, run whole on this device (e.g.
    SmolLM2-135M for a larger SmolLM2): greedy tokens of its own, one decode each. Its
    arithmetic never reaches the output (the swarm verifies every draft), so its settings
    need not match anyone's. Per request it keeps its cache in step with the context,
    rewinding to the longest prefix it still shares."""

    def __init__(self, engine, n_vocab: int):
        if engine.info.n_vocab != n_vocab:
            engine.close()
            raise DraftModelError(f"the draft model has {engine.info.n_vocab} tokens, the model {n_vocab}: "
                                  "--draft-model needs a model with the same vocabulary (the same family)")
        self.engine = engine
        self._held: dict[str, list[int]] = {}  # request -> tokens in the draft model's cache

    @classmethod
    def load(cls, path, options, n_vocab: int) -> "ModelDrafter":
        import dataclasses
        from pathlib import Path

        from edge_agent.runtime.llamacpp import LlamaCppEngine
        from edge_agent.runtime.shards import inspect_model

        if not Path(path).is_file():
            raise DraftModelError(f"draft model {path} not found")
        options = dataclasses.replace(options, batch_decode="off")  # one request per decode: nothing to measure
        return cls(LlamaCppEngine.from_model(path, 0, inspect_model(path, with_hash=False).n_layer, options), n_vocab)

    def draft(self, request_id: str, context: Sequence[int], limit: int) -> list[int]:
        """Up to ``limit`` greedy tokens after ``context`` (none if the draft model is full)."""
        if limit <= 0 or not context:
            return []
        held = self._held.get(request_id, [])
        common = 0
        while common < min(len(held), len(context) - 1) and held[common] == context[common]:
            common += 1  # the last context token is always fed: its logits give the first draft
        try:
            self.engine.truncate(request_id, common)
            logits = self.engine.forward([StepInput(request_id, common, np.asarray(context[common:], np.int32))])[0].data
            out: list[int] = []
            while True:
                out.append(int(np.argmax(logits)))
                if len(out) == limit:
                    break
                step = StepInput(request_id, len(context) + len(out) - 1, np.asarray(out[-1:], np.int32))
                logits = self.engine.forward([step])[0].data
        except EngineError:  # context or slots exhausted: draft nothing, start afresh next time
            self.end(request_id)
            return []
        self._held[request_id] = [*context, *out[:-1]]
        return out

    def end(self, request_id: str) -> None:
        self.engine.end_request(request_id)
        self._held.pop(request_id, None)

    def close(self) -> None:
        self.engine.close()
