"""Generation engine: sampling, stop strings, n>1, streaming and continuous batching."""

from __future__ import annotations

import pytest
import torch

import zaya
from tests.tiny_model import make_tiny_model_dir
from zaya.engine import Engine, Request
from zaya.errors import ContextLengthError, ZayaError
from zaya.sampling import (DEFAULT_MAX_NEW_TOKENS, SamplingParams, apply_penalties, filter_logits,
                           fit_max_new_tokens)


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return zaya.load(tiny_model_dir)


PROMPT = "The quick brown fox"


def test_greedy_is_deterministic_and_n_forks_agree(llm):
    a = llm.generate(PROMPT, max_new_tokens=24, temperature=0, ignore_eos=True)
    b = llm.generate([PROMPT], max_new_tokens=24, temperature=0, n=3, ignore_eos=True)
    assert len(b) == 3 and [c.index for c in b] == [0, 1, 2]
    assert all(c.token_ids == a[0].token_ids for c in b)
    assert a[0].finish_reason == "length" and len(a[0].token_ids) == 24


def test_seed_reproduces_and_batching_does_not_change_a_request(llm):
    kw = dict(max_new_tokens=16, temperature=1.0, seed=7, ignore_eos=True)
    together = llm.generate([PROMPT, "Hello! How can I"], n=2, **kw)
    alone = llm.generate(["Hello! How can I"], n=2, **kw)
    assert [c.token_ids for c in together[2:]] == [c.token_ids for c in alone]
    assert together[0].token_ids != together[1].token_ids  # the n samples differ
    other = llm.generate([PROMPT], n=2, **{**kw, "seed": 8})
    assert other[0].token_ids != together[0].token_ids


@pytest.mark.parametrize("kw", [dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0)])
def test_truncation_to_one_token_equals_greedy(llm, kw):
    greedy = llm.generate(PROMPT, max_new_tokens=12, temperature=0, ignore_eos=True)[0].token_ids
    assert llm.generate(PROMPT, max_new_tokens=12, temperature=1.5, seed=3, ignore_eos=True, **kw)[0].token_ids \
        == greedy


def test_filters_and_penalties_unit():
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0])
    p = SamplingParams(temperature=1.0, top_k=2)
    assert torch.isinf(filter_logits(logits, p)[2:]).all() and torch.isfinite(filter_logits(logits, p)[:2]).all()
    probs = logits.softmax(-1)
    p = SamplingParams(top_p=float(probs[0] + probs[1] / 2))
    kept = torch.isfinite(filter_logits(logits, p))
    assert kept.tolist() == [True, True, False, False]
    p = SamplingParams(min_p=0.3)  # p1/p0 = e^-1 = 0.37 stays, p2/p0 = e^-1.5 = 0.22 goes
    assert torch.isfinite(filter_logits(logits, p)).tolist() == [True, True, False, False]
    counts = torch.tensor([0.0, 2.0, 0.0, 1.0])
    seen = torch.tensor([True, True, False, True])
    out = apply_penalties(logits, counts, seen, SamplingParams(repetition_penalty=2.0))
    assert out.tolist() == [1.0, 0.5, 0.5, -2.0]
    out = apply_penalties(logits, counts, seen, SamplingParams(presence_penalty=0.5, frequency_penalty=0.25))
    assert out.tolist() == [2.0, 1.0 - 0.5 - 0.5, 0.5, -1.0 - 0.25 - 0.5]


def test_penalties_change_greedy_output(llm):
    plain = llm.generate(PROMPT, max_new_tokens=30, temperature=0, ignore_eos=True)[0].token_ids
    pen = llm.generate(PROMPT, max_new_tokens=30, temperature=0, ignore_eos=True, frequency_penalty=2.0)[0].token_ids
    assert len(set(pen)) >= len(set(plain))
    assert pen != plain or len(set(plain)) == len(plain)


