"""``zaya chat``: the interactive chat, as users of ``ollama run`` and ``llm chat`` expect it.

A turn that fails (the context is full, a bad setting, a model error) prints one line and keeps
the conversation; Ctrl-C stops a reply and returns to the prompt; Ctrl-D or ``/exit`` quits.
Input goes through the standard library's ``readline`` (line editing, history kept in
``$XDG_DATA_HOME/zaya/chat_history``) when stdin is a terminal; ``\"\"\"`` opens and closes a
multi-line message. Reasoning is shown apart from the answer, dimmed when stdout is a terminal
and ``NO_COLOR`` is unset. Replies go to stdout, everything else (banner, notices) to stderr.
"""

from __future__ import annotations

import os
import sys
from dataclasses import fields
from pathlib import Path

from zaya.about import model_about
from zaya.chat import ReasoningParser, generation_starts_in_reasoning
from zaya.commands import add_model_args, add_sampling_args, load_from_args, sampling_kwargs
from zaya.errors import ContextLengthError, ZayaError
from zaya.llm import DEFAULT_MODEL
from zaya.sampling import SamplingParams, fit_max_new_tokens

CHAT_MAX_NEW_TOKENS = 1024  # a reply's cap when max_new_tokens is unset (and the context allows)
PROMPT, MORE = ">>> ", "... "
FENCE = '"""'
DIM, RESET = "\033[2m", "\033[0m"
HISTORY_LENGTH = 1000

# What /set accepts: the sampling options, by SamplingParams' field types.
_TYPES = {f.name: f.type for f in fields(SamplingParams)}
SETTINGS = {name: (float if "float" in str(_TYPES[name]) else int) for name in (
    "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
    "seed", "max_new_tokens")}
UNSET = {"none", "auto", "default", "off"}

HELP = f"""Commands:
  /set NAME VALUE   set a sampling option: {', '.join(SETTINGS)}
                    (VALUE auto puts it back to its default); /set think on|off
  /show             the model, context used and left, the settings
  /reset            forget the conversation (alias /clear)
  /help             this text
  /exit             quit (also /bye, Ctrl-D)
Ctrl-C stops a reply. {FENCE} starts a multi-line message and {FENCE} ends it."""


def data_dir() -> Path:
    """Where zaya keeps a user's files (the chat history): ``$XDG_DATA_HOME/zaya``."""
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "zaya"


def use_color(stream) -> bool:
    """ANSI styling only on a terminal, and never when NO_COLOR is set (https://no-color.org)."""
    return stream.isatty() and not os.environ.get("NO_COLOR")


def is_builtin(llm) -> bool:
    return llm.path is not None and Path(llm.path).resolve() == DEFAULT_MODEL.resolve()


def describe(llm) -> str:
    """One line saying what the model is: its about.txt, else a line built from its config."""
    path = Path(llm.path) if llm.path else None
    name = "the built-in model" if is_builtin(llm) else (path.name if path else "an in-memory model")
    about = model_about(path)
    if about:
        return f"{name}: {about}"
    c = llm.config
    return (f"{name}: a ZAYA1-architecture model, {c.num_hidden_layers} layers, hidden {c.hidden_size}, "
            f"{c.num_experts} experts, context {llm.max_context} tokens")


class Reply:
    """Writes a streamed reply: reasoning apart (dimmed on a terminal), then the answer."""

    def __init__(self, out, color: bool, starts_in_reasoning: bool):
        self.out, self.color = out, color
        self.parser = ReasoningParser(starts_in_reasoning)
        self.thinking = False
        self.content: list[str] = []

    def feed(self, text: str, last: bool = False) -> None:
        reasoning, content = self.parser.feed(text)
        if last:
            r, c = self.parser.flush()
            reasoning, content = reasoning + r, content + c
        if reasoning:
            if not self.thinking:
                self._write("Thinking...\n", style=True)
                self.thinking = True
            self._write(reasoning, style=True)
        if content:
            self.content.append(content)  # before writing: Ctrl-C may land while the text goes out
            self._end_thinking()
            self._write(content)
        self.out.flush()

    def close(self, stopped: bool = False) -> None:
        """End the reply; a stopped one ends where it was cut, without closing the reasoning."""
        if stopped and self.thinking and self.color:
            self.out.write(RESET)
        elif not stopped:
            self._end_thinking()
        self.out.write("\n")
        self.out.flush()

    def _end_thinking(self) -> None:
        if self.thinking:
            self._write("\n...done thinking.\n\n", style=True)
            self.thinking = False

    def _write(self, text: str, style: bool = False) -> None:
        self.out.write(f"{DIM}{text}{RESET}" if style and self.color else text)


