"""The privacy split does not hide the prompt: the vocab-matching attack (bench/privacy.py)
must keep recovering it, so no document can quietly overclaim (docs/privacy.md)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.privacy import VocabMatcher, capture, personal_prompts  # noqa: E402


def _recovered(model: Path, prompts: list[str], k: int, max_tokens: int) -> tuple[int, int]:
    shipped = capture(model, prompts, k, max_tokens, threads=2)
    matcher = VocabMatcher(model, k, threads=2)
    try:
        hits = total = 0
        for sh in shipped:
            rec = matcher.recover(sh.states)
            hits += sum(a == b for a, b in zip(rec.tokens, sh.tokens))
            total += len(sh.tokens)
    finally:
        matcher.close()
    return hits, total


@pytest.mark.parametrize("k", [1, 2])
def test_attack_recovers_the_prompt_from_a_random_model(tiny_model, k):
    hits, total = _recovered(tiny_model, personal_prompts(3), k, max_tokens=4)
    assert total >= 20
    assert hits / total >= 0.9, f"recovered {hits}/{total}: if a defense landed, measure it in docs/privacy.md"


@pytest.mark.slow
def test_attack_recovers_personal_data_from_smollm2_at_k1(smollm_path):
    hits, total = _recovered(smollm_path, personal_prompts(2)[1:], 1, max_tokens=2)
    assert total >= 20
    assert hits / total >= 0.9, f"recovered {hits}/{total}"
