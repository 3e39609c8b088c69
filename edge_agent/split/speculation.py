"""The client's speculative decoding: what each step asks of the hops, and what to feed next.

One pass feeds ``[last token, draft 1 .. draft k]`` through the head, every hop and the
tail at once, so a latency-bound path pays its round trips once for up to k + 1 tokens.
Drafts come from the context (``runtime.drafting.PromptLookup``); greedy sampling keeps
them up to the first it would not have chosen (``Decoder.advance_drafts``). Two step flags
keep every cache exact:

- ``REWIND`` on every step after the first of a speculating client: a cache drops what it
  holds from the step's position on, i.e. the rows of drafts the last pass rejected;
- ``DRAFT`` on decode steps: each row's result must equal a one-row decode, which an
  engine guarantees by running the rows in as few passes as its kernels allow
  (``runtime/exactness.py``).

Speculation is for greedy requests only: sampled ones would need rejection sampling to
keep their distribution, which is not built; they run one token per step.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from edge_agent.runtime.drafting import PromptLookup
from edge_agent.transport import Flag


class Speculation:
    """One request's speculation: ``max_draft`` 0 turns drafting off (flags still rewind
    when the client speculates: a kept turn's caches may hold rejected drafts)."""

    def __init__(self, max_draft: int, greedy: bool, prompt_tokens: Sequence[int], n_ctx: int):
        self.enabled = max_draft > 0
        self.max_draft = max_draft if greedy else 0
        self.n_ctx = n_ctx
        self.lookup = PromptLookup()
        if self.max_draft:
            self.lookup.extend(prompt_tokens)
        self._seen = 0  # generated tokens already in the lookup index
        self.passes = self.drafted = self.accepted = 0

    def flags(self, pos: int, decoding: bool) -> int:
        if not self.enabled or pos == 0:
            return 0
        return int(Flag.REWIND | (Flag.DRAFT if decoding else 0))

    def next_feed(self, token: np.ndarray | None, decoder, pos: int, drafted: int, accepted: int) -> np.ndarray | None:
        """What to feed at ``pos`` after a step that drafted ``drafted`` tokens and kept ``accepted``."""
        if drafted:
            self.passes += 1
            self.drafted += drafted
            self.accepted += accepted
        if token is None or not self.max_draft:
            return token
        self.lookup.extend(decoder.tokens[self._seen:])
        self._seen = len(decoder.tokens)
        # no draft past max_tokens (the pass could not emit it) or past the context
        limit = min(self.max_draft, decoder.params.max_tokens - len(decoder.tokens) - 1, self.n_ctx - pos - 1)
        drafts = self.lookup.draft(limit)
        return np.concatenate([token, np.asarray(drafts, dtype=np.int32)]) if drafts else token

    def stats(self) -> dict:
        return {"max_draft": self.max_draft, "passes": self.passes, "drafted": self.drafted, "accepted": self.accepted,
                "acceptance": round(self.accepted / self.drafted, 3) if self.drafted else None}
