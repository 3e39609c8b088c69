"""Speculative decoding: drafted tokens verified in one pass through every hop, output
unchanged (greedy, token for token against llama.cpp alone), on real llama.cpp peers."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import reference_tokens
from edge_agent.runtime.drafting import PromptLookup
from edge_agent.runtime.engine import EngineOptions, StepInput
from edge_agent.runtime.llamacpp import LlamaCppEngine
from edge_agent.runtime.shards import inspect_model
from swarm_util import peers, swarm_generate  # noqa: F401 - peers is a fixture

STORY = "Once upon a time, in a small village by the sea,"  # drafts are few and mostly rejected
TEXT = ("Copy this list exactly. Apples, pears, plums, cherries, grapes, lemons, limes, figs. "
        "Apples, pears, plums, cherries, grapes, lemons, limes, figs. Apples, pears,")


@pytest.fixture
def draft_always(monkeypatch):
    """How many drafts pay depends on measured step times, which a busy machine moves: the
    swarm tests pin the policy to the most drafts, so that passes, rejections and rewinds
    happen on any machine (the policy itself: test_drafts_only_as_many_as_pay_for_themselves)."""
    from edge_agent.split.speculation import Speculation

    monkeypatch.setattr(Speculation, "worth_drafting", lambda self, draft_s=0.0: self.max_draft)


def test_prompt_lookup_drafts_what_followed_the_longest_match():
    d = PromptLookup(max_ngram=3)
    d.extend([1, 2, 3, 4, 5, 9, 2, 3])
    assert d.draft(3) == [4, 5, 9]  # "2 3" was followed by 4 5 9
    d.extend([7])
    assert d.draft(4) == []  # "7" never occurred before
    d.extend([1, 2, 3])
    assert d.draft(2) == [4, 5]  # "1 2 3" began the context
    assert d.draft(0) == []


def test_prompt_lookup_prefers_the_longer_ngram():
    d = PromptLookup(max_ngram=2)
    d.extend([5, 1, 8, 6, 1, 9, 5, 1])
    assert d.draft(1) == [8]  # "5 1" -> 8, although the latest "1" was followed by 9


@pytest.mark.parametrize("flash_attn", [False, True])
def test_draft_steps_equal_single_row_decodes_and_rewind(smollm_path, flash_attn):
    """A draft step's rows (run in as few passes as the kernels allow, runtime/exactness.py)
    equal one-row decodes after the same history bit for bit; a rewinding step drops the
    rejected rows first. Both requests read their first rows as one 4-row chunk: a chunk is
    not bit-equal to one-row decodes on every CPU (without flash attention on an AVX2 EPYC it
    was not), and need not be, since a re-route replays the chunks as first sent."""
    n = inspect_model(smollm_path).n_layer
    opts = EngineOptions(max_requests=4, n_threads=2, flash_attn=flash_attn)
    mid = LlamaCppEngine.from_model(smollm_path, 1, n - 1, opts)
    try:
        assert mid.batch_rows >= 2 and (mid.draft_rows > 1) == flash_attn  # Q4_1: measured row-exact; attention needs FA
        rng = np.random.default_rng(1)
        x = rng.standard_normal((12, mid.info.n_embd)).astype(np.float32)
        mid.forward([StepInput("a", 0, x[:4])])
        single = np.concatenate([mid.forward([StepInput("a", r, x[r:r + 1])])[0].data for r in range(4, 12)])  # rows 4..11
        mid.forward([StepInput("b", 0, x[:4])])
        out = mid.forward([StepInput("b", 4, x[4:12], draft=True)])[0].data
        assert np.array_equal(out, single)
        # the pass kept 2 of its 8 rows: the next step rewinds to 6 and drafts again
        out = mid.forward([StepInput("b", 6, x[6:10], rewind=True, draft=True)])[0].data
        assert np.array_equal(out, single[2:6]) and mid.positions("b") == 10
    finally:
        mid.close()


@pytest.mark.parametrize("mode,flash_attn", [("star", False), ("chain", False), ("star", True)])
def test_speculative_split_matches_llama_cpp(tmp_path, peers, smollm_path, draft_always, mode, flash_attn):
    fa = ["--flash-attn"] if flash_attn else []
    a, b = peers(smollm_path, "1:15", *fa), peers(smollm_path, "15:29", *fa)
    opts = EngineOptions(n_ctx_per_request=512, max_requests=2, flash_attn=flash_attn)
    prompt, res = swarm_generate(tmp_path, smollm_path, TEXT, 40, [a, b], mode=mode, speculate=6, options=opts)
    assert res.token_ids == reference_tokens(smollm_path, prompt, 40, flash_attn=flash_attn)
    spec = res.stats["speculation"]
    assert spec["accepted"] > 0 and spec["passes"] < 40  # drafts were kept: fewer passes than tokens
    assert res.stats["reroutes"] == []


def test_killed_peer_mid_speculation_is_replayed_exactly(tmp_path, peers, smollm_path, draft_always):
    """Replays re-send each step with its flags: the rebuilt cache skips rejected drafts as the
    first one did, so the output does not change."""
    a = peers(smollm_path, "1:29", "--test-advertise-ms", "0.001")  # the planner's first choice
    b = peers(smollm_path, "1:29", "--test-advertise-ms", "5")
    seen = []

    def on_token(tok, _text):
        seen.append(tok)
        if len(seen) == 12:
            a.kill()  # mid-generation, after several speculative passes

    prompt, res = swarm_generate(tmp_path, smollm_path, TEXT, 36, [a, b], on_token=on_token, speculate=6)
    assert res.token_ids == reference_tokens(smollm_path, prompt, 36)
    assert [r["from"] for r in res.stats["reroutes"]] == [a.agent_id]
    assert res.stats["speculation"]["accepted"] > 0


def test_chunks_are_told_apart_by_their_frames_not_their_positions():
    from edge_agent.ledger.chain_audit import chunk_members

    # a pass at 10 over 10..14 (2 drafts kept), then single rows again from 13 on
    frames = [(0, 10), (10, 5), (13, 1), (14, 1), (15, 1)]
    assert chunk_members(frames, 10, 15) == [1]
    assert chunk_members(frames, 13, 16) == [2, 3, 4]
    assert chunk_members(frames, 0, 10) == [0]


@pytest.mark.parametrize("fault,mode,text", [(None, "star", TEXT), (None, "star", STORY), (None, "chain", STORY),
                                             ("skip-layer", "star", TEXT)])
def test_verified_speculation_audits_every_chunk_exactly(tmp_path, peers, smollm_path, draft_always, monkeypatch, fault,
                                                        mode, text):
    """Audits re-execute speculative steps with their flags (rewinds, row-exact drafts): an honest
    peer audited on every chunk raises no flag; a cheater that speculation served is still
    caught, and the answer is llama.cpp's."""
    import asyncio

    from edge_agent.node import AgentConfig, swarm_client
    from edge_agent.runtime.sampling import SamplingParams
    from edge_agent.split.client import ClientConfig

    serving = [peers(smollm_path, "1:29", "--test-advertise-ms", "5")] if mode == "star" else \
        [peers(smollm_path, "1:15"), peers(smollm_path, "15:29")]
    if fault:
        monkeypatch.setenv("EDGE_AGENT_TEST_FAULTS", "1")
        serving.insert(0, peers(smollm_path, "1:29", "--test-fault", fault, "--test-advertise-ms", "0.001"))
        monkeypatch.delenv("EDGE_AGENT_TEST_FAULTS")
    cfg = AgentConfig(tmp_path / "client", manual_peers=[("127.0.0.1", p.ready["tls_port"]) for p in serving], mdns=False,
                      host="127.0.0.1")
    cfg.data_dir.mkdir()

    async def go():
        async with swarm_client(cfg, smollm_path, ClientConfig(verify=True, speculate=6, mode=mode),
                                EngineOptions(n_ctx_per_request=512, max_requests=2), discover_s=30.0, audit_rate=1.0) as client:
            tokens = client.tokenizer.encode(text)
            return tokens, await client.generate(tokens, SamplingParams(max_tokens=36))

    prompt, res = asyncio.run(go())
    assert res.token_ids == reference_tokens(smollm_path, prompt, 36)
    rolled = res.stats["verified"]["rolled_back"]
    assert [r["cheater"] for r in rolled] == ([serving[0].agent_id] if fault else [])
    assert res.stats["speculation"]["drafted"] > 0


