"""Credits, stake, slashing and reputation: deterministic functions of the verified ledger.

Every number here is a sum over records each agent can verify on its own (receipts signed
by node and client, bonds signed by their agent, self-verifying evidence), so two agents
holding the same records compute the same numbers, whatever order the records came in.
docs/accountability.md gives the reasons and the arithmetic behind the constants.

- **Credits.** A receipt for ``layers x positions`` layer-tokens earns its node
  ``layer_tokens * (1 + met / (met + missed))`` credits (up to twice as much when every
  decode deadline was met) and the client spends the same. A device's receipts for its own
  layers earn nothing.
- **Stake.** ``stake = min(bonded, max(0, earned - spent))``: bonds lock earned credits;
  over-bonding adds nothing.
- **Slashing.** Each request with verified evidence against a node (a failed audit or
  equivocation) is one offence. Any offence forfeits the whole bond and each offence costs
  ``SLASH_PER_OFFENCE`` more: ``balance = earned - spent - (bonded + offences * SLASH_PER_OFFENCE)``.
- **Reputation** in [0, 1]. 0 after any offence. Otherwise deadline adherence with a
  Beta(5, 5) prior, ``(met + 5) / (met + missed + 10)``, counting at most ``CLIENT_CAP``
  decode steps per distinct client (one client cannot make it alone), never below
  ``MIN_REPUTATION`` (a slow node stays usable, only less preferred: it could never earn a
  met deadline back if it were never planned), and capped at ``UNSTAKED_CAP`` (a newcomer's
  0.5) until the stake reaches ``REQUIRED_STAKE``. The client does not route to peers below
  ``MIN_REPUTATION``: those with an offence.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import asdict, dataclass

from edge_agent.ledger.encoding import EncodingError, decode_receipt_body

CHUNK_POSITIONS = 32  # ledger.recorder.CHUNK_SIZE: positions per commitment
MAX_HOP_LAYERS = 32  # the largest hop the stake rule is sized for
DETECTION_PER_AUDIT = 0.5  # worst measured: a stale hop needs two audited chunks (docs/accountability.md)
AUDIT_RATE = 0.03  # ledger.audit.DEFAULT_RATE
# credits a cheater can earn before it is expected to be caught: 2 * 32 * 32 / (0.03 * 0.5)
CHEAT_GAIN_BOUND = 2 * MAX_HOP_LAYERS * CHUNK_POSITIONS / (AUDIT_RATE * DETECTION_PER_AUDIT)
REQUIRED_STAKE = 150_000  # >= CHEAT_GAIN_BOUND (136,533): cheating costs more than it can earn
SLASH_PER_OFFENCE = 10_000
PRIOR_MET, PRIOR_MISSED = 5.0, 5.0
CLIENT_CAP = 2000  # decode steps one client's receipts may count toward a node's reputation
UNSTAKED_CAP = 0.5
MIN_REPUTATION = 0.1
assert REQUIRED_STAKE >= CHEAT_GAIN_BOUND


@dataclass(frozen=True)
class Account:
    agent_id: str
    earned: int
    spent: int
    bonded: int
    offences: int
    slashed: int
    balance: int
    stake: int
    layer_tokens: int  # served for others
    deadlines_met: float  # after the per-client cap
    deadlines_missed: float
    reputation: float

    def to_dict(self) -> dict:
        return asdict(self)


def receipt_credits(layer_tokens: int, met: int, missed: int) -> int:
    """Credits one receipt moves from its client to its node."""
    return layer_tokens + (layer_tokens * met // (met + missed) if met + missed else 0)


def reputation_of(met: float, missed: float, stake: int, offences: int) -> float:
    if offences:
        return 0.0
    adherence = max(MIN_REPUTATION, (met + PRIOR_MET) / (met + missed + PRIOR_MET + PRIOR_MISSED))
    return adherence if stake >= REQUIRED_STAKE else min(adherence, UNSTAKED_CAP)


class Accounts:
    """Balances and reputation from a ``LedgerStore``, updated incrementally (every table it
    reads is append-only, so rows past the last rowid seen are all that is new)."""

    def __init__(self, store, min_refresh_s: float = 1.0) -> None:
        self.store = store
        self.min_refresh_s = min_refresh_s  # the planner asks per peer per plan: read the tables at most this often
        self._refreshed = float("-inf")
        self._last = {"receipts": 0, "evidence": 0, "bonds": 0}
        self._earned: dict[str, int] = defaultdict(int)
        self._spent: dict[str, int] = defaultdict(int)
        self._layer_tokens: dict[str, int] = defaultdict(int)
        self._deadlines: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])  # (node, client) -> met, missed
        self._bonded: dict[str, int] = defaultdict(int)
        self._offences: dict[str, set[str]] = defaultdict(set)  # accused -> request ids
        self._cache: dict[str, Account] | None = None

    def _new_rows(self, table: str, columns: str):
        rows = self.store.db.execute(f"SELECT rowid, {columns} FROM {table} WHERE rowid > ? ORDER BY rowid",
                                     [self._last[table]]).fetchall()
        if rows:
            self._last[table] = rows[-1][0]
            self._cache = None
        return rows

    def refresh(self) -> None:
        from edge_agent.ledger.evidence import Evidence
        from edge_agent.ledger.stake import Bond

        self._refreshed = time.monotonic()
        for _, body in self._new_rows("receipts", "body"):
            try:
                f = decode_receipt_body(body)
            except EncodingError:
                continue  # `ledger verify` names it; it moves no credits
            node, client = f.node.hex(), f.client.hex()
            if node == client:
                continue
            layer_tokens = (f.layer_end - f.layer_start) * f.steps
            credits = receipt_credits(layer_tokens, f.deadlines_met, f.deadlines_missed)
            self._earned[node] += credits
            self._spent[client] += credits
            self._layer_tokens[node] += layer_tokens
            pair = self._deadlines[(node, client)]
            pair[0] += f.deadlines_met
            pair[1] += f.deadlines_missed
        for _, body in self._new_rows("evidence", "body"):
            ev = Evidence(body)
            if ev.problem() is None:
                self._offences[ev.accused].add(ev.commitments()[0].fields.request_id.hex())
        for _, body, signature in self._new_rows("bonds", "body, signature"):
            bond = Bond(body, signature)
            if bond.problem() is None:
                self._bonded[bond.agent_id] += bond.fields[1]

    def _compute(self) -> dict[str, Account]:
        met: dict[str, float] = defaultdict(float)
        missed: dict[str, float] = defaultdict(float)
        for (node, _client), (m, x) in self._deadlines.items():
            scale = min(1.0, CLIENT_CAP / (m + x)) if m + x else 1.0
            met[node] += m * scale
            missed[node] += x * scale
        out = {}
        agents = set(self._earned) | set(self._spent) | set(self._bonded) | set(self._offences)
        for a in sorted(agents):
            earned, spent, bonded, offences = self._earned[a], self._spent[a], self._bonded[a], len(self._offences[a])
            slashed = bonded + offences * SLASH_PER_OFFENCE if offences else 0
            stake = 0 if offences else min(bonded, max(0, earned - spent))
            out[a] = Account(a, earned, spent, bonded, offences, slashed, earned - spent - slashed, stake,
                             self._layer_tokens[a], round(met[a], 6), round(missed[a], 6),
                             round(reputation_of(met[a], missed[a], stake, offences), 6))
        return out

    def accounts(self) -> dict[str, Account]:
        """Every agent the ledger knows, by agent id (refreshed first)."""
        self.refresh()
        if self._cache is None:
            self._cache = self._compute()
        return self._cache

    def account(self, agent_id: str) -> Account:
        """One agent's account; all zeros (and a newcomer's reputation) when the ledger has none."""
        found = self.accounts().get(agent_id)
        return found or Account(agent_id, 0, 0, 0, 0, 0, 0, 0, 0, 0.0, 0.0, reputation_of(0.0, 0.0, 0, 0))

    def known(self, agent_id: str) -> Account | None:
        """One agent's account, None for an agent the ledger has never seen; the planner asks
        per peer per plan, so new records are read at most every ``min_refresh_s``."""
        if time.monotonic() - self._refreshed >= self.min_refresh_s:
            self.refresh()
        if self._cache is None:
            self._cache = self._compute()
        return self._cache.get(agent_id)

    def reputation(self, agent_id: str) -> float | None:
        """None for an agent the ledger has never seen (the planner's default)."""
        found = self.known(agent_id)
        return None if found is None else found.reputation
