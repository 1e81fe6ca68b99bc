"""The `zaya` command as a person meets it: real processes on a pseudo-terminal (pexpect).

`zaya chat` on the built-in model (three turns, /set, /show, /reset, a message that overflows the
context, readline history, Ctrl-D), Ctrl-C in the middle of a reply, and the defaults of
`zaya generate` and `zaya solve` on models whose context is shorter than the default budget.
"""

from __future__ import annotations

import json
import os
import re
import sys

import pytest

from tests.tiny_model import make_tiny_model_dir
from zaya.cli import main

pexpect = pytest.importorskip("pexpect", reason="pexpect drives the pseudo-terminal (pip install '.[test]')")
pytestmark = pytest.mark.slow

TIMEOUT = 120  # seconds for one expectation; a loaded machine starts Python and torch slowly
ANSWER = re.compile(r"\\boxed\{-?\d+\}")
CHAIN = "Start with {}, then apply +5, *2 in order. What is the result?"
UP = "\x1b[A"


def spawn(tmp_path, *args, **env):
    """`zaya ARGS` on a fresh pseudo-terminal, 200 columns wide so nothing wraps. (pexpect compiles
    patterns with re.DOTALL: ``.`` matches newlines, hence ``[^\\n]``.) ZAYA_PTY_LOG=1 echoes the
    session to stderr."""
    # one thread: the test machine's cores are shared, where more threads only wait on each other
    environ = dict(os.environ, XDG_DATA_HOME=str(tmp_path / "data"), OMP_NUM_THREADS="1", TERM="xterm", **env)
    if "NO_COLOR" not in env:
        environ.pop("NO_COLOR", None)
    return pexpect.spawn(sys.executable, ["-m", "zaya.cli", *args], env=environ, encoding="utf-8",
                         timeout=TIMEOUT, dimensions=(40, 200), logfile=sys.stderr if os.environ.get("ZAYA_PTY_LOG") else None)


def ask(child, line: str) -> str:
    """Send a line and return everything printed until the next prompt."""
    child.sendline(line)
    child.expect_exact(">>> ")
    return child.before


def finish(child) -> int:
    child.expect(pexpect.EOF)
    child.close()
    return child.exitstatus


def test_chat_conversation_on_the_builtin_model(tmp_path):
    child = spawn(tmp_path, "chat", "-t", "0", "--max-context", "128")
    child.expect_exact("zaya chat with the built-in model")
    child.expect_exact(">>> ")
    for start in (10, 7, 21):  # three turns, each answered in the model's own format
        reply = ask(child, CHAIN.format(start))
        assert "Thinking..." in reply and "...done thinking." in reply and ANSWER.search(reply), reply
        assert "\x1b[2m" in reply  # reasoning is dimmed on a terminal
    shown = ask(child, "/show")
    used = int(re.search(r"context\s+(\d+) of 128 tokens used", shown).group(1))
    assert "(3 exchanges)" in shown and used > 40

    overflow = ask(child, "lorem ipsum dolor sit amet " * 4)  # 80 more tokens do not fit: one line, nothing lost
    assert "context full: the conversation and this message take" in overflow and "/reset" in overflow
    assert "Thinking" not in overflow
    assert f"context   {used} of 128 tokens used" in ask(child, "/show")

    assert "temperature: 0.2" in ask(child, "/set temperature 0.2")
    assert "error: temperature takes a number" in ask(child, "/set temperature warm")
    assert "(conversation cleared)" in ask(child, "/reset")
    again = ask(child, UP + UP)  # readline history: two lines up is /set temperature warm... then /reset
    assert "temperature takes a number" in again
    shown = ask(child, "/show")
    assert "0 exchanges" in shown and "temperature 0.2" in shown
    assert ANSWER.search(ask(child, CHAIN.format(3)))  # the conversation goes on after /reset
    child.sendeof()
    assert finish(child) == 0
    history = (tmp_path / "data" / "zaya" / "chat_history").read_text()
    assert CHAIN.format(21) in history and "/reset" in history


def test_ctrl_c_stops_a_reply_and_returns_to_the_prompt(tmp_path):
    model = make_tiny_model_dir(tmp_path / "m", max_position_embeddings=8192)  # replies that never end
    child = spawn(tmp_path, "chat", "--model", str(model), "-t", "0", "--no-think", "--max-new-tokens", "8000",
                  NO_COLOR="1")
    child.expect_exact(">>> ")
    child.sendline("Hello")
    child.expect_exact("Hello\r\n")
    child.expect(r"\S")  # the reply has begun
    child.sendintr()
    child.expect_exact("(stopped)")
    child.expect_exact(">>> ")
    shown = ask(child, "/show")
    assert "1 exchange)" in shown  # the stopped reply is kept, as far as it went
    assert "\x1b[" not in shown.replace("\x1b[?2004l", "").replace("\x1b[?2004h", "")  # NO_COLOR
    child.sendline("/exit")
    assert finish(child) == 0


def test_generate_defaults_fit_a_short_context(tmp_path, capsys):
    model = make_tiny_model_dir(tmp_path / "m", max_position_embeddings=64)  # shorter than the default 256
    child = spawn(tmp_path, "generate", "Hello", "--model", str(model), "--raw", "-t", "0")
    child.expect(r"\[(\d+) tokens in [\d.]+s, [\d.]+ tok/s, finish: length\]")
    assert int(child.match.group(1)) == 64 - 5  # 'Hello' is 5 tokens with BOS: up to the context's end
    assert finish(child) == 0
    assert main(["generate", "Hello", "--model", str(model), "--raw", "--max-new-tokens", "100"]) == 1
    assert capsys.readouterr().err == ("zaya: error: max_new_tokens (100) does not fit: the prompt takes 5 of the "
                                       "context's 64 tokens, so 59 are left\n")


def test_solve_defaults_fit_the_builtin_model(tmp_path, capsys):
    problem = CHAIN.format(10)
    child = spawn(tmp_path, "solve", problem, "--n", "4", "--k", "2", "--rounds", "1", "--seed", "0",
                  "--no-progress")
    child.expect(r"answer: (\S+)\r\n")
    child.expect(r"vote: [^\n]*\(4 candidates, \d+ without an answer\)\r\n")
    child.expect(r"  round 0: [^\n]*\r\n  round 1: [^\n]*\r\n")
    child.expect(r"cost: [^\n]* beta=(\d+) tau=(\d+) \(fitted to the 1024-token context\)\r\n")
    beta, tau = int(child.match.group(1)), int(child.match.group(2))
    assert beta < 16384 and tau < 4096 and 2 * tau + beta < 1024  # the deployment profile, shrunk to fit
    child.expect(r"(\{[^\n]*\})\r\n")
    last = json.loads(child.match.group(1))
    assert set(last) == {"answer", "votes", "completion_tokens", "seconds"} and sum(last["votes"].values()) <= 4
    assert finish(child) in (0, 3)
    assert main(["solve", problem, "--budget", "2000", "--no-progress"]) == 1
    assert capsys.readouterr().err.startswith("zaya: error: budget 2000 does not fit: ")
