"""Markovian RSA without weights: answers, templates, profiles, and the algorithm over a scripted
backend and a mock LLM (tails, K-of-N sampling, budgets, context bound, vote, audit, seeds)."""

from __future__ import annotations

import copy
import json
import random
import re
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zaya.rsa import (
    PROFILES,
    ZYPHRA,
    RSARun,
    Candidate,
    LocalBackend,
    RSAError,
    extract_boxed,
    majority_vote,
    make_config,
    normalize_answer,
    run_batched,
    solve,
)
from zaya.chat import split_reasoning
from zaya.rsa.backends import TokenTools, _chunks


class WordTokenizer:
    """Tokens are words with their leading whitespace, so decode(encode(x)) == x exactly."""

    def __init__(self):
        self.vocab: dict[str, int] = {}
        self.words: list[str] = []

    def encode(self, text, add_special_tokens=False):
        ids = []
        for piece in re.findall(r"\s*\S+|\s+", text):
            if piece not in self.vocab:
                self.vocab[piece] = len(self.words)
                self.words.append(piece)
            ids.append(self.vocab[piece])
        return ids

    def decode(self, ids):
        return "".join(self.words[i] for i in ids)


class ByteTokenizer:
    """UTF-8 bytes; a tail cut inside a character decodes to U+FFFD."""

    def encode(self, text, add_special_tokens=False):
        return list(text.encode())

    def decode(self, ids):
        return bytes(ids).decode(errors="replace")


class ScriptedBackend(TokenTools):
    """Deterministic candidates ``c{call}x{i}w{j}`` (reasoning) + ``</think>`` + a boxed answer.

    Records every call. ``answer(call, i)`` and ``finish(call, i)`` script the outcomes; texts
    longer than ``max_tokens`` are cut there and finish with "length", as an engine would.
    """

    name = "scripted"

    def __init__(self, answer=lambda call, i: "42", finish=lambda call, i: "stop", words=24):
        self.tokenizer = WordTokenizer()
        self.answer, self.finish, self.words = answer, finish, words
        self.calls: list[dict] = []
        self.outputs: list[list[Candidate]] = []

    def generate(self, messages_list, *, n, max_tokens, temperature, top_p, top_k, seed,
                 enable_thinking=None, batch_size=None, progress=None):
        call = len(self.calls)
        self.calls.append(dict(messages_list=copy.deepcopy(messages_list), n=n,
                               max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                               top_k=top_k, seed=seed, batch_size=batch_size))
        out, flat = [], []
        for p, messages in enumerate(messages_list):
            row = []
            for s in range(n):
                i = p * n + s
                noise = random.Random(f"{seed}|{messages[-1]['content']}|{s}").randint(0, 999)
                uid = f"c{call}x{i}"
                reasoning = " ".join(f"{uid}w{j}" for j in range(self.words)) + f" noise{noise}"
                ans = self.answer(call, i)
                content = f"CONTENT{uid} \\boxed{{{ans}}}" if ans is not None else "no idea"
                row.append(self._candidate(reasoning + "</think>" + content, reasoning, content,
                                           self.finish(call, i), messages, max_tokens))
                if progress:
                    progress(row[-1].completion_tokens, 1)
            out.append(row)
            flat += row
        self.outputs.append(flat)
        return out

    def _candidate(self, text, reasoning, content, finish, messages, max_tokens):
        ids = self._encode(text)
        if len(ids) > max_tokens:
            text = self.tokenizer.decode(ids[:max_tokens])
            reasoning, content = split_reasoning(text, started_in_reasoning=True)
            reasoning = reasoning or ""
            finish, ids = "length", ids[:max_tokens]
        prompt = sum(self.count_tokens(m["content"]) for m in messages) + 3 * len(messages)
        return Candidate(text, reasoning, content, finish, prompt, len(ids))


SOLUTION = re.compile(r"---- (?:Solution \d+|Candidate) ----\n(.*?)\n\n", re.S)


def tails_in(prompt: str) -> list[str]:
    return SOLUTION.findall(prompt + "\n\n")


def run(backend=None, **kw):
    backend = backend or ScriptedBackend()
    kw.setdefault("progress", False)
    return backend, solve(backend, "What is 6*7? Let's think step by step.", **kw)


# ---------------------------------------------------------------- answers