def test_drafts_only_as_many_as_pay_for_themselves():
    from edge_agent.split.speculation import Speculation

    spec = Speculation(8, True, [1, 2, 3], n_ctx=512)
    assert spec.worth_drafting() == 0  # first measure a one-row step
    spec.observe(1, 0.010)
    spec.accepted, spec.rejected = 60, 4  # long runs of accepted drafts (repetitive text)
    spec.row_s = 0.0005  # rows verified in one pass: nearly free
    assert spec.worth_drafting() == 8
    spec.row_s = 0.008  # most of a step per row (one pass per row), and runs are short: no drafts
    spec.accepted, spec.rejected = 2, 30
    assert spec.worth_drafting() == 0
    spec._idle = 16  # after a while without drafts, look again, with a few
    assert spec.worth_drafting() == 3
    spec.row_s = 0.012  # unless a row costs a whole step: then no draft can pay
    assert spec.worth_drafting() == 0


def test_kept_conversation_resumes_past_rejected_drafts(tmp_path, peers, smollm_path, draft_always):
    """A finished speculative turn leaves rejected drafts in every cache; the next turn, which
    resumes the kept request, rewinds them first: both turns equal those of a client that
    does not speculate (turn two is not compared with llama.cpp alone, which would compute
    the whole conversation as one prompt, in other chunks)."""
    import asyncio

    from edge_agent.node import AgentConfig, swarm_client
    from edge_agent.runtime.sampling import SamplingParams
    from edge_agent.split.client import ClientConfig

    a = peers(smollm_path, "1:29")
    cfg = AgentConfig(tmp_path / "client", manual_peers=[("127.0.0.1", a.ready["tls_port"])], mdns=False, host="127.0.0.1")
    cfg.data_dir.mkdir()

    async def go(speculate: int):
        async with swarm_client(cfg, smollm_path, ClientConfig(speculate=speculate),
                                EngineOptions(n_ctx_per_request=512, max_requests=2), discover_s=30.0) as client:
            first = client.tokenizer.encode(TEXT)
            kept = []
            # the stop string ends the turn inside a pass: the drafts after it stay in every cache
            one = await client.generate(first, SamplingParams(max_tokens=40, stop=["limes"]), keep=kept.append)
            held = client.head.positions(kept[0].state.rid.hex()) - len(kept[0].tokens)  # rows of rejected drafts
            second = first + one.token_ids + client.tokenizer.encode(" Once more:", add_special=False)
            two = await client.generate(second, SamplingParams(max_tokens=20), resume=kept[0])
            return one, two, held

    one, two, held = asyncio.run(go(6))
    plain_one, plain_two, _ = asyncio.run(go(0))
    assert held > 0
    assert one.finish_reason == "stop" and one.stats["speculation"]["accepted"] > 0
    assert two.stats["kv_reused_tokens"] > 0
    assert (one.token_ids, two.token_ids) == (plain_one.token_ids, plain_two.token_ids)


