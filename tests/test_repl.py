"""`zaya chat` in-process: commands, settings, multi-line input, and turns that go wrong.

The same REPL through a real pseudo-terminal is in test_terminal.py.
"""

from __future__ import annotations

import io

import pytest

import zaya
from tests.tiny_model import make_tiny_model_dir
from zaya.repl import DIM, RESET, Chat, Reply, describe, read_message, repl, use_color


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return zaya.load(tiny_model_dir)


def make_chat(llm, **kwargs) -> tuple[Chat, io.StringIO, io.StringIO]:
    out, err = io.StringIO(), io.StringIO()
    sampling = {"temperature": 0, "max_new_tokens": 8, **kwargs.pop("sampling", {})}
    return Chat(llm, sampling=sampling, out=out, err=err, **kwargs), out, err


def reader(*lines):
    """An input() stand-in that returns ``lines`` in turn, then raises EOFError (Ctrl-D)."""
    pending = list(lines)

    def read(prompt=""):
        if not pending:
            raise EOFError
        item = pending.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item

    return read


def test_multiline_input_between_fences():
    assert read_message(reader("hello")) == "hello"
    assert read_message(reader('"""one line"""')) == "one line"
    assert read_message(reader('"""first', "  second", 'third"""')) == "first\n  second\nthird"
    assert read_message(reader('"""', "a", '"""')) == "a"
    with pytest.raises(EOFError):  # Ctrl-D inside a block quits like anywhere else
        read_message(reader('"""', "a"))


def test_turns_keep_the_conversation(llm):
    chat, out, err = make_chat(llm, thinking=False)
    chat.turn("Hello")
    first = out.getvalue()
    chat.turn("And again")
    assert [m["role"] for m in chat.history] == ["user", "assistant"] * 2
    assert chat.history[1]["content"] == first.strip() and first.strip()  # the streamed answer is what is kept
    assert err.getvalue().count("(the reply reached max_new_tokens=8; /set max_new_tokens to allow more)") == 2
    chat.command("/reset")
    assert chat.history == [] and "(conversation cleared)" in err.getvalue()


def test_set_validates_and_show_reports(llm):
    chat, _, err = make_chat(llm)
    chat.command("/set temperature 0.2")
    chat.command("/set top-p 0.9")
    chat.command("/set seed 7")
    assert chat.sampling == {"temperature": 0.2, "max_new_tokens": 8, "top_p": 0.9, "seed": 7}
    for bad, message in [("/set temperature hot", "temperature takes a number"),
                         ("/set top_k 1.5", "top_k takes an integer"),
                         ("/set top_p 0", "top_p must be in (0, 1]"),
                         ("/set max_new_tokens 5000", "cannot fit in the model's context of 1024 tokens"),
                         ("/set nonsense 1", "usage: /set NAME VALUE"),
                         ("/set think maybe", "usage: /set think")]:
        chat.command(bad)
        assert message in err.getvalue(), bad
    assert chat.sampling["temperature"] == 0.2  # a refused value changes nothing
    chat.command("/set max_new_tokens auto")
    chat.command("/set think off")
    assert "max_new_tokens" not in chat.sampling and chat.thinking is False
    err.truncate(0)
    chat.command("/show")
    shown = err.getvalue()
    assert "context   1 of 1024 tokens used, 1023 left (0 exchanges)" in shown
    assert "temperature 0.2" in shown and "top_p 0.9" in shown and "seed 7" in shown
    assert "max_new_tokens auto (up to 1024); think off" in shown
    chat.command("/nope")
    assert "unknown command /nope" in err.getvalue()
    assert chat.command("/exit") is False and chat.command("/bye") is False


def test_full_context_is_one_line_and_keeps_the_conversation(tiny_model_dir):
    small = zaya.load(tiny_model_dir, max_context=60)
    chat, _, err = make_chat(small)
    chat.history = [{"role": "user", "content": "earlier"}, {"role": "assistant", "content": "reply"}]
    kept = list(chat.history)
    chat.turn("word " * 80)
    lines = err.getvalue().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("context full:") and "/reset" in lines[0]
    assert chat.history == kept
    err.truncate(0)
    err.seek(0)
    chat.sampling["max_new_tokens"] = 50  # explicit and too many for what is left: say how many are
    chat.turn("hi")
    assert "max_new_tokens (50) does not fit" in err.getvalue() and "are left" in err.getvalue()
    assert chat.history == kept


def test_a_failing_turn_is_one_line(llm, monkeypatch):
    chat, _, err = make_chat(llm)

    def broken(*args, **kwargs):
        raise RuntimeError("device lost")
        yield

    monkeypatch.setattr(chat.llm, "stream", broken)
    chat.turn("Hello")
    assert err.getvalue().strip() == "error: the model failed on this turn (RuntimeError: device lost)"
    assert chat.history == []


def test_ctrl_c_stops_the_reply_and_keeps_its_start(llm, monkeypatch):
    chat, out, err = make_chat(llm)
    events = [type("E", (), {"text": t, "finish_reason": None}) for t in ("<think>x</think>", "The ans", "wer")]

    def interrupted(*args, **kwargs):
        yield from events
        raise KeyboardInterrupt

    monkeypatch.setattr(chat.llm, "stream", interrupted)
    chat.turn("Hello")
    assert "(stopped)" in err.getvalue() and out.getvalue().endswith("The answer\n")
    assert chat.history[-1] == {"role": "assistant", "content": "The answer"}


def test_repl_loop_quits_on_eof_and_exit_and_survives_ctrl_c(llm):
    chat, _, err = make_chat(llm)
    assert repl(chat, reader(KeyboardInterrupt(), "/set seed 3", "", "/exit", "never read")) == 0
    assert chat.sampling["seed"] == 3
    assert repl(chat, reader("/show")) == 0  # end of input (Ctrl-D) quits cleanly


def test_reasoning_is_dimmed_only_on_a_terminal(monkeypatch):
    plain = io.StringIO()
    reply = Reply(plain, color=False, starts_in_reasoning=True)
    reply.feed("step 1</think>\n\nthe answer", last=True)
    reply.close()
    assert plain.getvalue() == "Thinking...\nstep 1\n...done thinking.\n\nthe answer\n"
    styled = io.StringIO()
    reply = Reply(styled, color=True, starts_in_reasoning=True)
    reply.feed("step 1</think>the answer", last=True)
    reply.close()
    assert styled.getvalue().startswith(f"{DIM}Thinking...\n{RESET}{DIM}step 1{RESET}")
    assert styled.getvalue().endswith(f"{RESET}the answer\n")

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    assert use_color(Terminal()) and not use_color(io.StringIO())
    monkeypatch.setenv("NO_COLOR", "1")
    assert not use_color(Terminal())


def test_banner_says_what_the_model_is(llm, tiny_model_dir, tmp_path):
    assert describe(llm).startswith(f"{tiny_model_dir.name}: a ZAYA1-architecture model, 3 layers, hidden 64")
    assert "context 1024 tokens" in describe(llm)
    about = make_tiny_model_dir(tmp_path / "about")
    (about / "about.txt").write_text("A model that only says hello.\nsecond line ignored\n")
    assert describe(zaya.load(about)) == "about: A model that only says hello."
    assert describe(zaya.load()).startswith("the built-in model: ")
