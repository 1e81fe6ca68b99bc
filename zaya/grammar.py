"""Constrained decoding and the thinking budget: what `sampling.Constraint` does for zaya.

A request's `Guide` (a `sampling.ConstraintSpec`) describes two phases of each sequence:

* **reasoning** (when the prompt leaves `<think>` open): free, except that once ``thinking_budget``
  tokens have been spent the closing `</think>` is forced, so a model that would think forever
  still answers;
* **answer** (after `</think>`, or from the first token when the prompt opens no think block):
  a grammar (a JSON schema, ZAYA's XML tool calls, or either), or only some tokens banned
  (``tool_choice: "none"``), or free.

Grammars are compiled and matched by llguidance (guidance-ai/llguidance, the library behind
OpenAI's and llama.cpp's structured outputs): it builds its token index from the checkpoint's
``tokenizer.json`` (no transformers), compiles a schema in milliseconds and computes a mask over a
262k vocabulary in ~0.1 ms; benchmarks/grammar_libraries.py measures it against xgrammar and
outlines-core (docs/server.md). The mask is computed on the decode thread when the logits are
there: computing it on a worker thread during the forward was tried and measured worse
(benchmarks/constrained_decoding.py), since handing work to and from a Python thread waits for
the GIL behind the forward's Python code (milliseconds) while the mask itself takes microseconds.

JSON is constrained to one layout (``", "`` and ``": "`` separators, no other whitespace, as
``json.dumps`` writes it) so a small model cannot pad forever; up to four spaces or newlines may
come before the answer. Tool calls follow the chat template:
``<zyphra_tool_call>\\n<function=NAME>\\n<parameter=P>\\nVALUE\\n</parameter>\\n</function>\\n</zyphra_tool_call>``,
string parameters as raw text, every other value as JSON valid under the parameter's schema.
"""

from __future__ import annotations

import json
import threading
import weakref
from dataclasses import dataclass

import llguidance
import torch

from zaya.chat import THINK_CLOSE, THINK_OPEN, TOOL_CALL_CLOSE, TOOL_CALL_OPEN, schema_types
from zaya.errors import ZayaError

JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
REASONING_EFFORT = {"minimal": 256, "low": 1024, "medium": 4096, "high": 16384}  # thinking budgets
"""``reasoning_effort`` -> thinking budget in tokens; ``"none"`` turns thinking off in the template."""


class GrammarError(ZayaError):
    """A schema, tool list or tool choice that cannot be turned into a grammar (a 400). ``field``
    says which: "schema", "tools" or "tool_choice"."""

    def __init__(self, message: str, field: str = "schema"):
        super().__init__(message)
        self.field = field


# -- the tokenizer index ------------------------------------------------------------------------
_INDEX_LOCK = threading.Lock()
_INDEXES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def token_index(tokenizer, vocab_size: int) -> llguidance.LLTokenizer:
    """llguidance's index of ``tokenizer`` (a zaya `Tokenizer`) over the model's ``vocab_size``
    rows (ids past the tokenizer's are never allowed). Built once per tokenizer: ~6 s for a
    262k vocabulary on a loaded 2-core machine, milliseconds for the built-in one."""
    with _INDEX_LOCK:
        index = _INDEXES.get(tokenizer)
        if index is None or index.vocab_size != vocab_size:
            index = llguidance.LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab_size,
                                           eos_token=sorted(tokenizer.eos_ids))
            _INDEXES[tokenizer] = index
        return index


# -- grammars -----------------------------------------------------------------------------------
def _lit(text: str) -> str:
    """A Lark string literal."""
    return json.dumps(text, ensure_ascii=False)


