"""Timestamps of one hop's stages, for ``bench/hop_profile.py``'s breakdown.

Off unless ``EDGE_AGENT_HOP_TRACE`` names a file prefix when the process starts: then
every point on the hop path (client send, peer receive, queue, engine thread, reply,
client wake-up) appends ``(stage, key, ns)`` to a list, written to ``<prefix>.<pid>`` as
JSON lines when the process exits. Off, a point costs one global truth test (``if
hoptrace.ON``). The clock is ``time.perf_counter_ns`` (CLOCK_MONOTONIC on Linux, one
clock for every process of the machine), so a client's and its peers' files line up.

A hop is keyed by (request id hex, seq, layer_start): the same on a request and its reply;
layer_start tells apart the hops of one request, whose links count seq separately.
"""

from __future__ import annotations

import atexit
import json
import os
import time

ON = bool(os.environ.get("EDGE_AGENT_HOP_TRACE"))
now = time.perf_counter_ns
_rows: list[tuple[str, str, int, int, int]] = []


def mark(stage: str, frame, t: int = 0) -> None:
    """Record that ``frame``'s hop reached ``stage`` at ``t`` ns (now if 0)."""
    _rows.append((stage, frame.request_id.hex(), frame.seq, frame.layer_start, t or now()))


def _dump() -> None:
    if _rows:
        with open(f"{os.environ['EDGE_AGENT_HOP_TRACE']}.{os.getpid()}", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in _rows)


if ON:
    atexit.register(_dump)
