"""The client's speculative decoding: what each step asks of the hops, and what to feed next.

One pass feeds ``[last token, draft 1 .. draft k]`` through the head, every hop and the
tail at once, so a latency-bound path pays its round trips once for up to k + 1 tokens.
Drafts come from the context (``runtime.drafting.PromptLookup``) or, where it has no match,
from a small model the user gives (``ModelDrafter``, ``--draft-model``); greedy sampling keeps
them up to the first it would not have chosen (``Decoder.advance_drafts``). Two step flags
keep every cache exact:

- ``REWIND`` on every step after the first of a speculating client: a cache drops what it
  holds from the step's position on, i.e. the rows of drafts the last pass rejected;
- ``DRAFT`` on decode steps: each row's result must equal a one-row decode, which an
  engine guarantees by running the rows in as few passes as its kernels allow
  (``runtime/exactness.py``).

How many drafts a pass carries is a bet: a row costs compute on every hop (little where
an engine verifies drafts in one pass, a whole decode row where its kernels need one pass
per row), and it pays only if accepted. ``Speculation`` measures both as it goes, the
step time by rows and how long the drafts' runs of accepted tokens are, and drafts the
number of tokens that maximises the expected tokens per second; after a run of passes
without drafts it tries again, since text can turn repetitive.

Speculation is for greedy requests only: sampled ones would need rejection sampling to
keep their distribution, which is not built; they run one token per step.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Sequence

import numpy as np

from edge_agent.runtime.drafting import ModelDrafter, PromptLookup
from edge_agent.transport import Flag


class Speculation:
    """One request's speculation: ``max_draft`` 0 when the request does not speculate (no
    flags: its path may hold nodes that refuse them, ``split.needs``); a sampled turn of a
    speculating request drafts nothing but still rewinds (a kept turn's caches may hold
    rejected drafts)."""

    def __init__(self, max_draft: int, greedy: bool, prompt_tokens: Sequence[int], n_ctx: int,
                 model: ModelDrafter | None = None, request_id: str = ""):
        self.enabled = max_draft > 0
        self.max_draft = max_draft if greedy else 0
        self.n_ctx = n_ctx
        self.model, self.request_id = model, request_id  # drafts where the context has no match
        self.draft_s: float | None = None  # the draft model's time per drafted token (moving average)
        self.lookup = PromptLookup()
        if self.max_draft:
            self.lookup.extend(prompt_tokens)
        self._seen = 0  # generated tokens already in the lookup index
        self.passes = self.drafted = self.accepted = self.rejected = 0
        self.step_s: float | None = None  # a one-row step, whole path
        self.row_s: float | None = None  # what each further row adds to a step
        self._timings: deque[tuple[int, float]] = deque(maxlen=32)  # (rows, seconds) of the latest steps
        self._idle = 0  # decode steps since the last draft
        self._model_used = False
        self._drafting: asyncio.Future | None = None  # the draft model's call in flight

    def flags(self, pos: int, decoding: bool) -> int:
        if not self.enabled or pos == 0:
            return 0
        return int(Flag.REWIND | (Flag.DRAFT if decoding else 0))

    def observe(self, rows: int, seconds: float) -> None:
        """A decode step of ``rows`` rows took ``seconds`` through head, hops and tail: fit
        ``seconds = step_s + (rows - 1) * row_s`` by least squares over the latest steps (one
        slow step, or a stale first one, moves a fit less than a moving average)."""
        self._timings.append((rows - 1, seconds))
        xs, ys = [x for x, _ in self._timings], [y for _, y in self._timings]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        var = sum((x - mx) ** 2 for x in xs)
        if var == 0:
            if mx == 0:
                self.step_s = my
            return
        b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var
        self.row_s = max(0.0, b)
        self.step_s = max(my - self.row_s * mx, 1e-6)

    async def next_feed(self, token: np.ndarray | None, decoder, pos: int, drafted: int, accepted: int) -> np.ndarray | None:
        """What to feed at ``pos`` after a step that drafted ``drafted`` tokens and kept ``accepted``."""
        if drafted:
            self.passes += 1
            self.drafted += drafted
            self.accepted += accepted
            self.rejected += token is not None and accepted < drafted  # a pass cut by a stop rejected nothing
        if token is None or not self.max_draft:
            return token
        self.lookup.extend(decoder.tokens[self._seen:])
        self._seen = len(decoder.tokens)
        # no draft past max_tokens (the pass could not emit it) or past the context
        room = min(decoder.params.max_tokens - len(decoder.tokens) - 1, self.n_ctx - pos - 1)
        drafts = self.lookup.draft(min(self.worth_drafting(0.0), room))  # looking up costs nothing
        limit = min(self.worth_drafting(self.draft_s or 0.0), room)
        if not drafts and self.model is not None and limit > 0:
            first = self.draft_s is None and not self._model_used  # its first call also reads the whole prompt
            self._model_used = True
            t0 = time.perf_counter()
            # shielded: a cancelled request's draft runs to its end, then close() frees its slot
            self._drafting = asyncio.ensure_future(asyncio.to_thread(self.model.draft, self.request_id,
                                                                     decoder.prompt_tokens + decoder.tokens, limit))
            drafts = await asyncio.shield(self._drafting)
            if drafts and not first:
                self.draft_s = _average(self.draft_s, (time.perf_counter() - t0) / len(drafts))
        self._idle = 0 if drafts else self._idle + 1
        return np.concatenate([token, np.asarray(drafts, dtype=np.int32)]) if drafts else token

    def worth_drafting(self, draft_s: float = 0.0) -> int:
        """Drafts per pass that maximise expected tokens per second, when drafting one costs
        ``draft_s``. Accepted runs are taken as geometric: each draft continues the run with
        probability ``q``, estimated from the runs seen (accepted drafts over accepted plus
        rejections); a pass of k drafts then yields ``(1 - q^(k+1)) / (1 - q)`` tokens and
        costs ``step_s + k * (row_s + draft_s)``."""
        if self.step_s is None:  # measure a one-row step first
            return 0
        if self.row_s is None:  # then a pass of few drafts, to learn what a row costs
            return min(self.max_draft, 2)
        row = (self.row_s or 0.0) + draft_s
        if row >= self.step_s:  # a row costs a whole step: no acceptance rate could pay for a draft
            return 0
        if self._idle >= 16:  # time to look again, with a few drafts: the text may have turned repetitive
            return min(self.max_draft, 3)
        q = (self.accepted + 1) / (self.accepted + self.rejected + 2)
        best, best_rate = 0, 1.0 / self.step_s
        for k in range(1, self.max_draft + 1):
            rate = (1 - q ** (k + 1)) / (1 - q) / (self.step_s + k * row)
            if rate > best_rate:
                best, best_rate = k, rate
        return best

    async def close(self) -> None:
        """Free the request in the draft model (off the event loop: a draft may be running)."""
        if self.model is not None:
            if self._drafting is not None:
                await asyncio.wait([self._drafting])
            await asyncio.to_thread(self.model.end, self.request_id)

    def stats(self) -> dict:
        return {"max_draft": self.max_draft, "passes": self.passes, "drafted": self.drafted, "accepted": self.accepted,
                "acceptance": round(self.accepted / self.drafted, 3) if self.drafted else None,
                "step_ms": round(self.step_s * 1000, 3) if self.step_s is not None else None,
                "row_ms": round(self.row_s * 1000, 3) if self.row_s is not None else None}


def _average(old: float | None, sample: float) -> float:
    """A moving average that starts at its first sample."""
    return sample if old is None else 0.7 * old + 0.3 * sample