class Chat:
    """A conversation with a model, its settings, and the REPL commands that act on them."""

    def __init__(self, llm, *, system: str | None = None, sampling: dict | None = None,
                 thinking: bool | None = None, out=None, err=None):
        self.llm, self.system, self.thinking = llm, system, thinking
        self.sampling = dict(sampling or {})
        self.out, self.err = out or sys.stdout, err or sys.stderr
        self.color = use_color(self.out)
        self.history: list[dict] = []

    def note(self, text: str) -> None:
        self.err.write(text + "\n")
        self.err.flush()

    def messages(self, user: str | None = None) -> list[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.history + ([{"role": "user", "content": user}] if user is not None else [])

    def encode(self, messages, generation_prompt: bool = True) -> tuple[str, list[int]]:
        text = self.llm.render_chat(messages, add_generation_prompt=generation_prompt,
                                    enable_thinking=self.thinking)
        return text, self.llm.tokenizer.encode(text, add_special_tokens=False)

    # -- a turn ---------------------------------------------------------------------------------
    def turn(self, user: str) -> None:
        """Answer one message. Whatever goes wrong, the conversation is kept."""
        try:
            self._turn(user)
        except ContextLengthError as exc:
            self.note(f"error: {exc}; /set max_new_tokens auto fits replies to what is left, /reset starts over")
        except ZayaError as exc:
            self.note(f"error: {exc}")
        except KeyboardInterrupt:
            self.note("(stopped)")
        except Exception as exc:  # noqa: BLE001 - one failed turn must not end the session
            self.note(f"error: the model failed on this turn ({type(exc).__name__}: {exc})")

    def _turn(self, user: str) -> None:
        text, ids = self.encode(self.messages(user))
        limit, requested = self.llm.max_context, self.sampling.get("max_new_tokens")
        if len(ids) >= limit:
            self.note(f"context full: the conversation and this message take {len(ids)} of {limit} tokens; "
                      f"/reset starts over (the conversation is kept until then)")
            return
        budget = fit_max_new_tokens(len(ids), limit, requested, default=CHAT_MAX_NEW_TOKENS)
        params = {k: v for k, v in self.sampling.items() if k != "max_new_tokens"}
        reply, finish = Reply(self.out, self.color, generation_starts_in_reasoning(text)), None
        try:
            for event in self.llm.stream([ids], max_new_tokens=budget, **params):
                reply.feed(event.text, last=event.finish_reason is not None)
                finish = event.finish_reason or finish
        except KeyboardInterrupt:
            reply.close(stopped=True)
            self._keep(user, reply, stopped=True)
            self.note("(stopped)")
            return
        reply.close()
        self._keep(user, reply)
        if finish == "length" and len(ids) + budget >= limit:
            self.note(f"(the reply filled the context of {limit} tokens; /reset starts over)")
        elif finish == "length":
            self.note(f"(the reply reached max_new_tokens={budget}; /set max_new_tokens to allow more)")

    def _keep(self, user: str, reply: Reply, stopped: bool = False) -> None:
        """Add the exchange to the conversation (its answer; reasoning is not carried to later turns,
        as the chat templates drop it). A stopped reply is kept when its answer had begun, as a
        chat UI's stop button does; one stopped while still reasoning leaves no trace."""
        answer = "".join(reply.content).strip()
        if answer or not stopped:
            self.history += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]

    # -- commands -------------------------------------------------------------------------------
    def command(self, line: str) -> bool:
        """Run a /command; False means quit."""
        name, _, rest = line.strip().partition(" ")
        name = name.lower()
        if name in ("/exit", "/quit", "/bye"):
            return False
        if name in ("/help", "/?"):
            self.note(HELP)
        elif name in ("/reset", "/clear"):
            self.history = []
            self.note("(conversation cleared)")
        elif name == "/set":
            self.set(rest)
        elif name == "/show":
            self.show()
        else:
            self.note(f"unknown command {name}; /help lists them")
        return True

    def set(self, args: str) -> None:
        name, _, value = args.strip().partition(" ")
        name, value = name.replace("-", "_").lower(), value.strip()
        if name == "think":
            if value.lower() not in ("on", "off", "auto"):
                self.note("usage: /set think on|off|auto")
                return
            self.thinking = {"on": True, "off": False, "auto": None}[value.lower()]
            self.note(f"think: {value.lower()}")
            return
        if name not in SETTINGS or not value:
            self.note(f"usage: /set NAME VALUE, NAME one of {', '.join(SETTINGS)}, think")
            return
        updated = dict(self.sampling)
        if value.lower() in UNSET:
            updated.pop(name, None)
        else:
            try:
                updated[name] = SETTINGS[name](value)
            except ValueError:
                self.note(f"error: {name} takes {'a number' if SETTINGS[name] is float else 'an integer'}, "
                          f"got {value!r}")
                return
        try:
            SamplingParams.from_kwargs(**updated)
            if updated.get("max_new_tokens", 0) >= self.llm.max_context:
                raise ZayaError(f"max_new_tokens {updated['max_new_tokens']} cannot fit in the model's context of "
                                f"{self.llm.max_context} tokens")
        except ZayaError as exc:
            self.note(f"error: {exc}")
            return
        self.sampling = updated
        self.note(f"{name}: {updated.get(name, 'auto')}")

    def show(self) -> None:
        used = len(self.encode(self.messages(), generation_prompt=False)[1])
        limit, exchanges = self.llm.max_context, len(self.history) // 2
        defaults = SamplingParams()
        values = {n: self.sampling.get(n, getattr(defaults, n)) for n in SETTINGS if n != "max_new_tokens"}
        cap = self.sampling.get("max_new_tokens", f"auto (up to {CHAT_MAX_NEW_TOKENS})")
        think = {None: "the template's default", True: "on", False: "off"}[self.thinking]
        lines = [f"model     {describe(self.llm)}"]
        if not is_builtin(self.llm):
            lines.append(f"path      {self.llm.path or '(in memory)'}")
        lines += [f"context   {used} of {limit} tokens used, {limit - used} left "
                  f"({exchanges} exchange{'' if exchanges == 1 else 's'})",
                  f"sampling  {', '.join(f'{n} {str(v).lower()}' for n, v in values.items())}",
                  f"reply     max_new_tokens {cap}; think {think}"]
        self.note("\n".join(lines))


