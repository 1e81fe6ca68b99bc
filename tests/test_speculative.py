"""Speculative decoding: prompt-lookup drafts, exact verification, CCA-state rollback."""

from __future__ import annotations

import json

import pytest
import torch

import zaya
from tests.tiny_model import make_tiny_model, make_tiny_model_dir
from zaya.engine import Engine, Request
from zaya.engine.speculative import Drafter
from zaya.errors import ZayaError
from zaya.sampling import SamplingParams, filter_logits, verify_draft

torch.set_num_threads(1)  # tiny models on shared cores: thread wake-ups cost more than they bring


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return zaya.load(make_tiny_model_dir(tmp_path_factory.mktemp("m")))


def copy_prompt(seed: int, n: int = 24, vocab: int = 512) -> list[int]:
    """A prompt that repeats a random span, so prompt lookup finds drafts (right or wrong)."""
    g = torch.Generator().manual_seed(seed)
    span = torch.randint(10, vocab, (n,), generator=g).tolist()
    return [2] + span + span[:n // 2]


def run(engine: Engine, prompts, **kw) -> list[list[int]]:
    reqs = [Request(p, SamplingParams.from_kwargs(**kw), i) for i, p in enumerate(prompts)]
    out = {}
    for ev in engine.run(reqs):
        if ev.token_id is not None:
            out.setdefault((ev.prompt_index, ev.index), []).append(ev.token_id)
    return [r.sequences[0].token_ids for r in reqs]


def engines(model, k=8, **kw):
    return Engine(model, **kw), Engine(model, speculative=k, **kw)


def test_drafter_finds_latest_occurrence_and_backs_off():
    d = Drafter(8)
    tokens = [1, 2, 3, 4, 9, 1, 2, 3, 4, 7, 8, 1, 2, 3, 4]
    assert d.propose(tokens, 10) == [7, 8, 1, 2]       # k starts at 4, the later "1 2 3 4" wins
    assert d.propose(tokens + [5], 10) == []            # no earlier 5
    assert Drafter(8).propose([5, 6, 5], 1) == []       # a 1-gram only while copying
    assert Drafter(8).propose([5, 6, 5, 6], 1) == [5]   # 2-gram, room 1
    copying = Drafter(8)
    copying.update(4, 2)
    assert copying.propose([5, 6, 5], 1) == [6]         # last draft accepted: 1-grams count
    copying.update(4, 0)
    assert copying.propose([5, 6, 5], 1) == []
    for _ in range(3):
        d.update(4, 0)
    assert d.off == 8 and d.propose(tokens, 10) == []   # off after three failures
    d.off = 0
    d.update(4, 4)
    assert d.k == 3 and d.backoff == 8                  # 4 -> 1 by the failures, + 2 on success


def test_fit_bounds_the_padding_of_a_verify_forward():
    from zaya.engine.speculative import PAD_ROWS, fit
    assert fit([[5] * 8]) == [[5] * 8]                           # batch 1 never pads
    eight = [[5] * 8] + [[]] * 7
    assert fit(eight) == eight                                   # 72 positions, 56 of them padding
    few = [[5] * 8] * 10 + [[]] * 118
    assert fit(few) == [[]] * 128                                # 10 of 128 rows drafting: no verify
    most = [[5] * 8] * 80 + [[]] * 48
    cut = fit(most)
    S = 1 + max(map(len, cut))
    real = sum(1 + len(d) for d in cut)
    assert 1 < S < 9 and all(d == [5] * (S - 1) for d in cut[:80])
    assert 128 * S - real <= max(PAD_ROWS, real // 4)
    assert 128 * (S + 1) - (real + 80) > max(PAD_ROWS, (real + 80) // 4)   # the longest that fits
    assert fit([[5] * 8] * 8, max_rows=32) == [[5] * 3] * 8             # 8 x 4 rows
    assert fit([[5] * 8] * 64, max_rows=32) == [[]] * 64                # past the rows: no verify


@pytest.mark.parametrize("overrides", [dict(), dict(sliding_window=6, layer_types=["hybrid", "hybrid_sliding", "hybrid"]),
                                       dict(cca_time0=3, cca_time1=2)])
def test_greedy_equals_plain_decoding(overrides):
    model = make_tiny_model(seed=1, **overrides)
    plain, spec = engines(model, block_size=8)
    prompts = [copy_prompt(s) for s in range(4)]
    kw = dict(max_new_tokens=40, temperature=0, ignore_eos=True)
    want = run(plain, prompts, **kw)
    assert run(spec, prompts[:1], **kw) == want[:1]     # batch 1
    assert run(spec, prompts, **kw) == want             # batch of rows with different acceptance
    st = spec.spec_stats
    assert st.drafted > 0 and st.accepted > 0 and st.tokens_per_forward > 1


def test_verify_draft_follows_the_distribution():
    """Accept-or-resample for a fixed draft gives the model's distribution (chi-square test)."""
    logits = torch.tensor([1.0, 0.2, -0.5, 0.7, -2.0, 0.0])
    p = SamplingParams(temperature=0.8, top_k=5)
    probs = filter_logits(logits, p).softmax(-1)
    g = torch.Generator().manual_seed(0)
    N = 20000
    for draft in (0, 2, 4):   # likely, unlikely, filtered out (top_k)
        counts = torch.zeros(6)
        for _ in range(N):
            counts[verify_draft(logits, draft, p, g)] += 1
        keep = probs > 0
        assert counts[~keep].sum() == 0
        expected = probs[keep] * N
        chi2 = float(((counts[keep] - expected) ** 2 / expected).sum())
        assert chi2 < 20.5, (draft, chi2)   # 4 degrees of freedom: p < 0.0004


def test_bad_speculative_values():
    for bad in (17, -1, "yes", 2.5):
        with pytest.raises(ZayaError, match="speculative"):
            SamplingParams.from_kwargs(speculative=bad)
    assert SamplingParams.from_kwargs(speculative=True).speculative is True
    with pytest.raises(ZayaError, match="speculative"):
        Engine(make_tiny_model(), speculative=99)


TEXT = "the cat sat on the mat and the dog sat on the log. the cat sat on the mat and the dog"


def both(llm, prompt=TEXT, **kw):
    return (llm.generate(prompt, speculative=False, **kw)[0], llm.generate(prompt, speculative=True, **kw)[0])


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_greedy_equal_on_quantized_models(tmp_path, quantize):
    q = zaya.load(make_tiny_model_dir(tmp_path, seed=2), quantize=quantize)
    plain, spec = both(q, max_new_tokens=48, temperature=0, ignore_eos=True)
    assert spec.token_ids == plain.token_ids


def test_greedy_with_penalties_and_logprobs_equal(llm):
    kw = dict(max_new_tokens=40, temperature=0, ignore_eos=True, repetition_penalty=1.2, frequency_penalty=0.3,
              presence_penalty=0.2, logprobs=True, top_logprobs=2)
    plain, spec = both(llm, **kw)
    assert spec.token_ids == plain.token_ids
    assert spec.logprobs == pytest.approx(plain.logprobs, abs=1e-4)
    assert [sorted(t) for t in spec.top_logprobs] == [sorted(t) for t in plain.top_logprobs]


@pytest.mark.parametrize("max_new_tokens", [1, 2, 5, 13, 30])
def test_max_tokens_inside_a_draft_stops_exactly(llm, max_new_tokens):
    plain, spec = both(llm, max_new_tokens=max_new_tokens, temperature=0, ignore_eos=True)
    assert spec.token_ids == plain.token_ids and len(spec.token_ids) == max_new_tokens
    assert spec.finish_reason == "length"


def test_stop_strings_inside_a_draft_stop_exactly(llm):
    full = llm.generate(TEXT, max_new_tokens=40, temperature=0, ignore_eos=True)[0].text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    if not stop.strip():
        pytest.skip("the greedy text has no printable stop candidate at its middle")
    plain, spec = both(llm, max_new_tokens=40, temperature=0, ignore_eos=True, stop=[stop])
    assert spec.text == plain.text and spec.finish_reason == plain.finish_reason == "stop"
    assert stop not in spec.text


@pytest.mark.parametrize("kw", [dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0)])
def test_truncation_to_one_token_equals_greedy(llm, kw):
    greedy = llm.generate(TEXT, max_new_tokens=24, temperature=0, ignore_eos=True)[0].token_ids
    got = llm.generate(TEXT, max_new_tokens=24, temperature=1.3, seed=3, ignore_eos=True, speculative=True, **kw)
    assert got[0].token_ids == greedy


def test_seeded_sampling_reproduces_with_every_option(llm):
    kw = dict(max_new_tokens=32, temperature=0.9, top_p=0.95, top_k=50, min_p=0.01, repetition_penalty=1.1,
              presence_penalty=0.1, frequency_penalty=0.1, seed=11, logprobs=True, top_logprobs=1,
              ignore_eos=True, speculative=4, n=2)
    a = llm.generate([TEXT, "Hello! How can I"], **kw)
    b = llm.generate([TEXT], **kw)
    assert [c.token_ids for c in a[:2]] == [c.token_ids for c in b]   # batching does not change a request
    assert a[0].logprobs == pytest.approx(b[0].logprobs, abs=1e-4)
    assert all(len(c.logprobs) == len(c.token_ids) for c in a)


def test_sampled_tokens_follow_the_model_distribution():
    """The second token (the first verified against a draft) has the model's marginal law: its
    exact distribution sum_t1 p(t1) p(t2 | t1) from full forwards, against 3,072 samples."""
    V = 12
    model = make_tiny_model(seed=3, vocab_size=V)
    # "8 t 5" for every t, then 8: whatever the first token t1, "8 t1" was seen and a draft follows
    prompt = [2] + [x for t in range(V) for x in (8, t, 5)] + [8]
    with torch.no_grad():
        p1 = model(torch.tensor([prompt])).float()[0, -1].softmax(-1)
        ctx = torch.tensor([prompt + [t] for t in range(V)])
        p2 = (p1[:, None] * model(ctx).float()[:, -1].softmax(-1)).sum(0)
    engine = Engine(model, speculative=4)
    reqs = [Request(prompt, SamplingParams(max_new_tokens=3, temperature=1.0, ignore_eos=True, n=64, seed=s))
            for s in range(48)]
    counts = torch.zeros(V)
    for _ in engine.run(reqs):
        pass
    for r in reqs:
        for s in r.sequences:
            counts[s.token_ids[1]] += 1
    assert engine.spec_stats.drafted > 1000 and 0 < engine.spec_stats.accepted < engine.spec_stats.drafted
    N = counts.sum()
    big = p2 * N >= 5   # rare tokens are pooled into one cell
    observed, expected = counts[big], p2[big] * N
    if not big.all():
        observed = torch.cat([observed, counts[~big].sum()[None]])
        expected = torch.cat([expected, (p2[~big] * N).sum()[None]])
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < 32.9, chi2   # at most 11 degrees of freedom: p < 0.0005


def test_drafts_from_an_added_source():
    d = Drafter(8)
    d.add_source([5, 6, 7, 8, 9, 10])
    assert d.propose([1, 6, 7], 10) == [8, 9, 10]       # own tokens have no earlier "6 7"
    assert d.propose([1, 6, 7, 3, 6, 7], 10) == [3, 6, 7]   # own tokens first


def test_a_copied_source_is_drafted_at_full_length():
    """An output that copies an added source: once the match is established every draft is as
    long as k allows (4, 6, then the limit 8, then what max_tokens leaves) and is accepted whole,
    so a forward yields nearly k + 1 tokens. Counts forwards, never time."""
    model = make_tiny_model(seed=0)
    plain, spec = engines(model, k=8, block_size=16)
    g = torch.Generator().manual_seed(5)
    prompt = [2] + torch.randint(10, 512, (40,), generator=g).tolist()
    # a tiny model's greedy output repeats one token; the penalty keeps every token new, so the
    # drafts must come from the source
    kw = dict(max_new_tokens=48, temperature=0, ignore_eos=True, presence_penalty=2.0)
    want = run(plain, [prompt], **kw)[0]
    assert len(set(want)) == len(want)
    request = Request(prompt, SamplingParams.from_kwargs(**kw))
    seq, = spec.add(request)
    seq.drafter.add_source(want)
    updates = []
    update = seq.drafter.update
    seq.drafter.update = lambda d, a: (updates.append((d, a)), update(d, a))
    while spec.active:
        spec.step()
    assert seq.token_ids == want
    # the first token comes from the prefill and the second from a plain step (a one-token match
    # does not draft before a draft was accepted); from the third on the source is followed
    assert updates == [(4, 4), (6, 6), (8, 8), (8, 8), (8, 8), (6, 6)]
    st = spec.spec_stats
    assert (st.row_forwards, st.tokens) == (7, 47)


class _Forbid:
    """A constraint that forbids one token and records every token it is handed."""

    def __init__(self, token: int):
        self.token, self.accepted = token, []

    def start(self):
        return self

    def restrict(self, logits):
        logits = logits.clone()
        logits[self.token] = float("-inf")
        return logits

    def accept(self, token: int) -> None:
        self.accepted.append(token)

    def accepts(self, tokens: list[int]) -> int:
        return next((i for i, t in enumerate(tokens) if t == self.token), len(tokens))


def test_constrained_rows_do_not_draft():
    """A row with a constraint decodes one token per forward under speculation: the hook sees every
    token, output equals the plain constrained decode, and the unconstrained row beside it drafts."""
    model = make_tiny_model(seed=5)
    prompt = copy_prompt(3)
    plain = run(Engine(model), [prompt], max_new_tokens=30, temperature=0, ignore_eos=True)[0]
    forbid = plain[len(plain) // 2]
    outputs = []
    for k in (0, 8):
        eng, constraint = Engine(model, speculative=k), _Forbid(forbid)
        params = SamplingParams.from_kwargs(max_new_tokens=30, temperature=0, ignore_eos=True, constraint=constraint)
        free = SamplingParams.from_kwargs(max_new_tokens=30, temperature=0, ignore_eos=True)
        reqs = [Request(prompt, params, 0), Request(prompt, free, 1)]
        list(eng.run(reqs))
        got = reqs[0].sequences[0].token_ids
        assert forbid not in got and constraint.accepted == got
        assert reqs[1].sequences[0].token_ids == plain
        outputs.append(got)
        if k:  # the free row drafted, the constrained one never had a drafter
            assert eng.spec_stats.accepted > 0 and reqs[1].sequences[0].drafter is not None
            assert reqs[0].sequences[0].drafter is None
    assert outputs[0] == outputs[1]


def test_rsa_rounds_report_drafting(llm, tmp_path):
    """Aggregation rounds draft from the candidates in their prompts; round 0 does not draft."""
    from zaya.rsa import LocalBackend, solve

    audit = tmp_path / "audit.jsonl"
    result = solve(LocalBackend(llm), "What is 2 + 3?", profile="cpu-tiny", seed=0, progress=False, audit_path=audit)
    first, agg = result.rounds
    rounds = [json.loads(line) for line in audit.read_text().splitlines() if '"event": "round"' in line]
    assert [r["tokens_per_forward"] for r in rounds] == [first["tokens_per_forward"], agg["tokens_per_forward"]]
    assert "draft_acceptance" in rounds[1]
    assert first["draft_acceptance"] is None and first["tokens_per_forward"] == 1.0
    assert agg["tokens_per_forward"] is not None and agg["tokens_per_forward"] >= 1.0
    off = solve(LocalBackend(llm), "What is 2 + 3?", profile="cpu-tiny", seed=0, progress=False, speculative="off")
    assert off.rounds[1]["draft_acceptance"] is None
    with pytest.raises(Exception, match="speculative must be one of"):
        solve(LocalBackend(llm), "x", profile="cpu-tiny", speculative="sometimes")


def test_bench_reports_acceptance():
    from zaya.bench import speed

    out = speed(make_tiny_model(), prefill_tokens=16, new_tokens=12, batches=(1,), bandwidth=1e9, rounds=1,
                speculative=4)
    assert out["speculative"] == 4 and out["tokens_per_forward"] >= 1.0 and out["decode_b1_tok_s"] > 0


def test_joining_requests_and_a_full_pool_keep_greedy_exact():
    """Requests joining while others verify drafts, and preemption when the pool runs short."""
    from zaya.engine.cache import bytes_per_block, state_bytes

    model = make_tiny_model(seed=4)
    prompts = [copy_prompt(10 + s, n=16) for s in range(4)]
    kw = dict(max_new_tokens=50, temperature=0, ignore_eos=True)
    want = run(Engine(model), prompts, **kw)
    blocks = 10  # 4 rows of up to 75 positions need 20 blocks of 16
    memory = 8 * state_bytes(model.config, torch.float32) + blocks * bytes_per_block(model.config, torch.float32, 16)
    eng = Engine(model, block_size=16, max_seqs=8, cache_memory=memory, speculative=8)
    requests = [Request(p, SamplingParams(**kw), i) for i, p in enumerate(prompts)]
    eng.add(requests[0])
    for _ in range(6):
        eng.step()
    for r in requests[1:]:
        eng.add(r)
    while eng.active:
        eng.step()
        assert eng.cache.blocks_used() <= blocks
    assert eng.preemptions > 0 and eng.spec_stats.accepted > 0
    assert [r.sequences[0].token_ids for r in requests] == want
