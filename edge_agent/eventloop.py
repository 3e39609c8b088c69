"""The event loop an edge-agent process runs: uvloop where it is installed, else asyncio's.

Why: one hop of one decode token passes through the event loop several times in each
process (socket reads, TLS records, the engine thread's hand-off back); uvloop runs the
loop, the sockets and the TLS plumbing in C, and measurably shortens the hand-offs and the
hop's overhead (docs/benchmarks.md, hop overhead). asyncio's own loop stays the fallback
where uvloop does not exist (Windows) and is chosen with ``EDGE_AGENT_UVLOOP=0``.
Nothing is imported until a loop is made, so ``edge-agent --help`` stays fast.
"""

from __future__ import annotations

import os

ENV = "EDGE_AGENT_UVLOOP"


def install() -> None:
    """Make every later ``asyncio.run`` of this process use uvloop (unless ``EDGE_AGENT_UVLOOP=0``)."""
    if os.environ.get(ENV, "1") == "0":
        return
    import asyncio

    class Policy(asyncio.DefaultEventLoopPolicy):
        def new_event_loop(self) -> asyncio.AbstractEventLoop:
            import logging

            try:
                import uvloop
            except ImportError:
                logging.getLogger(__name__).debug("event loop: asyncio's (uvloop is not installed)")
                return super().new_event_loop()
            logging.getLogger(__name__).debug("event loop: uvloop %s", uvloop.__version__)
            return uvloop.new_event_loop()

    asyncio.set_event_loop_policy(Policy())


def kind() -> str:
    """``"uvloop"`` or ``"asyncio"``: the running loop's kind (benchmarks print it)."""
    import asyncio

    return "uvloop" if type(asyncio.get_running_loop()).__module__.startswith("uvloop") else "asyncio"