# -- input ----------------------------------------------------------------------------------------
def setup_history(path: Path):
    """readline with a history file, when stdin is a terminal; returns a function that saves it."""
    if not sys.stdin.isatty():
        return lambda: None
    try:
        import readline  # optional: absent on some platforms (Windows), where input() still works
    except ImportError:
        return lambda: None
    readline.set_history_length(HISTORY_LENGTH)
    try:
        readline.read_history_file(path)
    except OSError:
        pass  # no history yet, or unreadable: start without

    def save():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(path)
        except OSError:
            pass  # a read-only home must not break quitting

    return save


def read_message(read=input) -> str:
    """One message: a line, or the lines between an opening and a closing \"\"\"."""
    line = read(PROMPT)
    if not line.lstrip().startswith(FENCE):
        return line
    first = line.lstrip()[len(FENCE):]
    if first.rstrip().endswith(FENCE):
        return first.rstrip()[:-len(FENCE)]
    lines = [first]
    while True:
        line = read(MORE)
        if line.rstrip().endswith(FENCE):
            lines.append(line.rstrip()[:-len(FENCE)])
            return "\n".join(lines).strip("\n")
        lines.append(line)


def repl(chat: Chat, read=input) -> int:
    """Read messages and commands until /exit or end of input."""
    while True:
        try:
            line = read_message(read)
        except EOFError:
            chat.err.write("\n")
            return 0
        except KeyboardInterrupt:  # at the prompt: drop what was typed, as a shell does
            chat.err.write("\n")
            continue
        if not line.strip():
            continue
        if line.lstrip().startswith("/"):
            if not chat.command(line):
                return 0
            continue
        chat.turn(line)


def run(args) -> int:
    llm = load_from_args(args)
    if llm.tokenizer is None:
        raise ZayaError("this model has no tokenizer, so it cannot chat")
    chat = Chat(llm, system=args.system, sampling=sampling_kwargs(args),
                thinking=False if args.no_think else None)
    chat.note(f"zaya chat with {describe(llm)}")
    chat.note(f"/help for commands, {FENCE} for multi-line input, Ctrl-C stops a reply, Ctrl-D quits")
    save = setup_history(data_dir() / "chat_history")
    try:
        return repl(chat)
    finally:
        save()


def register(sub) -> None:
    p = sub.add_parser("chat", help="interactive chat (streams tokens, shows reasoning apart)",
                       description="Chat with a model. /help inside lists the commands.")
    add_model_args(p)
    add_sampling_args(p, max_new_tokens=CHAT_MAX_NEW_TOKENS)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--no-think", action="store_true", help="ask the chat template to skip reasoning")
    p.set_defaults(func=run)