def _tag(tokenizer, text: str) -> str:
    """A tag as a grammar item: its token when the tokenizer has one, else the literal text."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    return f"<[{ids[0]}]>" if len(ids) == 1 else _lit(text)


def json_rule(schema, field: str = "schema") -> str:
    """``%json {...}`` for a JSON schema, in zaya's one JSON layout; `GrammarError` (naming
    ``field``) for a schema llguidance cannot enforce, with its reason."""
    if isinstance(schema, bool):
        schema = {} if schema else {"not": {}}
    if not isinstance(schema, dict):
        raise GrammarError(f"a JSON schema must be an object, got {type(schema).__name__}", field)
    text = json.dumps({**schema, "x-guidance": JSON_LAYOUT}, ensure_ascii=False)
    try:
        llguidance.JsonCompiler().compile(text)
    except ValueError as exc:
        raise GrammarError(f"unsupported or invalid JSON schema: {exc}", field) from None
    return "%json " + text


def schema_of_response_format(fmt) -> dict | None:
    """The JSON schema an OpenAI ``response_format`` (chat: ``{"type": "json_schema", "json_schema":
    {"schema": ...}}``; Responses ``text.format``: ``{"type": "json_schema", "schema": ...}``) asks
    for; None for plain text."""
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise GrammarError("response_format must be an object")
    kind = fmt.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind != "json_schema":
        raise GrammarError(f"response_format type {kind!r} is not supported; use text, json_object or json_schema")
    spec = fmt.get("json_schema", fmt)
    if not isinstance(spec, dict) or "schema" not in spec:
        raise GrammarError("response_format json_schema needs a 'schema'")
    schema = spec["schema"]
    if not isinstance(schema, (dict, bool)):
        raise GrammarError("response_format json_schema.schema must be a JSON schema object")
    return schema


def _function(tool) -> tuple[str, dict, list]:
    fn = tool.get("function", tool) if isinstance(tool, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise GrammarError("every tool needs a function name", "tools")
    name = fn["name"]
    if any(c in name for c in "<>\n"):
        raise GrammarError(f"tool name {name!r} may not contain '<', '>' or a newline", "tools")
    params = fn.get("parameters") or fn.get("input_schema") or {}
    props = params.get("properties") or {} if isinstance(params, dict) else None
    required = params.get("required") or [] if isinstance(params, dict) else None
    if not isinstance(props, dict) or not isinstance(required, list):
        raise GrammarError(f"tool {name!r}: parameters must be a JSON schema object with 'properties'", "tools")
    return name, props, required


def _parameter_value(rule: str, schema) -> list[str]:
    """Rules for one parameter's value: raw text for strings, JSON for everything else."""
    if not isinstance(schema, dict):
        raise GrammarError(f"parameter schema must be an object, got {type(schema).__name__}", "tools")
    try:
        types = schema_types(schema)
    except TypeError:
        raise GrammarError(f"malformed parameter schema: {json.dumps(schema)[:200]}", "tools") from None
    if types == {"string"} and "enum" not in schema and "const" not in schema:
        low, high = schema.get("minLength", 0), schema.get("maxLength")
        if not isinstance(low, int) or not (high is None or isinstance(high, int) and high >= low >= 0):
            raise GrammarError(f"parameter schema: bad minLength / maxLength in {json.dumps(schema)[:200]}", "tools")
        span = f"{{{low},{'' if high is None else high}}}"  # characters, as JSON schema counts them
        return [f"{rule}[lazy]: /(?s:.{span})\\n<\\/parameter>/"]
    if types == {"string"}:  # a closed set of raw strings
        values = schema.get("enum", [schema.get("const")])
        return [f"{rule}: " + " | ".join(_lit(f"{v}\n</parameter>") for v in values if isinstance(v, str))]
    return [f"{rule}: {rule}_json \"\\n</parameter>\"", f"{rule}_json: {json_rule(schema, 'tools')}"]


