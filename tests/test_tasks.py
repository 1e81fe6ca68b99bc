"""The built-in model's task: problems, worked solutions, the held-out split, aggregation data."""

from __future__ import annotations

import json
import random

import pytest

from zaya.rsa.answers import boxed_answer
from zaya.rsa.prompts import ZYPHRA
from zaya.tasks import builtin_test_set, problem_records
from zaya.tasks.__main__ import main as tasks_main
from zaya.tasks.aggregation import Tails, aggregation_example, plain_example
from zaya.tasks.arithmetic import (LEVELS, MAX_VALUE, Problem, corrupted_reasoning, random_problem,
                                   reasoning, sample_problems, solution_message, split_of)


def test_problem_text_steps_and_answer():
    p = Problem(37, (("+", 8), ("-", 9), ("*", 2)), level=1)
    assert p.text == "Start with 37, then apply +8, -9, *2 in order. What is the result?"
    assert p.values() == [45, 36, 72] and p.answer == 72
    assert reasoning(p) == "37+8=45\n45-9=36\n36*2=72\nresult 72"
    assert reasoning(p, result_line=False) == "37+8=45\n45-9=36\n36*2=72"  # the recipe's first stages
    msg = solution_message(p)
    assert boxed_answer(msg["content"]) == "72"


@pytest.mark.parametrize("level", sorted(LEVELS))
def test_levels_respect_their_shape(level):
    rng = random.Random(level)
    steps, top, _ = LEVELS[level]
    for _ in range(200):
        p = random_problem(rng, level)
        assert len(p.ops) == steps
        assert all(0 <= v <= MAX_VALUE for v in p.values())
        assert all(b <= top for op, b in p.ops if op in "+-")


def test_split_is_disjoint_by_construction():
    train = sample_problems(3000, "train", LEVELS, seed=1)
    test = sample_problems(300, "test", LEVELS, seed=1)
    assert all(split_of(p) == "train" for p in train)
    assert all(split_of(p) == "test" for p in test)
    assert not {p.key for p in train} & {p.key for p in test}
    # other seeds cannot leak either: membership is a property of the problem, not of the draw
    assert all(split_of(p) == "train" for p in sample_problems(500, "train", LEVELS, seed=99))
    assert len({p.key for p in test}) == len(test)


def test_builtin_test_set_is_fixed():
    a, b = builtin_test_set(20), builtin_test_set(20)
    assert [p.key for p in a] == [p.key for p in b]
    recs = problem_records(a)
    assert recs[0]["answer"] == str(a[0].answer) and recs[0]["problem"] == a[0].text