def test_stop_string_across_token_boundary(llm):
    events = list(llm.stream(PROMPT, max_new_tokens=40, temperature=0, ignore_eos=True))
    texts = [e.text for e in events]
    full = "".join(texts)
    # a stop string made of the end of one token's text and the start of the next one
    offset = 0
    stop = None
    for a, b in zip(texts, texts[1:]):
        offset += len(a)
        if a and b and full.find(a[-2:] + b[:2]) == offset - len(a[-2:]):
            stop = a[-2:] + b[:2]
            break
    assert stop, "the test needs two adjacent tokens with text"
    out = llm.generate(PROMPT, max_new_tokens=40, temperature=0, ignore_eos=True, stop=[stop, "never-seen"])[0]
    assert out.finish_reason == "stop" and out.text == full[:full.find(stop)]
    streamed = list(llm.stream(PROMPT, max_new_tokens=40, temperature=0, ignore_eos=True, stop=[stop]))
    assert "".join(e.text for e in streamed) == out.text
    assert streamed[-1].finish_reason == "stop"


def test_stream_deltas_concatenate_to_generate_text(llm):
    kw = dict(max_new_tokens=20, temperature=0.9, seed=11, ignore_eos=True)
    events = list(llm.stream([PROMPT], n=2, **kw))
    done = llm.generate([PROMPT], n=2, **kw)
    for c in done:
        assert "".join(e.text for e in events if e.index == c.index) == c.text
        assert [e.token_id for e in events if e.index == c.index and e.token_id is not None] == c.token_ids


def test_stop_token_and_logprobs(llm):
    base = llm.generate(PROMPT, max_new_tokens=8, temperature=0, ignore_eos=True, logprobs=True, top_logprobs=3)[0]
    assert len(base.logprobs) == 8 and all(lp <= 0 for lp in base.logprobs)
    for tok, lp, top in zip(base.token_ids, base.logprobs, base.top_logprobs):
        assert tok in top and abs(top[tok] - lp) < 1e-6 and abs(max(top.values()) - lp) < 1e-6
    stop_id = base.token_ids[3]
    first = base.token_ids.index(stop_id)
    out = llm.generate(PROMPT, max_new_tokens=8, temperature=0, stop_token_ids=[stop_id])[0]
    assert out.finish_reason == "stop" and out.token_ids == base.token_ids[:first]


def test_errors_are_clear(llm):
    with pytest.raises(ZayaError, match="temperature"):
        llm.generate(PROMPT, temperature=-1)
    with pytest.raises(ZayaError, match="top_p"):
        llm.generate(PROMPT, top_p=0)
    with pytest.raises(ZayaError, match="at most 16 stop strings"):
        llm.generate(PROMPT, stop=[str(i) for i in range(17)])
    with pytest.raises(TypeError, match="unknown sampling argument"):
        llm.generate(PROMPT, temprature=1)
    with pytest.raises(ContextLengthError, match=r"max_new_tokens \(1020\) does not fit: .* so \d+ are left"):
        llm.generate(PROMPT, max_new_tokens=1020)
    with pytest.raises(ZayaError, match="token ids must be in"):
        llm.generate([[1, 2, 999999]])


def test_max_new_tokens_rule():
    assert fit_max_new_tokens(17, 1024) == DEFAULT_MAX_NEW_TOKENS          # unset: the default cap
    assert fit_max_new_tokens(17, 1024, default=4096) == 1007               # ... or the context's end
    assert fit_max_new_tokens(1000, 1024, default=4096) == 24
    assert fit_max_new_tokens(17, 1024, 1007) == 1007                       # explicit and fits
    with pytest.raises(ContextLengthError, match=r"--max-new-tokens \(1008\) does not fit: the prompt takes 17 of "
                                                 r"the context's 1024 tokens, so 1007 are left"):
        fit_max_new_tokens(17, 1024, 1008, name="--max-new-tokens")
    with pytest.raises(ContextLengthError, match="fills the context of 1024 tokens"):
        fit_max_new_tokens(1024, 1024)