def test_extract_boxed():
    assert extract_boxed(r"so \boxed{42}.") == "42"
    assert extract_boxed(r"\boxed{\frac{1}{2}}") == r"\frac{1}{2}"
    assert extract_boxed(r"\boxed{1} then \boxed{2}") == "2"
    assert extract_boxed(r"\boxed{ok} and \boxed{cut off") == "ok"
    assert extract_boxed(r"\boxed 7.") == "7"
    assert extract_boxed(r"\fbox{x}") == "x"
    assert extract_boxed("no box") is None and extract_boxed("") is None
    assert extract_boxed(r"\boxed{}") == ""


def test_normalize_answer():
    assert normalize_answer(" $042$ .") == "42"
    assert normalize_answer(r"\left(1, 2\right)") == "(1, 2)"
    assert normalize_answer(r"\text{abc}") == "abc"
    assert normalize_answer("{42}") == "42"
    assert normalize_answer("{a}{b}") == "{a}{b}"
    assert normalize_answer(r"\dfrac{1}{2}") == r"\frac{1}{2}"
    assert normalize_answer("1,000") == "1000"
    assert normalize_answer(r"90^\circ") == "90"
    assert normalize_answer("") is None and normalize_answer(None) is None


def test_majority_vote_and_tie_break():
    v = majority_vote(["42", "7", "42", None], ["length", "stop", "stop", "stop"])
    assert (v.winner, v.winner_index, v.counts, v.no_answer, v.tie) == (
        "42", 2, {"42": 2, "7": 1}, 1, False)
    # 7 and 3 tie on votes; only 3 has a candidate that finished with "stop"
    v = majority_vote(["7", "3", "7", "3"], ["length", "length", "length", "stop"])
    assert (v.winner, v.winner_index, v.tie) == ("3", 3, True)
    # a full tie falls to the answer seen first
    assert majority_vote(["7", "3"], ["stop", "stop"]).winner == "7"
    v = majority_vote([None, ""], ["stop", "stop"])
    assert (v.winner, v.winner_index, v.counts, v.no_answer) == (None, None, {}, 2)


# ---------------------------------------------------------------- tails


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet="ab é\n", max_size=60), st.integers(1, 20))
def test_tail_is_the_last_tau_tokens(text, tau):
    words = TokenTools()
    words.tokenizer = WordTokenizer()
    ids = words.tokenizer.encode(text)
    assert words.tail(text, tau) == words.tokenizer.decode(ids[-tau:])
    raw = TokenTools()
    raw.tokenizer = ByteTokenizer()
    tail = raw.tail(text, tau)
    assert text.endswith(tail) and raw.count_tokens(tail) <= tau
    assert len(tail.encode()) >= min(tau, len(text.encode())) - 1  # at most one char shaved


# ---------------------------------------------------------------- templates and profiles


def test_zyphra_template_wording():
    multi = ZYPHRA("Q? Let's think step by step.", ["t1", "t2"])
    assert multi.startswith("You are given a math problem and several candidate solutions.")
    assert "[[ Problem ]]:\n\nQ?\n" in multi and "Let's think" not in multi
    assert tails_in(multi) == ["t1", "t2"]
    assert multi.endswith("end with the final answer in \\boxed{}.")
    single = ZYPHRA("Q?", ["t1"])
    assert single.startswith("You are given a math problem and a candidate solution.")
    assert tails_in(single) == ["t1"] and "comprehensive solution." in single


def test_profiles_and_overrides():
    h = make_config("report-headline")
    assert (h.rounds, h.n, h.k, h.budget, h.tail) == (2, 16, 4, 40000, 4096)
    assert make_config("deployment").budget == 16384 == make_config().budget
    x = make_config("apex-extra-high")
    assert (x.rounds, x.n, x.k, x.budget) == (8, 32, 4, 32768)
    tiny = make_config("cpu-tiny", n=6, seed=3, temperature=None)
    assert (tiny.n, tiny.k, tiny.rounds, tiny.budget, tiny.tail, tiny.seed) == (6, 2, 1, 64, 32, 3)
    assert tiny.temperature == PROFILES["cpu-tiny"].temperature
    assert make_config("cpu-small", tail=0).tail_limit == 256
    for bad in [dict(profile="nope"), dict(n=2, k=3), dict(selection="best"), dict(bogus=1),
                dict(budget=0)]:
        with pytest.raises(RSAError):
            make_config(**bad)


