"""Per-request ordering: the receiver refuses duplicates, gaps and reordering.

Why: a hop must never apply the same step twice or skip one - either would silently corrupt
the KV cache it holds for the request.  The guard is pure logic (no I/O) and bounded: it
tracks at most `max_requests` requests, forgetting the least recently used.
"""

from __future__ import annotations

from collections import OrderedDict

from .errors import SequenceError


class SequenceGuard:
    """Accepts (request_id, seq) only in order: first_seq, first_seq + 1, ...

    Optionally also checks token positions: a frame's `step` must equal the previous frame's
    step + n_positions (`check_step`).
    """

    def __init__(self, first_seq: int = 0, max_requests: int = 4096) -> None:
        self.first_seq = first_seq
        self.max_requests = max_requests
        self._next: OrderedDict[bytes, int] = OrderedDict()
        self._next_step: OrderedDict[bytes, int] = OrderedDict()

    def __len__(self) -> int:
        return len(self._next)

    def check(self, request_id: bytes, seq: int) -> None:
        """Accept `seq` for `request_id` or raise SequenceError saying why (state unchanged)."""
        expected = self._next.get(request_id, self.first_seq)
        if seq == expected:
            self._next[request_id] = seq + 1
            self._next.move_to_end(request_id)
            self._evict(self._next)
            return
        rid = request_id.hex()[:12]
        if seq < expected:
            raise SequenceError(f"request {rid}: duplicate or reordered seq {seq} (expected {expected})")
        raise SequenceError(f"request {rid}: gap, seq {seq} arrived before {expected}")

    def check_step(self, request_id: bytes, step: int, n_positions: int, first_step: int | None = None) -> None:
        """Token positions must be contiguous: step == previous step + previous n_positions.

        The first frame of a request may start anywhere unless `first_step` is given.
        """
        if n_positions < 1:
            raise SequenceError(f"n_positions {n_positions} < 1")
        expected = self._next_step.get(request_id, first_step)
        if expected is not None and step != expected:
            rid = request_id.hex()[:12]
            kind = "duplicate or reordered" if step < expected else "gap at"
            raise SequenceError(f"request {rid}: {kind} step {step} (expected {expected})")
        self._next_step[request_id] = step + n_positions
        self._next_step.move_to_end(request_id)
        self._evict(self._next_step)

    def expected(self, request_id: bytes) -> int:
        return self._next.get(request_id, self.first_seq)

    def forget(self, request_id: bytes) -> None:
        """Drop a finished request (END_REQUEST)."""
        self._next.pop(request_id, None)
        self._next_step.pop(request_id, None)

    def _evict(self, table: OrderedDict[bytes, int]) -> None:
        while len(table) > self.max_requests:
            table.popitem(last=False)
