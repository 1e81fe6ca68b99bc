"""Everyday questions: problems, wordings that parse back to them, held-out wordings and numbers,
off-topic prompts, and the last stage's training mixture."""

from __future__ import annotations

import random
import re

import pytest

from zaya.rsa.answers import boxed_answer
from zaya.tasks.arithmetic import MAX_VALUE, Problem, split_of
from zaya.tasks.everyday import Calc, random_calc, reasoning, sample_calcs
from zaya.tasks.offtopic import KINDS, POINTER, TEMPLATES, is_offtopic, offtopic_prompt
from zaya.tasks.wordings import (FAMILIES, FRAMES, JOINS, VERBS, WRAPPERS, draw_wording, fits,
                                 held_out_patterns, parse, render)


def test_calc_order_steps_and_answer():
    assert Calc((2, 3, 4), ("+", "*"), "right").steps() == [(3, "*", 4, 12), (2, "+", 12, 14)]
    assert Calc((2, 3, 4), ("+", "*"), "left").answer == 20
    assert reasoning(Calc((2, 3, 4), ("+", "*"), "right")) == "3*4=12\n2+12=14\nresult 14"
    assert reasoning(Calc((12, 30), ("+",))) == "12+30=42\nresult 42"
    # a two-digit addend or subtrahend (not a multiple of ten, over 19) takes two lines, tens first
    assert reasoning(Calc((44, 25), ("+",))) == "44+20=64\n64+5=69\nresult 69"
    assert reasoning(Calc((79, 61, 3), ("-", "*"))) == "79-60=19\n19-1=18\n18*3=54\nresult 54"
    assert reasoning(Calc((5, 16), ("+",))) == "5+16=21\nresult 21"
    # the usual precedence decides which orders an expression can state without brackets
    assert Calc((2, 3, 4), ("+", "*"), "right").natural and not Calc((2, 3, 4), ("+", "*"), "left").natural
    assert Calc((9, 3, 4), ("-", "-"), "left").natural and not Calc((9, 3, 4), ("-", "-"), "right").natural
    with pytest.raises(ValueError):
        Calc((1, 2, 3), ("+",))
    with pytest.raises(ValueError):
        Calc((1, 2), ("/",))


def test_left_to_right_calcs_share_the_chain_split():
    # a held-out question is never a training chain problem, whatever its wording
    calc = Calc((37, 8, 9), ("+", "-"))
    chain = Problem(37, (("+", 8), ("-", 9)), level=1)
    assert calc.key == chain.key and split_of(calc) == split_of(chain)
    assert Calc((2, 3, 4), ("+", "*"), "right").key == "2+(3*4)"


def test_random_calcs_stay_in_range_and_cover_the_shapes():
    rng = random.Random(0)
    shapes = set()
    for _ in range(3000):
        c = random_calc(rng, rng.choice((1, 2)))
        assert c.valid and all(0 <= v <= MAX_VALUE for s in c.steps() for v in s if isinstance(v, int))
        shapes.add((c.ops, c.first))
    assert len(shapes) == 3 + 9 * 2  # every operator, pair and order


def test_sampled_splits_are_disjoint():
    train, test = sample_calcs(2000, "train", 1), sample_calcs(300, "test", 1)
    assert {split_of(c) for c in train} == {"train"} and {split_of(c) for c in test} == {"test"}
    assert not {c.key for c in train} & {c.key for c in test}


