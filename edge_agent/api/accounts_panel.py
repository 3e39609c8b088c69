"""The dashboard's Accounts panel: balances, stake, reputation and evidence from this agent's
own verified ledger, computed by the functions `edge-agent ledger balance|reputation|evidence`
use (``ledger.accounts.Accounts``, ``ledger.report``).

SQLite is read on one worker thread of the panel's own (its own read connection, never the
event loop), and an answer is reused for ``CACHE_S``: however many tabs are open, the store
is read at most once a second.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

log = logging.getLogger(__name__)
CACHE_S = 1.0
MAX_ACCOUNTS = 100  # rows shown; a ledger may know thousands of agents
MAX_EVIDENCE = 20
NO_LEDGER = {"ledger": False, "message": "This agent keeps no ledger (EDGE_AGENT_LEDGER=off): no balances, "
                                         "reputation or evidence to show."}


class AccountsPanel:
    def __init__(self, store, agent_id: str, live_peers: Callable[[], list[str]]) -> None:
        from edge_agent.ledger.accounts import Accounts

        self.store = store
        self.agent_id = agent_id
        self.live_peers = live_peers  # peer ids seen now: listed even before the ledger holds anything of theirs
        self._accounts = Accounts(store)  # the panel's own: the planner's is read on the event loop
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="accounts-panel")
        self._lock = asyncio.Lock()
        self._cached: dict | None = None
        self._read_at = float("-inf")

    async def view(self) -> dict:
        """The panel's JSON (GET /v1/ledger/accounts), at most ``CACHE_S`` old."""
        async with self._lock:  # concurrent callers wait for one read instead of starting their own
            if self._cached is None or time.monotonic() - self._read_at >= CACHE_S:
                live = set(self.live_peers())  # the peer table belongs to the event loop: read it here
                self._cached = await asyncio.get_running_loop().run_in_executor(self._reader, self._read, live)
                self._read_at = time.monotonic()
            return self._cached

    def _read(self, live: set[str]) -> dict:
        try:
            return self._read_store(live)
        except sqlite3.Error as exc:  # a locked or damaged file: the panel says so, the rest of the page stays live
            log.warning("accounts panel: cannot read the ledger: %s", exc)
            return {"ledger": True, "error": f"cannot read the ledger: {exc} (`edge-agent ledger verify` checks it)"}

    def _read_store(self, live: set[str]) -> dict:
        from edge_agent.ledger.report import newest_evidence, routing

        known = self._accounts.accounts()
        others = sorted((self._accounts.account(a) for a in (set(known) | live) - {self.agent_id}),
                        key=lambda a: (-a.reputation, a.agent_id))  # as `ledger reputation` lists them
        rows = [self._accounts.account(self.agent_id), *others]
        evidence, evidence_total = newest_evidence(self.store, MAX_EVIDENCE)
        return {"ledger": True, "agent_id": self.agent_id,
                "accounts": [{**a.to_dict(), **routing(a), "this_device": a.agent_id == self.agent_id,
                              "live": a.agent_id in live, "in_ledger": a.agent_id in known} for a in rows[:MAX_ACCOUNTS]],
                "accounts_total": len(rows), "evidence": evidence, "evidence_total": evidence_total}

    def close(self) -> None:
        self._reader.shutdown(wait=False, cancel_futures=True)