# ---------------------------------------------------------------- the algorithm


def test_rounds_tails_and_budgets():
    backend, result = run(profile="cpu-small", n=6, k=3, rounds=3, budget=40, tail=7,
                          temperature=0.7, top_p=0.9, seed=1)
    calls = backend.calls
    assert len(calls) == 4
    assert len(calls[0]["messages_list"]) == 1 and calls[0]["n"] == 6  # one shared prefill
    assert all(len(c["messages_list"]) == 6 and c["n"] == 1 for c in calls[1:])
    assert all((c["max_tokens"], c["temperature"], c["top_p"]) == (40, 0.7, 0.9) for c in calls)
    for t, call in enumerate(calls[1:], 1):
        previous = backend.outputs[t - 1]
        expected = {backend.tail(c.reasoning, 7).strip(): f"c{t - 1}x{i}"
                    for i, c in enumerate(previous)}
        for messages in call["messages_list"]:
            tails = tails_in(messages[-1]["content"])
            assert len(tails) == 3
            sources = [expected[tail] for tail in tails]  # each is a previous-round tail
            assert len(set(sources)) == 3  # K distinct candidates
            assert all(backend.count_tokens(tail) <= 7 for tail in tails)
            assert "CONTENT" not in messages[-1]["content"]  # reasoning only, never the answer
    assert [r["round"] for r in result.rounds] == [0, 1, 2, 3]
    assert result.requests == 24 and len(result.population) == 6
    assert result.completion_tokens == sum(c.completion_tokens for o in backend.outputs for c in o)


def test_parents_are_recorded_from_previous_round():
    _, result = run(profile="cpu-small", n=5, k=2, rounds=2, budget=30, tail=5, seed=4)
    for t, population in enumerate(result.candidates):
        for m in population:
            assert len(m.parents) == (0 if t == 0 else 2)
            assert all(p.startswith(f"r{t - 1}.") for p in m.parents)
            assert len(set(m.parents)) == len(m.parents)


def test_candidates_are_listed_in_population_order_so_prompts_share_prefixes():
    backend, result = run(profile="cpu-small", n=8, k=4, rounds=2, budget=30, tail=6, seed=3)
    for t in (1, 2):
        prompts = [m[-1]["content"] for m in backend.calls[t]["messages_list"]]
        parents = [[int(p.split(".c")[1]) for p in m.parents] for m in result.candidates[t]]
        assert all(ps == sorted(ps) for ps in parents)
        tails = [backend.tail(m.reasoning, 6).strip() for m in backend.outputs[t - 1]]
        assert [tails_in(p) for p in prompts] == [[tails[i] for i in ps] for ps in parents]
        # prompts whose subsets have the same lowest index open with the same text through
        # that candidate's tail, which is what the prefix cache shares
        for a in range(8):
            for b in range(a + 1, 8):
                same = 0
                while same < 4 and parents[a][same] == parents[b][same]:
                    same += 1
                opening = prompts[a].index("---- Solution 1 ----")
                shared = (len(prompts[a]) if same == 4
                          else prompts[a].index(f"---- Solution {same + 1} ----"))
                assert prompts[a][:shared] == prompts[b][:shared]
                assert (prompts[a][:opening + 30] == prompts[b][:opening + 30]) == (same > 0)
    # the subsets are still drawn from every K-of-N choice: some prompts start past index 0
    firsts = {int(m.parents[0].split(".c")[1]) for r in result.candidates[1:] for m in r}
    assert firsts != {0} and 0 in firsts


def test_untruncated_reasoning_and_full_chain():
    # budget cuts inside the reasoning: no </think>, the whole text is the reasoning
    backend, _ = run(profile="cpu-tiny", n=3, k=2, rounds=1, budget=10, tail=4, seed=0)
    first = backend.outputs[0][0]
    assert first.finish_reason == "length" and "</think>" not in first.text
    assert first.reasoning == first.text
    # tail=0 carries whole reasoning traces (full-chain RSA)
    backend, result = run(profile="cpu-tiny", n=3, k=2, rounds=1, budget=200, tail=0, seed=0)
    tails = tails_in(backend.calls[1]["messages_list"][0][-1]["content"])
    assert all(t in {c.reasoning.strip() for c in backend.outputs[0]} for t in tails)
    assert result.context["tail_tokens"] == 200