def test_unset_max_new_tokens_fits_each_prompt(tmp_path):
    short = zaya.load(make_tiny_model_dir(tmp_path / "short", max_position_embeddings=64))
    long_prompt, short_prompt = list(range(10, 60)), [10, 11, 12]
    out = short.generate([long_prompt, short_prompt], temperature=0, ignore_eos=True)
    assert [len(c.token_ids) for c in out] == [14, 61]                      # each runs to the context's end
    assert all(c.finish_reason == "length" for c in out)
    with pytest.raises(ZayaError, match="max_new_tokens must be a positive integer"):
        short.generate([short_prompt], max_new_tokens=0)


def test_continuous_batching_join_and_cancel(llm):
    ids_a = llm.tokenizer.encode_prompt(PROMPT)
    ids_b = llm.tokenizer.encode_prompt("Hello! How can I assist you")
    p = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
    eng = Engine(llm.model, llm.tokenizer)
    a = Request(ids_a, p)
    eng.add(a)
    for _ in range(5):
        eng.step()
    b = Request(ids_b, p, prompt_index=1)
    eng.add(b)  # joins at a token boundary
    c = Request(ids_b, SamplingParams(max_new_tokens=50, temperature=0, ignore_eos=True), prompt_index=2)
    eng.add(c)
    assert eng.active == 3
    eng.step()
    eng.cancel(c)  # a client went away: its row is freed
    assert eng.active == 2 and len(eng.rows) == 2
    used = eng.cache.blocks_used()
    while eng.active:
        eng.step()
    assert a.sequences[0].token_ids == llm.generate([ids_a], max_new_tokens=12, temperature=0,
                                                    ignore_eos=True)[0].token_ids
    assert b.sequences[0].token_ids == llm.generate([ids_b], max_new_tokens=12, temperature=0,
                                                    ignore_eos=True)[0].token_ids
    assert c.sequences[0].finish_reason == "cancelled" and not eng.rows
    assert eng.cache.blocks_used() == 0 and used > 0  # every block given back (full ones stay cached)


def test_chat_returns_reasoning_and_content(llm):
    messages = [{"role": "user", "content": "What is 12 + 30?"}]
    ids = llm.apply_chat_template(messages)
    assert ids[0] == llm.tokenizer.bos_id and llm.tokenizer.decode(ids[-2:]).endswith("<think>\n")
    want = llm.generate([ids], max_new_tokens=16, temperature=0)[0]
    out = llm.chat(messages, max_new_tokens=16, temperature=0)
    assert out.completion.token_ids == want.token_ids and out.completion.text == want.text != ""
    # the template leaves <think> open: the text up to </think> is reasoning, the rest content
    reasoning, _, content = want.text.partition("</think>")
    assert (out.reasoning or "", out.content) == (reasoning.strip(), content.strip())
    plain = llm.chat(messages, max_new_tokens=16, temperature=0, enable_thinking=False)
    assert plain.reasoning is None and plain.content == plain.completion.text.strip() != ""


