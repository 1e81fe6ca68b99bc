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
    assert eng.active == 2 and eng.cache.batch_size == 2
    while eng.active:
        eng.step()
    assert a.sequences[0].token_ids == llm.generate([ids_a], max_new_tokens=12, temperature=0,
                                                    ignore_eos=True)[0].token_ids
    assert b.sequences[0].token_ids == llm.generate([ids_b], max_new_tokens=12, temperature=0,
                                                    ignore_eos=True)[0].token_ids
    assert c.sequences[0].finish_reason == "cancelled" and eng.cache is None


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
