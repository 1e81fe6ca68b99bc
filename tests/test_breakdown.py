"""The wording breakdown of ``zaya eval --builtin``: the fixed sets, scoring, and the report."""

from __future__ import annotations

import json
from types import SimpleNamespace

from zaya.tasks.arithmetic import split_of
from zaya.tasks.breakdown import breakdown_lines, evaluate_wordings, run_items, score, summarize, wording_items
from zaya.tasks.offtopic import POINTER, held_out_patterns as offtopic_patterns, is_offtopic
from zaya.tasks.wordings import held_out_patterns, parse


class OracleLLM:
    """Answers every question by parsing it (and off-topic prompts with the pointer reply);
    ``wrong`` makes it answer 0 and box a number for everything instead."""

    def __init__(self, wrong: bool = False):
        self.wrong, self.prompts = wrong, []

    def apply_chat_template(self, messages):
        return ("chat", messages[-1]["content"])

    def generate(self, prompts, temperature, max_new_tokens):
        assert temperature == 0.0
        out = []
        for p in prompts:
            raw = isinstance(p, str)
            text = p if raw else p[1]
            self.prompts.append((text, raw))
            calc = parse(text)
            if self.wrong:
                reply = "0+0=0\nresult 0\n</think>\n\n\\boxed{0}"
            elif calc is None:
                reply = f"out of scope\n</think>\n\n{POINTER}"
            else:
                reply = f"result {calc.answer}\n</think>\n\n\\boxed{{{calc.answer}}}"
            out.append(SimpleNamespace(text=("<think>\n" if raw else "") + reply))
        return out


def test_sets_are_fixed_held_out_and_cover_every_group():
    items = wording_items(per_family=10, held_out=40, offtopic=20, raw=10)
    assert items == wording_items(per_family=10, held_out=40, offtopic=20, raw=10)
    groups = {g for it in items for g in it["groups"]}
    assert {"seen wording: symbols", "seen wording: verbs", "held-out wordings", "held-out wording: nouns",
            "held-out wording: 2 ops", "raw text, held-out wordings", "off-topic (held-out templates)",
            "off-topic: beyond", "raw text, off-topic"} <= groups
    patterns, off_patterns = held_out_patterns(), offtopic_patterns()
    for it in items:
        if it["answer"] is None:
            assert is_offtopic(it["prompt"]) and any(p.search(it["prompt"]) for p in off_patterns)
            continue
        calc = parse(it["prompt"])
        assert split_of(calc) == "test" and str(calc.answer) == it["answer"]  # held-out numbers
        held = any(p.search(it["prompt"]) for p in patterns)
        assert held == any(g.startswith(("held-out", "raw")) for g in it["groups"]), it


def test_scoring_right_answers_and_pointer_replies():
    on = {"answer": "42"}
    off = {"answer": None}
    assert score(on, "<think>\n12+30=42\nresult 42\n</think>\n\n\\boxed{42}")["correct"]
    assert not score(on, "<think>\n12+30=41\nresult 41\n</think>\n\n\\boxed{41}")["correct"]
    assert not score(on, "<think>\n12+30=42\nresult 42")["correct"]  # cut off: no answer
    good = score(off, f"<think>\nout of scope\n</think>\n\n{POINTER}")
    assert good["correct"] and good["exact"]
    assert not score(off, "<think>\nx\n</think>\n\n\\boxed{3} Zyphra/ZAYA1-8B")["correct"]
    assert not score(off, "<think>\nx\n</think>\n\nhello")["correct"]


def test_an_oracle_scores_everything_and_a_wrong_model_nothing():
    items = wording_items(per_family=8, held_out=16, offtopic=10, raw=6)
    oracle = OracleLLM()
    report = summarize(run_items(oracle, items, batch=7))
    assert all(g["accuracy"] == 1.0 for g in report.values()), report
    assert sum(raw for _, raw in oracle.prompts) == sum(it["raw"] for it in items)  # raw prompts stay raw
    wrong = summarize(run_items(OracleLLM(wrong=True), items))
    assert wrong["off-topic (held-out templates)"]["accuracy"] == 0.0
    assert wrong["held-out wordings"]["accuracy"] < 0.2


def test_report_and_lines():
    report = evaluate_wordings(OracleLLM(), per_family=4)
    assert report["decoding"] == "greedy" and len(report["items"]) >= 4 * 4 + 16
    json.dumps(report)
    lines = breakdown_lines(report)
    assert any("held-out wordings" in line and "100.0% right" in line for line in lines)
    assert any("off-topic (held-out templates)" in line and "pointer replies" in line for line in lines)


def test_eval_cli_reports_the_breakdown_on_a_tiny_model(tmp_path, capsys):
    try:
        from tiny_model import make_tiny_model_dir
    except ImportError:
        from tests.tiny_model import make_tiny_model_dir
    from zaya.cli import main

    model = make_tiny_model_dir(tmp_path / "tiny")
    out = tmp_path / "r.json"
    rc = main(["eval", "--model", str(model), "--builtin", "--limit", "2", "--samples", "1",
               "--max-tokens", "4", "--wordings", "1", "--out", str(out), "--no-progress"])
    assert rc == 0
    report = json.loads(out.read_text())
    assert "held-out wordings" in report["wordings"]["groups"]
    assert "off-topic (held-out templates)" in capsys.readouterr().out
