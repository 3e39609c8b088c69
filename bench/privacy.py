"""What a peer can recover from the activations the client ships (docs/privacy.md).

The yardstick is the vocab-matching attack (arXiv 2505.18332): the first remote hop
receives the hidden state after layer ``k`` of every position (prefill rows, then one row
per decode step). It holds the public weights, so it replays layers ``[0, k)`` position by
position: with the tokens it already recovered as the prefix (their K/V in the cache), it
runs *every* vocabulary token as the candidate for the next position and keeps the one
whose output is nearest (L2) to the shipped state.

Candidates run through the runtime's own ONNX graph of layers ``[0, k)`` (``OnnxEngine``,
weights mapped exactly from the GGUF) as prefill-like batches of 1024: rows are candidates
at the same position, each attending to the prefix and to itself only (the mask). Scoring
all 49152 costs seconds per position, so candidates are scored in the order of a prior
(cosine of the shipped state with each token's output of layers [0, k) *without* a prefix,
one table computed once per k) and the search stops once a candidate's output is within
``tol`` (relative L2) of the shipped state. Only the true token gets there (measured:
~0.01 for it, > 0.5 for any other); when none does, every candidate is scored.
``--exhaustive-positions`` checks on the first positions that scoring all candidates gives
the same answers.

The weak baseline is a cosine nearest-neighbour decoder: the embedding row nearest to the
shipped state.

    .venv/bin/python bench/privacy.py --k 1 2 4 --prompts 50 --threads 2
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_agent.runtime.engine import EngineOptions, StepInput  # noqa: E402
from edge_agent.runtime.onnx import OnnxEngine  # noqa: E402
from edge_agent.runtime.onnx_graph import _embedding, rope_tables  # noqa: E402
from edge_agent.runtime.pipeline import LocalPipeline  # noqa: E402
from edge_agent.runtime.sampling import SamplingParams  # noqa: E402
from edge_agent.runtime.shards import _reader  # noqa: E402

FIRST_CHUNK = 64  # the true token is almost always in the prior's first few dozen
CHUNK = 1024


@dataclass
class Shipped:
    """What the first remote hop saw of one request: the state after layer k per position."""

    tokens: list[int]  # ground truth (never on the wire), for scoring only
    states: np.ndarray  # float32 [positions, n_embd], exactly the rows the client sends
    prompt_len: int


def capture(model: Path, prompts: list[str], k: int, max_tokens: int, threads: int) -> list[Shipped]:
    """Generate each prompt through the privacy split and record the head's outputs.

    The head (layers [0, k) on llama.cpp) is the same engine and chunking the swarm client
    runs; what it returns is what ``protocol.activation`` puts on the wire, prefill rows
    first, then one row per decode step."""
    pipe = LocalPipeline(model, split=(k, 1), options=EngineOptions(n_threads=threads, max_requests=1))
    head = pipe.stages[0]
    out = []
    try:
        for prompt in prompts:
            fed: list[np.ndarray] = []
            rows: list[np.ndarray] = []
            forward = head.forward

            def spy(steps, forward=forward, fed=fed, rows=rows):
                res = forward(steps)
                fed.append(np.asarray(steps[0].data).copy())
                rows.append(np.asarray(res[0].data, dtype=np.float32).copy())
                return res

            head.forward = spy
            tokens = pipe.prompt_tokens(prompt)
            pipe.stream(tokens, SamplingParams(max_tokens=max_tokens, temperature=0.0))
            head.forward = forward
            out.append(Shipped([int(t) for t in np.concatenate(fed)], np.concatenate(rows), len(tokens)))
    finally:
        pipe.close()
    return out


@dataclass
class Recovery:
    tokens: list[int]
    seconds: float
    scored: int  # candidates run through layers [0, k), all positions
    best_rel: list[float] = field(default_factory=list)  # relative L2 of the chosen candidate


class VocabMatcher:
    """The attacker: layers [0, k) from the public weights, every token a candidate."""

    def __init__(self, model: Path, k: int, threads: int, tol: float = 0.05):
        self.k, self.tol = k, tol
        self.engine = OnnxEngine(model, 0, k, EngineOptions(n_threads=threads, max_requests=1))
        reader = _reader(model)
        emb = _embedding(next(t for t in reader.tensors if t.name == "token_embd.weight"))
        self.n_vocab = emb.shape[0]
        self.unit_emb = _unit(emb)
        t0 = time.perf_counter()
        every = np.arange(self.n_vocab)
        self.unit_alone = _unit(np.concatenate([self._run(None, 0, every[s : s + CHUNK]) for s in range(0, self.n_vocab, CHUNK)]))
        self.prior_s = time.perf_counter() - t0  # one-off cost of the prior's table

    def prior_order(self, state: np.ndarray) -> np.ndarray:
        """Vocabulary ids by cosine of their prefix-free output of layers [0, k) with ``state``, best first."""
        return np.argsort(-(self.unit_alone @ _unit(state)), kind="stable")

    def _score(self, rid: str, pos: int, candidates: np.ndarray, target: np.ndarray) -> np.ndarray:
        """Relative L2 distance to ``target`` of each candidate's output at ``pos`` after the prefix."""
        out = self._run(self.engine._requests.get(rid), pos, candidates)
        return np.linalg.norm(out - target, axis=1) / max(float(np.linalg.norm(target)), 1e-12)

    def _run(self, state, pos: int, candidates: np.ndarray) -> np.ndarray:
        """Outputs of layers [0, k) for each candidate at ``pos`` after the prefix whose K/V is ``state``
        (the attacker's own replay of the tokens it recovered; None: no prefix)."""
        e = self.engine
        s, n = e.spec, len(candidates)
        empty = np.zeros((s.n_head_kv, 0, s.head_dim), dtype=e._kv_dtype)
        cos, sin = rope_tables(np.full(n, pos), s.n_rot, e.freq_base, e.freq_scale)
        mask = np.full((n, pos + n), -np.inf, dtype=np.float32)
        mask[:, :pos] = 0.0
        mask[np.arange(n), pos + np.arange(n)] = 0.0  # each candidate sees the prefix and itself
        feed = {"tokens": candidates.astype(np.int64), "rope_cos": cos, "rope_sin": sin, "mask": mask}
        for i in range(s.end - s.start):
            feed[f"past_k.{i}"] = state.k[i] if state is not None else empty
            feed[f"past_v.{i}"] = state.v[i] if state is not None else empty
        return e._session.run(["hidden_out"], feed)[0]

    def recover(self, states: np.ndarray, exhaustive: bool = False) -> Recovery:
        rid = uuid.uuid4().hex
        t0 = time.perf_counter()
        tokens: list[int] = []
        best_rel: list[float] = []
        scored = 0
        try:
            for pos, target in enumerate(states):
                order = np.arange(self.n_vocab) if exhaustive else self.prior_order(target)
                best, best_d, start = -1, np.inf, 0
                while start < self.n_vocab:
                    size = CHUNK if exhaustive or start else FIRST_CHUNK
                    cand = order[start : start + size]
                    d = self._score(rid, pos, cand, target)
                    scored += len(cand)
                    j = int(np.argmin(d))
                    if d[j] < best_d:
                        best, best_d = int(cand[j]), float(d[j])
                    start += size
                    if best_d < self.tol and not exhaustive:
                        break
                tokens.append(best)
                best_rel.append(best_d)
                self.engine.forward([StepInput(rid, pos, np.array([best], dtype=np.int32))])  # extend the prefix
        finally:
            self.engine.end_request(rid)
        return Recovery(tokens, time.perf_counter() - t0, scored, best_rel)

    def close(self) -> None:
        self.engine.close()


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def cosine_baseline(matcher: VocabMatcher, states: np.ndarray) -> list[int]:
    """Weak baseline: the token whose embedding is nearest (cosine) to each shipped state."""
    return [int(t) for t in np.argmax(_unit(states) @ matcher.unit_emb.T, axis=1)]