def tool_calls_grammar(tokenizer, tools, *, only: str | None = None, parallel: bool = True) -> tuple[str, list[str]]:
    """(start symbol, rules) for one or more ZAYA XML tool calls (exactly one unless ``parallel``),
    to any of ``tools`` or only the one named ``only``."""
    functions = [_function(t) for t in tools or []]
    names = [f[0] for f in functions]
    if only is not None and only not in names:
        raise GrammarError(f"tool_choice names the function {only!r}, which is not among the tools "
                           f"({', '.join(names) or 'none given'})", "tool_choice")
    if not functions:
        raise GrammarError("tool_choice asks for a tool call but no tools are given", "tool_choice")
    rules, alternatives = [], []
    for i, (name, props, required) in enumerate(functions):
        if only is not None and name != only:
            continue
        items = []
        for j, (param, schema) in enumerate(props.items()):
            if any(c in param for c in "<>\n"):
                raise GrammarError(f"tool {name!r}: parameter name {param!r} may not contain '<', '>' or a newline",
                                   "tools")
            rule = f"f{i}_p{j}"
            rules.append(f"{rule}: {_lit(f'<parameter={param}>' + chr(10))} {rule}_v \"\\n\"")
            rules += _parameter_value(f"{rule}_v", schema)
            items.append(rule if param in required else f"{rule}?")
        rules.append(f"f{i}: {_lit(f'<function={name}>' + chr(10))} {' '.join(items)} \"</function>\\n\"")
        alternatives.append(f"f{i}")
    rules.append(f"call: {_tag(tokenizer, TOOL_CALL_OPEN)} \"\\n\" ({' | '.join(alternatives)}) "
                 f"{_tag(tokenizer, TOOL_CALL_CLOSE)}")
    rules.append("calls: call (\"\\n\" call)*" if parallel else "calls: call")
    return "calls", rules


def answer_grammar(tokenizer, *, schema=None, tools=None, tool_choice="auto", parallel: bool = True) -> str | None:
    """The Lark grammar of an answer, or None when the answer is free.

    ``tool_choice``: ``"auto"`` (calls allowed when ``schema`` constrains the answer, else free),
    ``"required"`` (one or more calls), ``{"name": NAME}`` (a call to NAME) or ``"none"``."""
    named = tool_choice.get("name") if isinstance(tool_choice, dict) else None
    forced = tool_choice == "required" or named is not None
    alternatives, rules = [], []
    if forced or (tool_choice == "auto" and tools and schema is not None):
        start, call_rules = tool_calls_grammar(tokenizer, tools, only=named, parallel=parallel)
        alternatives.append(start)
        rules += call_rules
    if schema is not None and not forced:
        alternatives.insert(0, "json_answer")
        rules.append(f"json_answer: {json_rule(schema)}")
    if not alternatives:
        return None
    head = ["%llguidance {}", f"start: LEAD? ({' | '.join(alternatives)})", "LEAD: /[ \\n]{1,4}/"]
    return "\n".join(head + rules) + "\n"


# -- per-sequence state -------------------------------------------------------------------------
_SHIFTS = torch.tensor([1 << b for b in range(31)] + [-(1 << 31)], dtype=torch.int32)


@dataclass
class Guide:
    """A request's constraint (`sampling.ConstraintSpec`); build it with `make_guide`."""

    vocab_size: int
    starts_in_reasoning: bool
    thinking_budget: int | None
    think_close: tuple[int, ...]
    eos: tuple[int, ...]
    matcher: llguidance.LLMatcher | None = None   # compiled answer grammar, copied per sequence
    banned: torch.Tensor | None = None            # bool (vocab,): tokens the answer may not use

    def start(self) -> "GuidedSequence":
        return GuidedSequence(self)


class GuidedSequence:
    """One sequence's constraint (`sampling.Constraint`): reasoning with a budget, then the answer."""

    def __init__(self, guide: Guide):
        self.guide = guide
        self.reasoning = guide.starts_in_reasoning
        self.thought = 0                       # reasoning tokens so far
        self.recent: list[int] = []            # the last few tokens, to spot a multi-token </think>
        self.forcing: list[int] = []           # tokens still to force
        self.matcher = guide.matcher.deep_copy() if guide.matcher is not None else None
        if self.reasoning and guide.thinking_budget == 0:
            self.forcing = list(guide.think_close)

    def restrict(self, logits: torch.Tensor) -> torch.Tensor:
        if self.forcing:
            out = torch.full_like(logits, float("-inf"))
            out[self.forcing[0]] = 0.0
            return out
        if self.reasoning:
            return logits
        forbidden = self.guide.banned if self.matcher is None else _forbidden(self.matcher, self.guide)
        return logits if forbidden is None else logits.masked_fill(forbidden, float("-inf"))

    def accept(self, token: int) -> None:
        if self.forcing and token == self.forcing[0]:
            self.forcing.pop(0)
        if self.reasoning:
            self._reason(token)
        elif self.matcher is not None:
            self.matcher.consume_token(token)

    def accepts(self, tokens: list[int]) -> int:
        if self.reasoning or self.matcher is None:  # reasoning is free until the budget forces
            return len(tokens)
        return self.matcher.validate_tokens(tokens)

    def _reason(self, token: int) -> None:
        close = self.guide.think_close
        self.recent = (self.recent + [token])[-len(close):]
        if tuple(self.recent) == close:
            self.reasoning, self.forcing = False, []
            return
        self.thought += 1
        budget = self.guide.thinking_budget
        if budget is not None and self.thought >= budget and not self.forcing:
            self.forcing = list(close)