# -------------------------------------------------------------------------------- paged cache
def long_prompt(llm, words: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [2] + torch.randint(10, llm.config.vocab_size, (words,), generator=g).tolist()


def test_prefix_cache_across_calls(llm):
    ids = long_prompt(llm, 150, seed=1)
    kw = dict(max_new_tokens=8, temperature=0, ignore_eos=True)
    first, again = llm.generate([ids], **kw)[0], llm.generate([ids], **kw)[0]
    bs = llm.cache.block_size
    assert first.cached_tokens == 0 and again.cached_tokens == (len(ids) - 1) // bs * bs
    assert again.token_ids == first.token_ids
    plain = zaya.LLM(llm.model, llm.tokenizer, prefix_caching=False).generate([ids], **kw)[0]
    assert plain.cached_tokens == 0 and plain.token_ids == first.token_ids


def test_chat_turn_two_reuses_turn_one_up_to_the_dropped_reasoning(llm):
    system = {"role": "system", "content": " ".join(f"rule {i}: be brief." for i in range(40))}
    turn1 = [system, {"role": "user", "content": "What is 12 + 30?"}]
    r1 = llm.chat(turn1, max_new_tokens=24, temperature=0)
    turn2 = turn1 + [{"role": "assistant", "content": r1.content or "42", "reasoning_content": "adding"},
                     {"role": "user", "content": "And 12 + 31?"}]
    r2 = llm.chat(turn2, max_new_tokens=4, temperature=0)
    a, b = llm.apply_chat_template(turn1), llm.apply_chat_template(turn2)
    common = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    # the reasoning of an earlier turn is not rendered, so turn 2 differs from turn 1's prompt at its
    # generation prompt: everything before is reused, to the block boundary
    assert common < len(a) and r2.completion.cached_tokens == common // llm.cache.block_size * llm.cache.block_size


def test_rsa_round_prompts_share_the_template_and_question(llm):
    from zaya.rsa.prompts import ZYPHRA

    question = "Start with 22, then apply *2, -2, +6, *2, +2, -3 in order. What is the result?"
    tails = ["22 * 2 = 44, 44 - 2 = 42", "so the result is 90", "first 44, then 42, 48", "I get 95 in the end"]
    prompts = [llm.apply_chat_template([{"role": "user", "content": ZYPHRA(question, tails[i:] + tails[:i])}])
               for i in range(len(tails))]
    common = next(i for i, column in enumerate(zip(*prompts)) if len(set(column)) > 1)
    bs = llm.cache.block_size
    assert common >= 2 * bs  # the chat template's opening, the instruction and the question come first
    done = llm.generate(prompts, max_new_tokens=2, temperature=0)
    assert all(c.cached_tokens >= common // bs * bs for c in done[1:])


def test_n_samples_share_the_prompt_blocks(llm):
    eng = Engine(llm.model, llm.tokenizer, block_size=16, cache_memory=4 << 20)
    ids = long_prompt(llm, 200, seed=2)
    r = Request(ids, SamplingParams(max_new_tokens=5, n=4, temperature=1.0, seed=1, ignore_eos=True))
    eng.add(r)
    eng.step()  # prefill, fork, first tokens
    assert len(eng.rows) == 4
    assert eng.cache.blocks_used() == len(ids) // 16 + 4  # shared full blocks, one own block each
    assert [len(s.token_ids) for s in r.sequences] == [1] * 4
    while eng.active:
        eng.step()
    assert len({tuple(s.token_ids) for s in r.sequences}) > 1


def test_a_long_prompt_does_not_stall_running_rows(llm):
    eng = Engine(llm.model, llm.tokenizer, step_tokens=64, prefill_chunk=64)
    p = SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True)
    a = Request(llm.tokenizer.encode_prompt(PROMPT), p)
    eng.add(a)
    eng.step()
    b = Request(long_prompt(llm, 300, seed=3), p, prompt_index=1)
    eng.add(b)
    for _ in range(4):  # b's prefill is spread over steps; a gets a token in every one of them
        events = eng.step()
        assert [e.prompt_index for e in events] == [0]
    assert eng.waiting and eng.prompt_tokens_computed < len(a.prompt_ids) + 300


def test_a_full_pool_preempts_and_recomputes_exactly(llm):
    from zaya.engine.cache import bytes_per_block, state_bytes

    prompts = [long_prompt(llm, 20, seed=10 + i) for i in range(4)]
    kw = dict(max_new_tokens=60, temperature=0, ignore_eos=True)
    want = [c.token_ids for c in llm.generate(prompts, **kw)]
    blocks = 12  # 4 rows of 81 positions need 24 blocks of 16
    memory = 8 * state_bytes(llm.config, torch.float32) + blocks * bytes_per_block(llm.config, torch.float32, 16)
    eng = Engine(llm.model, llm.tokenizer, block_size=16, max_seqs=8, cache_memory=memory)
    requests = [Request(p, SamplingParams(**kw), i) for i, p in enumerate(prompts)]
    for _ in eng.run(requests):
        assert eng.cache.blocks_used() <= blocks
    assert eng.preemptions > 0
    assert [r.sequences[0].token_ids for r in requests] == want


def test_budget_errors_are_clear(llm):
    from zaya.engine.cache import bytes_per_block, state_bytes

    memory = 256 * state_bytes(llm.config, torch.float32) + 4 * bytes_per_block(llm.config, torch.float32, 32)
    eng = Engine(llm.model, llm.tokenizer, cache_memory=memory)
    assert eng.max_context == 128
    with pytest.raises(ContextLengthError, match="cache budget holds: 128 tokens.*--cache-memory"):
        eng.check(100, SamplingParams(max_new_tokens=50))
    with pytest.raises(ZayaError, match="too small for one sequence"):
        Engine(llm.model, llm.tokenizer, cache_memory=1000)
    with pytest.raises(ZayaError, match="too small for one sequence.*cache_memory="):  # at load, not first use
        zaya.LLM(llm.model, llm.tokenizer, cache_memory="1kB")
    small = zaya.LLM(llm.model, llm.tokenizer, cache_memory=memory)
    with pytest.raises(ContextLengthError, match="cache budget.*--cache-memory"):
        small.generate([list(range(10, 110))], max_new_tokens=50)
    with pytest.raises(ContextLengthError, match="fills the context.*KV cache budget.*--cache-memory"):
        small.generate([list(range(10, 140))])
    # an unset max_new_tokens runs to the end of what the budget holds, not of the model's context
    assert len(small.generate([list(range(10, 60))], temperature=0, ignore_eos=True)[0].token_ids) == 128 - 50


def _prefilled(engine: Engine, prompts: list[list[int]]) -> list[dict]:
    """Queue ``prompts`` (n=1 each) and step until every one is prefilled: per prompt its first
    logits, its CCA state (conv window, delayed value) and its keys and values, read back from
    the cache."""
    reqs = [Request(p, SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True), i)
            for i, p in enumerate(prompts)]
    seqs = [s for r in reqs for s in engine.add(r)]
    logits = {}
    while engine.waiting:
        before = len(engine.rows)
        with torch.inference_mode():
            engine._prefill(engine.step_tokens)
        for i, s in enumerate(engine.rows[before:]):
            logits[id(s)] = engine.logits[before + i].clone()
    cache, out = engine.cache, []
    for s in seqs:
        c, bs = s.cache, cache.block_size
        kv = []
        for group, table in zip(cache.groups, c.tables):
            slots = [table[p // bs] * bs + p % bs for p in range(c.computed) if table[p // bs] != 0]
            kv.append(group.kv[:, :, :, slots])
        out.append({"logits": logits[id(s)], "conv": cache.conv[:, c.slot].clone(),
                    "vdelay": cache.vdelay[:, c.slot].clone(), "kv": kv, "computed": c.computed})
    engine.reset()
    return out


def _assert_same_prefill(got: list[dict], want: list[dict]) -> None:
    for g, w in zip(got, want, strict=True):
        assert g["computed"] == w["computed"]
        assert g["logits"].argmax() == w["logits"].argmax()
        torch.testing.assert_close(g["logits"], w["logits"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(g["conv"], w["conv"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(g["vdelay"], w["vdelay"], rtol=1e-5, atol=1e-5)
        for a, b in zip(g["kv"], w["kv"], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("overrides", [dict(), dict(cca_time0=3, cca_time1=2),
                                       dict(sliding_window=6, layer_types=["hybrid", "hybrid_sliding", "hybrid"])])
def test_new_prompts_prefill_together_as_they_would_alone(overrides):
    """Prompts of different lengths admitted together run as one right-padded forward; each keeps
    the logits, CCA state and KV of a prefill of its own (fp32)."""
    from tests.tiny_model import make_tiny_model

    model = make_tiny_model(seed=2, **overrides)
    g = torch.Generator().manual_seed(0)
    prompts = [[2] + torch.randint(10, 512, (n,), generator=g).tolist() for n in (37, 40, 33, 45, 9)]
    together = Engine(model, block_size=8, prefix_caching=False, step_tokens=1024)
    got = _prefilled(together, prompts)
    assert together.prefill_forwards == 2   # the 10-token prompt would pad too much: a forward of its own
    alone = Engine(model, block_size=8, prefix_caching=False)
    want = [_prefilled(alone, [p])[0] for p in prompts]
    _assert_same_prefill(got, want)
    assert alone.prefill_forwards == len(prompts)
    kw = dict(max_new_tokens=12, temperature=0, ignore_eos=True, presence_penalty=1.5)
    reqs = [Request(p, SamplingParams.from_kwargs(**kw), i) for i, p in enumerate(prompts)]
    for _ in together.run(reqs):
        pass
    for p, r in zip(prompts, reqs):
        single = Request(p, SamplingParams.from_kwargs(**kw))
        for _ in alone.run([single]):
            pass
        assert r.sequences[0].token_ids == single.sequences[0].token_ids


def test_prompts_continuing_cached_prefixes_prefill_together(llm):
    """Sequences that start from cached blocks (different lengths of them) batch their remaining
    chunks; a prompt that shares blocks another is about to compute waits for them instead."""
    g = torch.Generator().manual_seed(4)
    vocab = llm.config.vocab_size
    head = [2] + torch.randint(10, vocab, (47,), generator=g).tolist()
    prompts = [head[:n] + torch.randint(10, vocab, (m,), generator=g).tolist()
               for n, m in ((48, 20), (32, 30), (16, 25))]
    engine = Engine(llm.model, block_size=16, step_tokens=1024)
    _prefilled(engine, [head])
    got = _prefilled(engine, prompts)
    assert engine.prefill_forwards == 2
    plain = Engine(llm.model, block_size=16, prefix_caching=False)
    _assert_same_prefill(got, [_prefilled(plain, [p])[0] for p in prompts])
    # two new prompts with a common opening not cached yet: the second waits and reuses it
    twins = [[2] + torch.randint(10, vocab, (40,), generator=g).tolist()]
    twins.append(twins[0][:33] + [11, 12, 13])
    engine.prefill_forwards = 0
    reqs = [Request(p, SamplingParams(max_new_tokens=2, temperature=0), i) for i, p in enumerate(twins)]
    for _ in engine.run(reqs):
        pass
    assert engine.prefill_forwards == 2 and reqs[1].cached_tokens == 32


def test_draw_follows_the_weights_and_skips_zero_ones():
    from zaya.sampling import draw
    weights = torch.tensor([0.0, 0.1, 0.0, 0.6, 0.3, 0.0])
    g = torch.Generator().manual_seed(0)
    n = 20000
    counts = torch.bincount(torch.tensor([draw(weights, g) for _ in range(n)]), minlength=6).float()
    assert counts[[0, 2, 5]].sum() == 0
    expected = weights * n
    chi2 = float(((counts[[1, 3, 4]] - expected[[1, 3, 4]]) ** 2 / expected[[1, 3, 4]]).sum())
    assert chi2 < 13.8  # 2 degrees of freedom, p = 0.001
    # the same generator state gives the same index; unnormalised weights give the same draw
    a, b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert [draw(weights, a) for _ in range(50)] == [draw(weights * 7, b) for _ in range(50)]


def test_a_seed_per_prompt(tmp_path):
    """``seed`` as a list gives each prompt of a call its own stream (one int gives every prompt
    the same, as alone); a list of the wrong length is refused."""
    llm = zaya.load(make_tiny_model_dir(tmp_path))
    kw = dict(max_new_tokens=12, temperature=1.0, ignore_eos=True)
    same = [o.token_ids for o in llm.generate([[2, 5, 6]] * 3, seed=7, **kw)]
    assert len({tuple(t) for t in same}) == 1
    own = [o.token_ids for o in llm.generate([[2, 5, 6]] * 3, seed=[7, 8, 9], **kw)]
    assert own[0] == same[0] and len({tuple(t) for t in own}) == 3
    assert own == [o.token_ids for o in llm.generate([[2, 5, 6]] * 3, seed=[7, 8, 9], **kw)]
    with pytest.raises(ZayaError, match="seed"):
        llm.generate([[2, 5, 6]] * 3, seed=[7, 8], **kw)