_FIRST = ["Maria", "John", "Aisha", "Wei", "Olga", "Carlos", "Fatima", "Lukas", "Priya", "Kenji", "Amara", "Sven"]
_LAST = ["Schmidt", "Okafor", "Nguyen", "Rossi", "Kowalski", "Haddad", "Larsen", "Tanaka", "Moreau", "Silva"]
_STREETS = ["Maple Street", "Rue de Rivoli", "Hauptstrasse", "Elm Avenue", "Calle Mayor", "Baker Street", "Via Roma"]
_CITIES = ["Springfield", "Lyon", "Munich", "Austin", "Madrid", "London", "Turin", "Osaka"]
_TEMPLATES = [
    "Patient {name}, born {dob}, lives at {addr}. Diagnosis: type 2 diabetes. Phone {phone}.",
    "Please wire {amount} EUR from account {iban} to {name} at {addr}.",
    "My name is {name} and my social security number is {ssn}. Can you fill in the form?",
    "Draft a letter to {name}, {addr}, about the overdue invoice {invoice} of {amount} dollars.",
    "{name} ({email}) asked to reset the password for card ending {card}.",
    "Summarize: {name} called from {phone} about a salary of {amount} per year and a loan.",
]


def personal_prompts(n: int, seed: int = 16) -> list[str]:
    """``n`` prompts full of synthetic personal data (names, addresses, numbers); deterministic."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        first, last = rng.choice(_FIRST), rng.choice(_LAST)
        digits = lambda k: "".join(rng.choice("0123456789") for _ in range(k))  # noqa: E731
        out.append(_TEMPLATES[i % len(_TEMPLATES)].format(
            name=f"{first} {last}", dob=f"{rng.randint(1, 28)}/{rng.randint(1, 12)}/{rng.randint(1940, 2005)}",
            addr=f"{rng.randint(1, 250)} {rng.choice(_STREETS)}, {rng.choice(_CITIES)}", phone=f"+1 {digits(3)} {digits(3)} {digits(4)}",
            amount=f"{rng.randint(100, 99999)}", iban=f"DE{digits(20)}", ssn=f"{digits(3)}-{digits(2)}-{digits(4)}",
            invoice=f"INV-{digits(6)}", email=f"{first.lower()}.{last.lower()}@example.org", card=digits(4),
        ))  # fmt: skip
    return out


def evaluate(model: Path, prompts: list[str], k: int, *, max_tokens: int, threads: int, exhaustive_positions: int = 0) -> dict:
    """Capture, attack, and score one depth ``k``; returns the row for docs/privacy.md."""
    shipped = capture(model, prompts, k, max_tokens, threads)
    matcher = VocabMatcher(model, k, threads)
    hits = base_hits = total = exact = 0
    seconds, scored, rel_true = 0.0, 0, []
    full = None
    try:
        for i, sh in enumerate(shipped):
            rec = matcher.recover(sh.states)
            seconds += rec.seconds
            scored += rec.scored
            ok = [a == b for a, b in zip(rec.tokens, sh.tokens)]
            hits += sum(ok)
            total += len(ok)
            exact += all(ok[: sh.prompt_len])
            rel_true += [d for d, good in zip(rec.best_rel, ok) if good]
            base_hits += sum(a == b for a, b in zip(cosine_baseline(matcher, sh.states), sh.tokens))
            if i == 0 and exhaustive_positions:  # the early stop changes no answer: check against scoring all
                full = matcher.recover(sh.states[:exhaustive_positions], exhaustive=True)
                agree = sum(a == b for a, b in zip(full.tokens, rec.tokens))
    finally:
        matcher.close()
    row = {
        "k": k, "prompts": len(shipped), "positions": total,
        "token_recovery_pct": round(100.0 * hits / total, 2),
        "exact_prompt_pct": round(100.0 * exact / len(shipped), 2),
        "attack_s_per_token": round(seconds / total, 4), "prior_table_s": round(matcher.prior_s, 1),
        "candidates_per_token": round(scored / total, 1),
        "true_token_rel_l2_max": round(max(rel_true), 5) if rel_true else None,
        "cosine_baseline_pct": round(100.0 * base_hits / total, 2),
    }  # fmt: skip
    if full is not None:
        row.update(exhaustive_positions=len(full.tokens), exhaustive_agree=agree,
                   exhaustive_s_per_token=round(full.seconds / len(full.tokens), 3))
    return row


def main() -> None:
    from edge_agent.config import packaged_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="GGUF model (default: the packaged SmolLM2-135M)")
    ap.add_argument("--k", type=int, nargs="+", default=[1, 2, 4], help="layers the client keeps before the first hop")
    ap.add_argument("--prompts", type=int, default=50)
    ap.add_argument("--max-tokens", type=int, default=8, help="generated tokens (their decode rows are attacked too)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--exhaustive-positions", type=int, default=8,
                    help="first positions of the first prompt also attacked scoring every candidate")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    model = args.model or packaged_model()
    prompts = personal_prompts(args.prompts)
    for k in args.k:
        row = evaluate(model, prompts, k, max_tokens=args.max_tokens, threads=args.threads, exhaustive_positions=args.exhaustive_positions)
        print(json.dumps(row) if args.json else "  ".join(f"{a}={b}" for a, b in row.items()), flush=True)


if __name__ == "__main__":
    main()