@pytest.mark.parametrize("draft", ["same model", "random weights"])
def test_draft_model_drafts_where_the_context_has_no_match(tmp_path, peers, smollm_path, draft_always, draft):
    """A small model with the same vocabulary drafts on the client (here SmolLM2 itself, whose
    greedy drafts the swarm accepts, and a random-weight model of the same vocabulary, whose
    drafts it rejects): the output is llama.cpp's either way."""
    from edge_agent.runtime.synthetic import make_random_gguf

    path = smollm_path if draft == "same model" else make_random_gguf(
        tmp_path / "draft.gguf", n_layer=2, n_embd=64, n_head=2, n_head_kv=1, n_ff=128, n_vocab=49152, ftype="q8_0")
    a = peers(smollm_path, "1:29")
    prompt, res = swarm_generate(tmp_path, smollm_path, "Once upon a time, in a small village by the sea,", 24, [a], speculate=4,
                                 draft_model=path)
    assert res.token_ids == reference_tokens(smollm_path, prompt, 24)
    spec = res.stats["speculation"]
    assert spec["drafted"] > 0
    if draft == "same model":
        # most, not all: the drafter catches up on accepted tokens in multi-row chunks, which
        # plain attention does not compute bit-equal to one-row decodes on every CPU, so a
        # near-tie can draft another token (77 % accepted on an AVX2 EPYC, more on AVX-512)
        assert spec["accepted"] >= spec["drafted"] * 0.6