@pytest.mark.parametrize("extra_step", [False, True])
def test_corruptions_are_wrong_and_carried_forward(extra_step):
    rng = random.Random(0)
    extra = 0
    for _ in range(300):
        p = random_problem(rng, rng.choice(sorted(LEVELS)))
        text, final = corrupted_reasoning(p, rng, extra_step)
        assert text != reasoning(p)
        right_steps = reasoning(p).rsplit("\n", 1)[0]
        if text.startswith(right_steps + "\n") and not text.endswith("..."):  # one step too many
            extra += 1
            assert len(text.splitlines()) == len(p.ops) + 2
        if final is None:  # a cut-off candidate
            assert text.endswith("...")
            continue
        assert final != p.answer
        *lines, last = text.splitlines()
        assert last == f"result {final}"  # a finished chain names its result
        prev, slips = None, 0
        for line in lines:  # each line continues from the previous result
            lhs, rhs = line.split("=")
            i = next(i for i, ch in enumerate(lhs) if ch in "+-*" and i > 0)  # skip a leading minus
            a, op, b = lhs[:i], lhs[i], lhs[i + 1:]
            slips += int(rhs) != {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
            if prev is not None:
                assert int(a) == prev
            prev = int(rhs)
        assert slips <= 2  # the mistake, plus a forced one when it cancelled out
        assert prev == final
    assert (extra > 40) if extra_step else (extra == 0)


class _CharTokenizer:
    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def test_aggregation_example_uses_the_rsa_template_and_tails():
    rng = random.Random(0)
    p = sample_problems(1, "train", [4], seed=0)[0]
    tails = Tails(_CharTokenizer())
    rec = aggregation_example(p, rng, tails, k=4, tail=20)
    user, target = rec["messages"]
    assert target == solution_message(p)
    blocks = user["content"].split("---- Solution ")[1:]
    assert len(blocks) == 4
    cands = [b.split(" ----\n", 1)[1].rsplit("\n", 1)[0].strip() for b in blocks]
    assert all(len(c) <= 20 for c in cands)
    assert user["content"] == ZYPHRA(p.text, cands)
    assert sum(c == tails.tail(reasoning(p), 20).strip() for c in cands) >= rec["correct_candidates"]
    assert plain_example(p)["messages"][0]["content"] == p.text


def test_build_data_cli(tmp_path):
    out = tmp_path / "data"
    assert tasks_main(["build-data", "--out", str(out), "--count", "200", "--aggregation", "0.5",
                       "--vocab-size", "400", "--test", "10"]) == 0
    recs = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert len(recs) == 300 and sum(r["kind"] == "aggregation" for r in recs) == 100
    assert all(r["messages"][1]["reasoning_content"].splitlines()[-1].startswith("result ") for r in recs)
    test = [json.loads(line) for line in (out / "test.jsonl").read_text().splitlines()]
    assert len(test) == 10

    from zaya.chat import DEFAULT_CHAT_TEMPLATE
    from zaya.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(out / "tokenizer")
    assert tok.token_to_id("<think>") == 7 and tok.token_to_id("</think>") == 8
    assert tok.eos_id == tok.token_to_id("<end_of_turn>") == 6 and tok.bos_id == 2 and tok.pad_id == 0
    assert (out / "tokenizer" / "chat_template.jinja").read_text() == DEFAULT_CHAT_TEMPLATE
    ids = tok.encode("37+8=45\n<think>", add_special_tokens=False)
    assert tok.decode(ids) == "37+8=45\n<think>"
    assert [tok.decode([i]) for i in tok.encode("4512", add_special_tokens=False)] == list("4512")


def test_build_data_cli_older_chain_format(tmp_path):
    out = tmp_path / "data"
    assert tasks_main(["build-data", "--out", str(out), "--count", "40", "--aggregation", "0.5",
                       "--vocab-size", "400", "--test", "2", "--no-result-line"]) == 0
    recs = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert len(recs) == 60
    assert not any("result" in r["messages"][1]["reasoning_content"] for r in recs)
    assert not any("\nresult " in r["messages"][0]["content"] for r in recs)  # nor in candidate tails


class _ScriptedBackend:
    """Samples for self-aggregation: problem i's j-th sample is right when j is even."""

    def __init__(self, problems):
        self.answers = {p.text: p for p in problems}

    def generate(self, messages_list, *, n, **sampling):
        from zaya.rsa.backends import Candidate

        out = []
        for msgs in messages_list:
            p = self.answers[msgs[-1]["content"]]
            cands = []
            for j in range(n):
                chain = reasoning(p) if j % 2 == 0 else corrupted_reasoning(p, random.Random(j))[0]
                answer = p.answer if j % 2 == 0 else "wrong"
                cands.append(Candidate(f"{chain}\n</think>\n\n\\boxed{{{answer}}}", f"{chain}#{j}",
                                       f"\\boxed{{{answer}}}", "stop", 10, 20, 0.0))
            out.append(cands)
        return out

    def tail(self, text, tau):
        return text[-tau:]


def test_self_aggregation_uses_the_models_own_samples():
    from zaya.tasks.aggregation import self_aggregation_examples

    problems = sample_problems(5, "train", [3, 4], seed=7)
    recs, stats = self_aggregation_examples(_ScriptedBackend(problems), problems, random.Random(0), k=3,
                                            tail=1000, samples=6, per_problem=2)
    assert len(recs) == 10 and stats == {"samples": 30, "sample_accuracy": 0.5}
    for i, rec in enumerate(recs):
        p = problems[i // 2]
        user, target = rec["messages"]
        assert target == solution_message(p) and rec["kind"] == "self-aggregation"
        blocks = [b.split(" ----\n", 1)[1].rsplit("\n", 1)[0].strip() for b in user["content"].split("---- Solution ")[1:]]
        ids = [int(b.rsplit("#", 1)[1]) for b in blocks]
        assert len(set(ids)) == 3, "candidates are distinct samples"
        assert user["content"] == ZYPHRA(p.text, [f"{b}" for b in blocks])
        assert rec["correct_candidates"] == sum(j % 2 == 0 for j in ids)
    with pytest.raises(ValueError, match="at least k=3"):
        self_aggregation_examples(_ScriptedBackend(problems), problems, random.Random(0), k=3, tail=10, samples=2)


def test_build_data_candidate_accuracy(tmp_path, capsys):
    out = tmp_path / "data"
    assert tasks_main(["build-data", "--out", str(out), "--count", "40", "--aggregation", "1.0", "--vocab-size", "400",
                       "--test", "2", "--candidate-accuracy", "1,1"]) == 0
    agg = [r for r in map(json.loads, (out / "train.jsonl").read_text().splitlines()) if r["kind"] == "aggregation"]
    assert len(agg) == 40 and all(r["correct_candidates"] == r["k"] for r in agg)
    for bad in ("0.9,0.1", "1.5,2", "x"):
        with pytest.raises(SystemExit):
            tasks_main(["build-data", "--out", str(out), "--candidate-accuracy", bad])
        assert "--candidate-accuracy" in capsys.readouterr().err
