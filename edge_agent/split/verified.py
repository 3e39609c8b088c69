"""Verified generation: answer only with tokens whose audited chunks passed.

A hop caught by an audit (docs/accountability.md) corrupts every token sampled after the
first position of the chunk it lied in. With verification on, the client waits for the
audits of each request before it hands out the tokens; when one failed at position P, it
keeps the tokens computed from positions before P, and generates the rest again on a path
without the cheater (its evidence is in the ledger, and the client bans it): the replaced
hop's layers are recomputed, from the prompt and the kept tokens, by an honest peer.
Greedy output is then exactly what honest peers compute. At ``--audit-rate 1`` every chunk
is checked; at lower rates only the sampled ones are.

The cost: tokens reach ``on_token`` once their request verified (no streaming before the
audits), and a kept conversation is not reused (its receipts, hence its audits, come when
it ends).
"""

from __future__ import annotations

import dataclasses
from typing import Awaitable, Callable, NamedTuple, Sequence

from edge_agent.runtime.generation import GenerationResult
from edge_agent.runtime.sampling import SamplingParams, find_stop

MAX_ROUNDS = 4  # generations per request: one per cheater caught, then give up (every peer lying is no swarm)


class Fault(NamedTuple):
    """The earliest failed audit of a request: who, and the first position it corrupted."""

    peer_id: str
    position: int


GenerateOnce = Callable[..., Awaitable[GenerationResult]]  # (prompt, params, privacy=) -> result (stats["request_id"])
Verifier = Callable[[str], Awaitable[Fault | None]]  # request id (hex) -> its earliest fault, after its audits


class VerifyError(ValueError):
    """Verification asked for where it cannot run (no audits, no ledger), or no round passed."""


async def generate_verified(generate_once: GenerateOnce, verify: Verifier, ban: Callable[[str], None], tokenizer,
                            prompt_tokens: Sequence[int], params: SamplingParams, on_token=None,
                            privacy: str | None = None) -> GenerationResult:
    prompt = list(prompt_tokens)
    kept: list[int] = []  # verified generated tokens
    rounds: list[dict] = []
    for _ in range(MAX_ROUNDS):
        res = await generate_once(prompt + kept, dataclasses.replace(params, max_tokens=params.max_tokens - len(kept)),
                                  privacy=privacy)
        fault = await verify(res.stats["request_id"])
        if fault is None:
            return _finish(tokenizer, prompt, kept + res.token_ids, res, params, rounds, on_token)
        # tokens sampled from logits at positions >= fault.position are wrong; the one fed at
        # fault.position was sampled just before it, from honest logits
        good = max(0, fault.position - len(prompt) - len(kept) + 1)
        rounds.append({"request_id": res.stats["request_id"], "cheater": fault.peer_id, "position": fault.position,
                       "kept_tokens": len(kept) + good, "discarded_tokens": len(res.token_ids) - good})
        kept += res.token_ids[:good]
        ban(fault.peer_id)
    raise VerifyError(f"{MAX_ROUNDS} generations in a row had a failed audit (cheaters: "
                             f"{', '.join(r['cheater'][:12] for r in rounds)})")


def _finish(tokenizer, prompt: list[int], tokens: list[int], last: GenerationResult, params: SamplingParams,
            rounds: list[dict], on_token) -> GenerationResult:
    text = tokenizer.decode(tokens)
    cut = find_stop(text, params.stop) if params.stop else -1
    text = text[:cut] if cut >= 0 else text
    if on_token is not None:  # verified: hand the tokens out now, the text with the last one
        for i, tok in enumerate(tokens):
            on_token(tok, text if i == len(tokens) - 1 else "")
    stats = {**last.stats, "prompt_tokens": len(prompt), "completion_tokens": len(tokens),
             "verified": {"rounds": len(rounds) + 1, "rolled_back": rounds}}
    finish = "stop" if cut >= 0 else last.finish_reason
    return GenerationResult(text, tokens, len(prompt), finish, stats)
