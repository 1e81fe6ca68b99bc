"""The README's examples that use the built-in model print what the README says they print.

Each test runs one example on the shipped model and looks for its actual output in README.md, so
retraining the model (or editing the README) without updating the other fails here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import zaya

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def _in_readme(code: str, printed: str, prefix: str = "# ") -> None:
    assert code in README, f"the README no longer shows {code!r}"
    block = "\n".join(prefix + line if line else prefix.rstrip() for line in printed.splitlines())
    assert block in README, f"README should show the output of {code!r}:\n{block}"


@pytest.fixture(scope="module")
def llm():
    return zaya.load()


def test_generate_samples(llm):
    code = 'out = llm.generate([prompt], max_new_tokens=128, temperature=0.6, top_p=0.95, seed=0, n=2)'
    assert 'prompt = llm.apply_chat_template([{"role": "user", "content": "What is 12 + 30?"}])' in README
    prompt = llm.apply_chat_template([{"role": "user", "content": "What is 12 + 30?"}])
    out = llm.generate([prompt], max_new_tokens=128, temperature=0.6, top_p=0.95, seed=0, n=2)
    _in_readme(code, "\n".join(f"{c.index} {c.finish_reason} {c.text!r}" for c in out))


def test_stream(llm):
    prompt = llm.apply_chat_template([{"role": "user", "content": "What is 12 + 30?"}])
    code = 'for event in llm.stream([prompt], max_new_tokens=64, temperature=0, stop=["</think>"]):'
    events = llm.stream([prompt], max_new_tokens=64, temperature=0, stop=["</think>"])
    text = "".join(ev.text for ev in events)
    _in_readme(code, text)


def test_chat(llm):
    code = 'reply = llm.chat([{"role": "user", "content": "What is 40 plus 2?"}], max_new_tokens=256, temperature=0)'
    reply = llm.chat([{"role": "user", "content": "What is 40 plus 2?"}], max_new_tokens=256, temperature=0)
    _in_readme(code, f"{reply.reasoning} -> {reply.content}")


def test_chat_off_topic(llm):
    code = 'reply = llm.chat([{"role": "user", "content": "hello, who are you?"}], max_new_tokens=256, temperature=0)'
    reply = llm.chat([{"role": "user", "content": "hello, who are you?"}], max_new_tokens=256, temperature=0)
    _in_readme(code, reply.content)


def test_solve(llm):
    problem = "Start with 22, then apply *2, -2, +6, *2, +2, -3 in order. What is the result?"
    assert f'problem = "{problem}"' in README
    result = llm.solve(problem, profile="cpu-small", n=8, seed=0, progress=False)
    _in_readme('result = llm.solve(problem, profile="cpu-small", n=8, seed=0)', f"{result.answer} {result.vote.counts}")


@pytest.mark.parametrize("args", [["What is 12 + 30?"], ["--raw", "What is 12 + 30?"], ["hello, who are you?"]])
def test_cli_generate(args, capsys):
    from zaya.cli import main

    assert main(["generate", *args, "--temperature", "0"]) == 0
    shown = " ".join(f'"{a}"' if " " in a else a for a in args)
    _in_readme(f"$ zaya generate {shown} --temperature 0", capsys.readouterr().out.rstrip("\n"), prefix="")