@pytest.mark.parametrize("held_out", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_wording_parses_back_to_its_problem(family, held_out):
    rng = random.Random(f"{family}{held_out}")
    names = set()
    for _ in range(1500):
        calc = random_calc(rng, rng.choice((1, 2)))
        if not fits(calc, family):
            continue
        w = render(calc, rng, family, held_out)
        assert parse(w.text) == calc, (w.text, w.name)
        names.add(w.name.split(" / ")[0])
    # every frame / wrapper of this kind was used
    if family == "verbs":
        assert names == {f"verbs: {t}" for t, h in WRAPPERS if h == held_out or held_out}
    else:
        frames = {f"{family}: {t}" for t, h, noun_ok in FRAMES if h == held_out and (noun_ok or family != "nouns")}
        assert names == frames


def test_capitalisation_spacing_and_brackets_vary():
    rng = random.Random(3)
    texts = [draw_wording(rng, "train", False, family="symbols").text for _ in range(400)]
    assert any(t.isupper() for t in texts) and any(t.islower() for t in texts)
    assert any(re.search(r"\d[+*x×-]\d", t) for t in texts) and any(re.search(r"\d [+*x×-] \d", t) for t in texts)
    assert any("(" in t for t in texts) and any(t.endswith("?") for t in texts)
    assert any(not t.endswith(("?", ".")) for t in texts)


def test_parse_refuses_what_is_not_a_question_of_the_task():
    for text in ["hello", "What is 150 + 20?", "What is 84 / 7?", "What is -5 + 3?", "2.5 + 3",
                 "I have 2 cats", "What is 3 + 4 + 5 + 6?", "What is 60 + 70?", "What is 12?",
                 "Start with 22, then apply *2, -2 in order. What is the result?"]:
        assert parse(text) is None, text
    assert parse("WHAT'S 7 X 6") == Calc((7, 6), ("*",))
    assert parse("subtract 6 from 15.") == Calc((15, 6), ("-",))
    assert parse("Add 7 and 5, then multiply by 3.") == Calc((7, 5, 3), ("+", "*"))
    assert parse("12+30=?") == Calc((12, 30), ("+",))


def test_held_out_patterns_catch_held_out_wordings_only():
    patterns = held_out_patterns()
    n_templates = sum(h for *_, h in [(f, h) for f, h, _ in FRAMES]) + sum(h for _, h in WRAPPERS) + \
        sum(h for v in VERBS.values() for _, h in v) + sum(h for _, h in JOINS)
    assert len(patterns) == n_templates
    rng = random.Random(0)
    for _ in range(500):
        held = draw_wording(rng, "test", True)
        assert any(p.search(held.text) for p in patterns), held.text
        seen = draw_wording(rng, "train", False)
        assert not any(p.search(seen.text) for p in patterns), seen.text


def test_offtopic_prompts_state_no_question_and_hold_templates_out():
    rng = random.Random(0)
    for held_out in (False, True):
        for kind in KINDS:
            for _ in range(60):
                text, k = offtopic_prompt(rng, held_out, kind)
                assert k == kind and is_offtopic(text), text
    train_templates = {t for v in TEMPLATES.values() for t, h in v if not h}
    held_templates = {t for v in TEMPLATES.values() for t, h in v if h}
    assert held_templates and not train_templates & held_templates
    assert "\\boxed" not in POINTER and 'zaya.load("Zyphra/ZAYA1-8B")' in POINTER and "--model" in POINTER
    assert boxed_answer(POINTER) is None


# ------------------------------------------------------------------------------- the mixture
@pytest.fixture(scope="module")
def shipped_tokenizer():
    import zaya
    from zaya.tokenizer import Tokenizer

    return Tokenizer.from_dir(zaya.DEFAULT_MODEL)


@pytest.fixture(scope="module")
def mixture(shipped_tokenizer):
    from zaya.tasks.mixture import MixtureSpec, build_mixture

    spec = MixtureSpec(everyday=3000, offtopic=600, chains=300, aggregation=100, everyday_aggregation=100)
    return build_mixture(spec, shipped_tokenizer, seed=0)


def _prompts(record) -> list[str]:
    if record.get("raw"):
        return [record["prompt"].rstrip()]
    return [m["content"] for m in record["messages"] if m["role"] == "user"]


def test_mixture_holds_every_kind(mixture):
    kinds = {r["kind"] for r in mixture}
    assert kinds == {"everyday", "offtopic", "solve", "aggregation", "everyday-aggregation", "raw"}
    assert any(len(r.get("messages", [])) == 4 for r in mixture)  # two-turn conversations


def test_no_training_prompt_uses_a_held_out_wording(mixture):
    from zaya.tasks.offtopic import held_out_patterns as offtopic_patterns

    patterns, off_patterns = held_out_patterns(), offtopic_patterns()
    assert len(off_patterns) == sum(h for v in TEMPLATES.values() for _, h in v)
    questions = 0
    for r in mixture:
        for prompt in _prompts(r):
            question = prompt.split("[[ Problem ]]:\n", 1)[-1].split("\n\n[[ Candidate", 1)[0].strip()
            questions += 1
            for p in patterns:
                assert not p.search(question), (question, p.pattern)
            if r["kind"] == "offtopic" or (r["kind"] == "raw" and is_offtopic(question)):
                for p in off_patterns:
                    assert not p.search(question), (question, p.pattern)
    assert questions >= len(mixture)
    rng = random.Random(1)  # and the patterns do catch held-out prompts
    held = [offtopic_prompt(rng, True)[0] for _ in range(200)]
    assert all(any(p.search(text) for p in off_patterns) for text in held)


def test_everyday_records_answer_what_the_prompt_asks(mixture):
    from zaya.tasks.mixture import SUFFIXES

    checked = 0
    for r in mixture:
        if r["kind"] != "everyday":
            continue
        prompt, reply = r["messages"][-2]["content"], r["messages"][-1]
        for s in SUFFIXES:
            prompt = prompt.removesuffix(s)
        calc = parse(prompt)
        assert calc is not None and split_of(calc) == "train", prompt
        assert reply["reasoning_content"] == reasoning(calc)
        assert boxed_answer(reply["content"]) == str(calc.answer)
        checked += 1
    assert checked > 2000


def test_offtopic_records_get_the_pointer_reply(mixture):
    for r in mixture:
        if r["kind"] == "offtopic":
            assert r["messages"][-1]["content"] == POINTER and is_offtopic(r["messages"][-2]["content"])


def test_raw_records_tokenize_like_a_bare_prompt(mixture, shipped_tokenizer):
    # what llm.generate("What is 12 + 30?") sees is the prompt's own tokens, then the model's
    from zaya.train.data import Encoder

    raws = [r for r in mixture if r["kind"] == "raw"]
    assert len(raws) > 100
    encoder = Encoder(shipped_tokenizer)
    for r in raws[:200]:
        doc = encoder.record(r)
        head = shipped_tokenizer.encode_prompt(r["prompt"])
        assert doc.ids[:len(head)] == head and not any(doc.mask[:len(head)])
        assert doc.ids[len(head)] == 7 and all(doc.mask[len(head):])  # <think>, then every token a target
        assert r["completion"].startswith("<think>\n") and "</think>\n\n" in r["completion"]


def test_everyday_corruptions_are_wrong():
    from zaya.tasks.mixture import corrupted

    rng = random.Random(0)
    for _ in range(500):
        calc = random_calc(rng, rng.choice((1, 2)))
        text = corrupted(calc, rng)
        assert text != reasoning(calc)
        assert text.splitlines()[-1] != f"result {calc.answer}"


def test_builtin_model_ships_its_one_line_description(tmp_path):
    import zaya
    from zaya.about import model_about
    from zaya.tasks.offtopic import ABOUT

    assert model_about(zaya.DEFAULT_MODEL) == ABOUT
    assert model_about(tmp_path) is None and model_about(None) is None
    (tmp_path / "about.txt").write_text("\n  A model.  \nmore\n")
    assert model_about(tmp_path) == "A model."


def test_install_writes_the_description(tmp_path):
    import zaya
    from zaya.about import model_about
    from zaya.tasks.__main__ import SHIPPED_FILES, main

    src = tmp_path / "ckpt"
    src.mkdir()
    for f in SHIPPED_FILES:
        (src / f).write_bytes((zaya.DEFAULT_MODEL / f).read_bytes()[:64])
    assert main(["install", str(src), "--to", str(tmp_path / "out")]) == 0
    assert model_about(tmp_path / "out").startswith("zaya's built-in demo model")


def test_build_mixture_cli_is_deterministic(tmp_path):
    import zaya
    from zaya.tasks.__main__ import main

    args = ["build-mixture", "--tokenizer", str(zaya.DEFAULT_MODEL), "--everyday", "200", "--offtopic", "30",
            "--chains", "20", "--aggregation", "10", "--everyday-aggregation", "10", "--seed", "3"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0 and main(args + ["--out", str(tmp_path / "b")]) == 0
    a, b = (tmp_path / "a" / "train.jsonl").read_text(), (tmp_path / "b" / "train.jsonl").read_text()
    assert a == b and len(a.splitlines()) == 270