def test_k1_uses_the_refinement_prompt():
    backend, _ = run(profile="markovian-baseline", n=3, rounds=2, budget=30, tail=5, seed=0)
    prompt = backend.calls[1]["messages_list"][0][-1]["content"]
    assert prompt.startswith("You are given a math problem and a candidate solution.")
    assert len(tails_in(prompt)) == 1


def test_context_bound_is_measured_and_enforced():
    backend, result = run(profile="cpu-small", n=6, k=4, rounds=2, budget=60, tail=9, seed=2)
    ctx = result.context
    q = backend.count_tokens("What is 6*7? Let's think step by step.")
    assert ctx["prompt_bound"] == q + 4 * 9 + ctx["template_overhead"]
    assert 0 < ctx["max_prompt_tokens"] <= ctx["prompt_bound"]
    assert ctx["aggregation_prompts"] == 12 and ctx["max_completion_tokens"] <= 60
    for call in backend.calls[1:]:
        for messages in call["messages_list"]:
            assert backend.count_tokens(messages[-1]["content"]) <= ctx["prompt_bound"]

    def doubling(question, tails):  # carries each tail twice: breaks the bound
        return ZYPHRA(question, [t + " " + t if t else t for t in tails])

    with pytest.raises(RSAError, match="bound"):
        run(profile="cpu-small", n=4, k=2, rounds=1, budget=60, tail=9, template=doubling)


def test_selection_majority_prefers_stop_on_ties():
    answers = {0: ["1", "1", "1", "1"], 1: ["7", "3", "7", "3"]}
    finish = {1: ["length", "length", "length", "stop"]}
    backend = ScriptedBackend(answer=lambda c, i: answers[c][i],
                              finish=lambda c, i: finish.get(c, ["stop"] * 4)[i])
    _, result = run(backend, profile="cpu-tiny", n=4, k=2, rounds=1, budget=200, seed=0)
    assert result.answer == "3" and result.vote.tie and result.vote.counts == {"7": 2, "3": 2}
    assert result.text == "CONTENTc1x3 \\boxed{3}"
    assert result.rounds[0]["answers"] == {"1": 4} and result.rounds[1]["answers"] == {
        "7": 2, "3": 2}
    assert result.to_dict()["winner"] == "r1.c3"


def test_selection_final_agg_and_population():
    backend = ScriptedBackend(answer=lambda c, i: "9" if c == 2 else "5")
    _, result = run(backend, profile="cpu-tiny", rounds=1, budget=200, seed=0,
                    selection="final_agg")
    final_call = backend.calls[-1]
    assert len(backend.calls) == 3 and len(final_call["messages_list"]) == 1
    assert (final_call["temperature"], final_call["top_p"], final_call["top_k"]) == (0.6, 0.95, 40)
    assert final_call["max_tokens"] == 200
    assert result.answer == "9" and result.vote.winner == "5" and result.final.id == "final"
    assert len(tails_in(final_call["messages_list"][0][-1]["content"])) == 2
    assert result.requests == 9
    _, result = run(profile="cpu-tiny", seed=0, selection="population", final_budget=5)
    assert result.answer is None and len(result.population) == 4


def test_no_extractable_answer():
    _, result = run(ScriptedBackend(answer=lambda c, i: None), profile="cpu-tiny", budget=200)
    assert result.answer is None and result.vote.no_answer == 4


