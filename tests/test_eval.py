"""``zaya eval``: scoring, the three methods and the report, on a fake backend and a tiny model."""

from __future__ import annotations

import json

import pytest

from zaya.evaluate import evaluate, is_correct, load_problems, plot, summary_lines
from zaya.rsa.backends import Candidate
from zaya.rsa.config import make_config


class FakeBackend:
    """Answers "right" for a fixed share of candidates; aggregation prompts are always right."""

    name = "fake"

    def __init__(self, right_every: int = 3):
        self.right_every, self.calls = right_every, 0

    def generate(self, messages_list, *, n, max_tokens, temperature, top_p, top_k, seed,
                 enable_thinking=None, batch_size=None, progress=None):
        out = []
        for messages in messages_list:
            text = messages[-1]["content"]
            gold = text.split("gold=")[1].split()[0]
            cands = []
            for i in range(n):
                self.calls += 1
                ok = "Candidate solutions" in text or self.calls % self.right_every == 0
                answer = gold if ok else str(1000 + self.calls)
                reasoning = f"work {answer}"
                cands.append(Candidate(f"{reasoning}</think>\\boxed{{{answer}}}", reasoning,
                                       f"\\boxed{{{answer}}}", "stop", 10, 5))
            out.append(cands)
        return out

    def count_tokens(self, text):
        return len(text.split())

    def tail(self, text, tau):
        return " ".join(text.split()[-tau:])


def _problems(n=6):
    return [{"id": str(i), "problem": f"q{i} gold={i * 7}", "answer": str(i * 7)} for i in range(n)]


def test_is_correct_normalises():
    assert is_correct("042", "42") and is_correct("$42$.", "42") and is_correct("\\text{42}", "42")
    assert not is_correct(None, "42") and not is_correct("41", "42")
    assert is_correct("\\dfrac{1}{2}", "\\frac{1}{2}")


def test_load_problems_jsonl_and_builtin(tmp_path):
    f = tmp_path / "aime.jsonl"
    f.write_text('{"id": 1, "problem": "p1", "answer": 70}\n\n'
                 '{"question": "p2", "solution": "so \\\\boxed{3}"}\n')
    recs = load_problems(f)
    assert [(r["problem"], r["answer"]) for r in recs] == [("p1", "70"), ("p2", "3")]
    assert len(load_problems(None, limit=5)) == 5
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        load_problems(bad)


def test_methods_on_fake_backend(tmp_path):
    rsa = make_config("cpu-tiny", n=4, k=2, rounds=2, budget=8, tail=4)
    report = evaluate(FakeBackend(), _problems(), samples=2, majority=True, rsa=rsa, seed=0,
                      progress=False)
    single = report["single"]
    assert single["samples"] == 12  # N * (T + 1): majority at equal generations
    assert single["accuracy"] == pytest.approx(1 / 3, abs=0.1)
    assert single["decode_tokens_per_sample"] == 5
    assert [m["samples"] for m in report["majority"]] == [1, 2, 4, 8, 12]
    assert report["majority"][-1]["decode_tokens_per_problem"] == 60
    r = report["rsa"]
    assert [t["round"] for t in r["rounds"]] == [0, 1, 2]
    assert r["rounds"][1]["population_accuracy"] == 1.0 and r["final_accuracy"] == 1.0
    assert r["decode_tokens_per_problem"] == 60
    assert r["rounds"][-1]["cumulative_decode_tokens_per_problem"] == 60
    rec = report["per_problem"][0]
    assert len(rec["samples"]) == 12 and rec["rsa_correct"] is True
    assert any("RSA final vote" in line for line in summary_lines(report))
    png = plot(report, tmp_path / "acc.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_single_only():
    report = evaluate(FakeBackend(right_every=1), _problems(3), samples=3, max_tokens=16,
                      progress=False)
    assert report["single"]["accuracy"] == 1.0 and report["budget"] == 16
    assert "majority" not in report and "rsa" not in report


def test_cli_on_tiny_model(tmp_path, tiny_model_dir, capsys):
    from zaya.cli import main

    model = tiny_model_dir
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"problem": f"What is {i}+1?", "answer": str(i + 1)}) + "\n"
                            for i in range(2)))
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    rc = main(["eval", "--model", str(model), "--data", str(data), "--samples", "2", "--majority",
               "--n", "2", "--k", "2", "--rounds", "1", "--budget", "6", "--tail", "4",
               "--out", str(out), "--plot", str(png), "--no-progress"])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["problems"] == 2 and report["single"]["samples"] == 4
    assert len(report["rsa"]["rounds"]) == 2
    assert 0 < report["rsa"]["decode_tokens_per_problem"] <= 4 * 6
    assert png.stat().st_size > 0
    assert "single sample" in capsys.readouterr().out