def _forbidden(matcher: llguidance.LLMatcher, guide: Guide) -> torch.Tensor:
    """The bool (vocab,) mask of tokens the grammar forbids next; only EOS is left once the
    grammar has ended or failed."""
    bits = torch.zeros((guide.vocab_size + 31) // 32, dtype=torch.int32)
    if not matcher.is_error():
        matcher.unsafe_compute_mask_ptr(bits.data_ptr(), bits.numel() * 4)
    forbidden = ((bits.unsqueeze(-1) & _SHIFTS) == 0).view(-1)[:guide.vocab_size]
    if guide.banned is not None:
        forbidden |= guide.banned
    if bool(forbidden.all()):
        forbidden[list(guide.eos)] = False
    return forbidden


def make_guide(tokenizer, vocab_size: int, *, starts_in_reasoning: bool, thinking_budget: int | None = None,
               schema=None, tools=None, tool_choice="auto", parallel_tool_calls: bool = True,
               max_new_tokens: int | None = None) -> Guide | None:
    """The constraint of a request, or None when nothing is constrained. Raises `GrammarError`
    for a schema, tool list or tool choice that cannot be enforced.

    When the answer is constrained, reasoning also stops at half of ``max_new_tokens`` (if that is
    less than the budget), so that the answer it asks for has room."""
    if thinking_budget is not None and (not isinstance(thinking_budget, int) or thinking_budget < 0):
        raise GrammarError(f"thinking_budget must be an integer >= 0, got {thinking_budget!r}", "thinking_budget")
    grammar = answer_grammar(tokenizer, schema=schema, tools=tools, tool_choice=tool_choice,
                             parallel=parallel_tool_calls)
    banned = None
    if tool_choice == "none" and grammar is None:
        banned = _banned_token(tokenizer, vocab_size, TOOL_CALL_OPEN)
    budget = thinking_budget if starts_in_reasoning else None
    if grammar is not None and starts_in_reasoning and max_new_tokens is not None:
        budget = min(max_new_tokens // 2, budget if budget is not None else max_new_tokens)
    if grammar is None and banned is None and budget is None:
        return None
    if starts_in_reasoning:  # once reasoning has closed, the answer may not open a second think block
        reopen = _banned_token(tokenizer, vocab_size, THINK_OPEN)
        banned = reopen if banned is None or reopen is None else banned | reopen
    matcher = None
    if grammar is not None:
        matcher = llguidance.LLMatcher(token_index(tokenizer, vocab_size), grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(f"cannot enforce this schema or tool list: {matcher.get_error().strip()}",
                               "tools" if tools else "schema")
    think_close = tuple(tokenizer.encode(THINK_CLOSE, add_special_tokens=False))
    return Guide(vocab_size, starts_in_reasoning, budget, think_close, tuple(sorted(tokenizer.eos_ids)),
                 matcher, banned)


def _banned_token(tokenizer, vocab_size: int, text: str) -> torch.Tensor | None:
    """The bool (vocab,) mask banning ``text`` from the answer where it is one token (ZAYA1 and
    the built-in model spell `<zyphra_tool_call>` and `<think>` so), else None: tool_choice
    "none" bans the call opener, a reasoning request a second `<think>`."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        return None  # a vocabulary without that token: the parser still reads no calls
    banned = torch.zeros(vocab_size, dtype=torch.bool)
    banned[ids[0]] = True
    return banned