def test_draft_model_with_another_vocabulary_is_one_clear_error(tmp_path, smollm_path, tiny_model):
    from edge_agent.runtime.drafting import DraftModelError, ModelDrafter

    with pytest.raises(DraftModelError, match="same vocabulary"):
        ModelDrafter.load(tiny_model, EngineOptions(max_requests=1, n_ctx_per_request=128), 49152)


def test_bad_draft_steps_change_no_cache(tmp_path):
    """Every step of a call is validated before anything changes: a draft pass that would
    overflow the context, an oversized draft, or a rewinding step in an invalid batch leave
    every request's cache as it was (a hop server then runs the other steps alone)."""
    from edge_agent.runtime.engine import ContextFullError, InputShapeError
    from edge_agent.runtime.synthetic import make_random_gguf

    path = make_random_gguf(tmp_path / "q8.gguf", n_layer=2, n_embd=64, n_head=2, n_head_kv=1, n_ff=128, n_vocab=256,
                            ftype="q8_0")
    e = LlamaCppEngine.from_model(path, 0, 1, EngineOptions(max_requests=4, n_ctx_per_request=24, n_threads=1))
    try:
        e.forward([StepInput("honest", 0, np.arange(1, 4, dtype=np.int32))])
        e.forward([StepInput("bad", 0, np.arange(1, 11, dtype=np.int32))])
        overflow = StepInput("bad", 10, np.arange(1, 16, dtype=np.int32), rewind=True, draft=True)  # 10 + 15 > 24
        with pytest.raises(ContextFullError):
            e.forward([StepInput("honest", 3, np.array([7], np.int32)), overflow])
        assert (e.positions("honest"), e.positions("bad")) == (3, 10)
        with pytest.raises(InputShapeError, match="at most 16 rows"):
            e.forward([StepInput("bad", 5, np.ones(17, np.int32), rewind=True, draft=True)])
        with pytest.raises(InputShapeError, match="once"):  # the same request twice: refused before the rewind
            e.forward([StepInput("bad", 2, np.array([1], np.int32), rewind=True), StepInput("bad", 2, np.array([1], np.int32))])
        assert e.positions("bad") == 10
        e.forward([StepInput("honest", 3, np.array([7], np.int32))])  # untouched: it goes on where it was
    finally:
        e.close()


def test_probe_finds_float_weights_row_by_row(tiny_model):
    e = LlamaCppEngine.from_model(tiny_model, 1, 3, EngineOptions(max_requests=4, n_threads=1, flash_attn=True))
    try:
        assert (e.batch_rows, e.draft_rows) == (1, 1)  # F32 matmuls: other kernels from 2 rows on (batch_decode auto)
    finally:
        e.close()