def test_audit_is_complete(tmp_path):
    path = tmp_path / "run.jsonl"
    backend, result = run(profile="cpu-small", n=4, k=2, rounds=2, budget=40, tail=6, seed=5,
                          audit_path=path)
    events = [json.loads(line) for line in path.read_text().splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "final"
    assert events[0]["config"]["n"] == 4 and events[0]["backend"] == "scripted"
    prompts = [e for e in events if e["event"] == "prompt"]
    sent = [(m, c["n"]) for c in backend.calls for m in c["messages_list"]]
    assert [(e["messages"], e["n"]) for e in prompts] == sent
    assert all(e["prompt_tokens_counted"] <= e["prompt_bound"] for e in prompts[1:])
    candidates = [e for e in events if e["event"] == "candidate"]
    assert [e["text"] for e in candidates] == [c.text for o in backend.outputs for c in o]
    for e in candidates:
        assert {"answer", "finish_reason", "prompt_tokens", "completion_tokens", "seconds",
                "parents", "reasoning", "content"} <= set(e)
        assert (e["tail"] is None) == (e["round"] == 2)  # last round passes nothing on
    assert [e["round"] for e in events if e["event"] == "round"] == [0, 1, 2]
    assert events[-1]["summary"]["completion_tokens"] == result.completion_tokens


def test_seed_reproducibility():
    def once(seed):
        backend, result = run(profile="cpu-small", n=6, k=3, rounds=2, budget=40, tail=6,
                              seed=seed)
        d = result.to_dict(include_text=True)
        for m in d["population"]:
            m.pop("seconds")
        return [c["messages_list"] for c in backend.calls], [c["seed"] for c in backend.calls], (
            d["population"], d["votes"])

    assert once(11) == once(11)
    assert once(11)[0] != once(12)[0]


def test_message_problem_keeps_system_prompt():
    backend = ScriptedBackend()
    problem = [{"role": "system", "content": "Answer in French."},
               {"role": "user", "content": "Combien font 2+2?"}]
    solve(backend, problem, profile="cpu-tiny", budget=200, progress=False)
    assert backend.calls[0]["messages_list"][0] == problem
    aggregation = backend.calls[1]["messages_list"][0]
    assert aggregation[0] == problem[0] and "Combien font 2+2?" in aggregation[1]["content"]


def test_progress_bar_runs(capsys):
    _, result = run(profile="cpu-tiny", budget=200, progress=True)
    assert "round 1" in capsys.readouterr().err and result.answer == "42"


# ---------------------------------------------------------------- the step machine and its drivers


def test_step_machine_requests_and_feed(tmp_path):
    backend = ScriptedBackend()
    audit = tmp_path / "run.jsonl"
    run = RSARun(backend, "What is 6*7?", profile="cpu-tiny", n=3, k=2, rounds=1, budget=50,
                 seed=3, selection="final_agg", audit_path=audit)
    first = run.next_request()
    assert (first.round, first.final, first.n, len(first.prompts), first.label) == (0, False, 3, 1, "round 0")
    assert first.sampling() == dict(max_tokens=50, temperature=1.0, top_p=1.0, top_k=0,
                                    seed=first.seed, enable_thinking=None, batch_size=None)
    assert run.next_request() is first  # asking again does not advance the run
    with pytest.raises(RSAError, match="expected 3 candidates for each of 1 prompts"):
        run.feed(backend.generate(first.prompts, n=2, **first.sampling()))
    labels = []
    while (request := run.next_request()) is not None:
        labels.append((request.label, request.sequences))
        run.feed(backend.generate(request.prompts, n=request.n, **request.sampling()))
    assert labels == [("round 0", 3), ("round 1", 3), ("final", 1)]
    assert run.result.answer == "42" and run.result.final.id == "final"
    assert json.loads(audit.read_text().splitlines()[-1])["event"] == "final"
    with pytest.raises(RSAError, match="finished"):
        run.feed([])
    # driven by hand, the step machine gives what solve() gives
    solved = solve(ScriptedBackend(), "What is 6*7?", profile="cpu-tiny", n=3, k=2, rounds=1,
                   budget=50, seed=3, selection="final_agg", progress=False)
    assert _no_seconds(solved) == _no_seconds(run.result)


def _no_seconds(result):
    members = [m.to_dict() for m in [*result.population, result.final]]
    for m in members:
        m["seconds"] = 0.0
    return members, result.vote


def test_run_batched_merges_the_steps_of_many_runs():
    backend = ScriptedBackend()
    runs = [RSARun(backend, f"Problem {i}?", profile="cpu-tiny", n=4, k=2, rounds=2, budget=50, seed=i)
            for i in range(3)]
    first_seeds = [r.next_request().seed for r in runs]
    run_batched(backend, runs)
    assert len(backend.calls) == 3  # one call per round, not per run and round
    assert [len(c["messages_list"]) for c in backend.calls] == [3, 12, 12]
    assert [c["n"] for c in backend.calls] == [4, 1, 1]
    assert backend.calls[0]["seed"] == first_seeds[0]  # the first run's seed serves the batch
    for i, r in enumerate(runs):
        assert r.next_request() is None and len(r.result.population) == 4
        assert all(f"Problem {i}?" in m[-1]["content"] for m in backend.calls[1]["messages_list"][4 * i:4 * i + 4])


# ---------------------------------------------------------------- LocalBackend over a mock LLM


class MockLLM:
    """The ``zaya.LLM`` surface LocalBackend uses: apply_chat_template, generate, stream."""

    def __init__(self):
        self.tokenizer = WordTokenizer()
        self.calls = []

    def apply_chat_template(self, messages, add_generation_prompt=True, enable_thinking=None):
        text = "".join(f"<|{m['role']}|> {m['content']}\n" for m in messages)
        return self.tokenizer.encode(text + "<|assistant|> <think>")

    def _texts(self, prompts, n, max_new_tokens, seed):
        for p, ids in enumerate(prompts):
            for s in range(n):
                words = [f" p{len(ids)}s{s}seed{seed}w{j}" for j in range(6)]
                words += ["</think>", r" \boxed{5}"]
                finish = "stop" if len(words) <= max_new_tokens else "length"
                yield p, s, words[:max_new_tokens], finish, len(ids)

    def generate(self, prompts, *, n=1, max_new_tokens=256, seed=None, **sampling):
        self.calls.append(("generate", len(prompts), n, seed, max_new_tokens, sampling))
        return [SimpleNamespace(text="".join(w), token_ids=list(range(len(w))), finish_reason=f,
                                prompt_index=p, index=s, prompt_tokens=plen)
                for p, s, w, f, plen in self._texts(prompts, n, max_new_tokens, seed)]

    def stream(self, prompts, *, n=1, max_new_tokens=256, seed=None, **sampling):
        self.calls.append(("stream", len(prompts), n, seed, max_new_tokens, sampling))
        seqs = list(self._texts(prompts, n, max_new_tokens, seed))
        for step in range(max(len(w) for _, _, w, _, _ in seqs) + 1):  # interleaved, like a batch
            for p, s, words, finish, _ in seqs:
                if step < len(words):
                    yield SimpleNamespace(prompt_index=p, index=s, token_id=step,
                                          text=words[step], finish_reason=None)
                elif step == len(words):
                    yield SimpleNamespace(prompt_index=p, index=s, token_id=None, text="",
                                          finish_reason=finish)


def test_local_backend_shared_prefill_batching_and_split():
    llm = MockLLM()
    result = solve(llm, "2+3?", profile="cpu-tiny", n=4, k=2, rounds=2, budget=64, seed=0,
                   progress=False)
    kinds = [c[:3] for c in llm.calls]
    assert kinds == [("generate", 1, 4), ("generate", 4, 1), ("generate", 4, 1)]
    assert all(c[4] == 64 and c[5]["top_k"] == 0 for c in llm.calls)
    assert result.answer == "5" and result.vote.counts == {"5": 4}
    member = result.population[0]
    assert member.candidate.content == r"\boxed{5}" and "</think>" not in member.candidate.reasoning
    assert member.candidate.prompt_tokens > 0 and member.candidate.completion_tokens == 8
    assert "</think>" not in result.candidates[0][0].tail


def test_local_backend_chunks_and_stream_path():
    llm = MockLLM()
    backend = LocalBackend(llm, batch_size=3)
    ticks = []
    out = backend.generate([[{"role": "user", "content": "q"}]], n=8, max_tokens=5,
                           temperature=1.0, top_p=1.0, top_k=0, seed=7,
                           progress=lambda tok, done: ticks.append((tok, done)))
    assert [c[:3] for c in llm.calls] == [("stream", 1, 3), ("stream", 1, 3), ("stream", 1, 2)]
    assert len({tuple(c[3]) for c in llm.calls}) == 3  # distinct derived seeds per chunk (one per prompt)
    assert len(out[0]) == 8 and all(c.finish_reason == "length" for c in out[0])
    assert all(c.completion_tokens == 5 and c.content == "" for c in out[0])
    assert sum(t for t, _ in ticks) == 40 and sum(d for _, d in ticks) == 8
    assert list(_chunks(5, 1, 2)) == [([0, 1], 1), ([2, 3], 1), ([4], 1)]
    assert list(_chunks(2, 3, None)) == [([0, 1], 3)]
