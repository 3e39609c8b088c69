"""Slot accounting of kept conversations (pure asyncio logic; the swarm side is in test_api.py)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from edge_agent.api.conversations import Conversations


@dataclass
class Turn:
    tokens: list[int]

    def extended_by(self, prompt) -> bool:
        return len(self.tokens) < len(prompt) and list(prompt[: len(self.tokens)]) == self.tokens


def run(coro):
    return asyncio.run(coro)


def recorder():
    """(released, release): what a Conversations released, by first token."""
    released: list[int] = []

    async def release(kept):
        released.append(kept.tokens[0])

    return released, release


def test_a_next_turn_gets_its_kept_request_and_others_get_free_slots():
    async def main():
        released, release = recorder()
        c = Conversations(release, slots=4)
        assert await c.acquire([1, 2]) is None
        await c.done(Turn([1, 2, 3]))
        assert len(c) == 1
        assert await c.acquire([9, 9, 9, 9]) is None  # no prefix match: a free slot
        await c.done(None)
        got = await c.acquire([1, 2, 3, 4])
        assert got is not None and got.tokens == [1, 2, 3] and len(c) == 0
        await c.done(None)
        assert released == []

    run(main())


def test_at_most_half_the_slots_keep_and_the_oldest_goes_first():
    async def main():
        released, release = recorder()
        c = Conversations(release, slots=4)
        for i in range(3):
            await c.acquire([i])
            await c.done(Turn([i, 0]))
        assert len(c) == 2 and released == [0]
        await c.close()
        assert sorted(released) == [0, 1, 2] and len(c) == 0

    run(main())


def test_a_waiting_request_takes_a_kept_slot_and_nothing_is_kept_while_it_waits():
    async def main():
        released, release = recorder()
        c = Conversations(release, slots=2, max_kept=2)
        await c.acquire([1])
        await c.acquire([2])
        await c.done(Turn([1, 0]))  # one slot kept, one running
        third = asyncio.create_task(c.acquire([3]))  # no slot free: takes the kept one's
        assert await asyncio.wait_for(third, 5) is None and released == [1]
        fourth = asyncio.create_task(c.acquire([4]))  # waits for a slot
        await asyncio.sleep(0.01)
        await c.done(Turn([2, 0]))  # someone waits: released, not kept
        assert await asyncio.wait_for(fourth, 5) is None and released == [1, 2] and len(c) == 0

    run(main())


def test_idle_kept_requests_expire():
    async def main():
        released, release = recorder()
        c = Conversations(release, slots=2, keep_s=0.0)
        await c.acquire([1])
        await c.done(Turn([1, 0]))
        await asyncio.sleep(0.01)
        assert await c.acquire([1, 0, 5]) is None and released == [1]

    run(main())
