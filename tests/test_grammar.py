"""zaya.grammar: constrained answers validate whatever the model would have said.

The "model" here is random logits (a seeded generator): every token the grammar allows is a
possible next token, so a property test over random schemas and random logits covers what no
trained model would try. Each tokenizer family is tried: the built-in model's byte-level BPE,
a tiny Gemma-style (metaspace) vocabulary and a tiny GPT-2 style byte-level one.
"""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import zaya
from zaya.chat import THINK_CLOSE, TOOL_CALL_OPEN, parse_assistant
from zaya.grammar import GrammarError, make_guide, schema_of_response_format
from zaya.llm import DEFAULT_MODEL
from zaya.tokenizer import Tokenizer

MAX_TOKENS = 600


@pytest.fixture(scope="module", params=["builtin", "gemma", "bytelevel"])
def tok(request, tokenizer_dir, byte_level_tokenizer_dir):
    path = {"builtin": DEFAULT_MODEL, "gemma": tokenizer_dir, "bytelevel": byte_level_tokenizer_dir}[request.param]
    t = Tokenizer.from_dir(path)
    return t, t.vocab_size + 7  # model rows past the tokenizer's ids are never allowed


def drive(guide, gen: torch.Generator, vocab: int, bias: dict[int, float] | None = None,
          limit: int = MAX_TOKENS) -> list[int]:
    """Sample from random logits under ``guide`` until EOS (not kept) or ``limit`` tokens."""
    seq, out = guide.start(), []
    for _ in range(limit):
        logits = torch.randn(vocab, generator=gen) * 3
        for i, b in (bias or {}).items():
            logits[i] += b
        logits = seq.restrict(logits)
        assert torch.isfinite(logits).any(), "the constraint left no token"
        token = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))
        seq.accept(token)
        if token in guide.eos:
            return out
        out.append(token)
    raise AssertionError(f"no EOS after {limit} tokens: the grammar did not end")


# -- random JSON schemas ------------------------------------------------------------------------
_names = st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=6)
_leaf = st.one_of(
    st.builds(lambda lo, span: {"type": "integer", "minimum": lo, "maximum": lo + span},
              st.integers(-1000, 1000), st.integers(0, 10**6)),
    st.just({"type": "number"}),
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.builds(lambda n: {"type": "string", "maxLength": n}, st.integers(0, 12)),
    st.builds(lambda vals: {"type": "string", "enum": vals}, st.lists(_names, min_size=1, max_size=4, unique=True)),
    st.builds(lambda p: {"type": "string", "pattern": p}, st.sampled_from(["^[a-z]{1,5}$", "^[0-9]{3}-[0-9]{2}$"])),
)


def _extend(kids):
    objects = st.builds(
        lambda props, data: {"type": "object", "properties": props,
                             "required": data.draw(st.lists(st.sampled_from(sorted(props)), unique=True))
                             if props else [], "additionalProperties": False},
        st.dictionaries(_names, kids, max_size=4), st.data())
    arrays = st.builds(lambda items, n: {"type": "array", "items": items, "maxItems": n}, kids, st.integers(0, 4))
    unions = st.builds(lambda a, b: {"anyOf": [a, b]}, kids, kids)
    return st.one_of(objects, arrays, unions)


schemas = st.recursive(_leaf, _extend, max_leaves=8)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schema=schemas, seed=st.integers(0, 2**31 - 1))
def test_random_schema_outputs_validate(tok, schema, seed):
    tokenizer, vocab = tok
    guide = make_guide(tokenizer, vocab, starts_in_reasoning=False, schema=schema)
    ids = drive(guide, torch.Generator().manual_seed(seed), vocab)
    text = tokenizer.decode(ids)
    jsonschema.validate(json.loads(text), schema)
    # one layout: at most four spaces or newlines before the value, none after, no newline inside
    assert len(text) - len(text.lstrip()) <= 4 and text == text.rstrip() and "\n" not in text.strip()


def test_json_object_and_layout(tok):
    tokenizer, vocab = tok
    schema = schema_of_response_format({"type": "json_object"})
    guide = make_guide(tokenizer, vocab, starts_in_reasoning=False, schema=schema)
    # free keys and strings: lean on the closing characters so random logits end in time
    closers = {ids[0]: 6.0 for c in '"}]' if len(ids := tokenizer.encode(c, add_special_tokens=False)) == 1}
    for seed in range(3):
        value = json.loads(tokenizer.decode(drive(guide, torch.Generator().manual_seed(seed), vocab, closers)))
        assert isinstance(value, dict)
    # whitespace is bounded: the answer cannot be padded, even when the model wants nothing else
    space = tokenizer.encode(" ", add_special_tokens=False)
    newline = tokenizer.encode("\n", add_special_tokens=False)
    bias = {i: 50.0 for i in space + newline}
    strict = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
              "additionalProperties": False}
    guide = make_guide(tokenizer, vocab, starts_in_reasoning=False, schema=strict)
    text = tokenizer.decode(drive(guide, torch.Generator().manual_seed(0), vocab, bias))
    assert json.loads(text)["a"] is not None and len(text) - len(text.lstrip()) <= 4


def test_reasoning_is_free_then_the_answer_is_constrained():
    tokenizer = Tokenizer.from_dir(DEFAULT_MODEL)
    vocab = tokenizer.vocab_size
    close = tokenizer.encode(THINK_CLOSE, add_special_tokens=False)
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
              "additionalProperties": False}
    guide = make_guide(tokenizer, vocab, starts_in_reasoning=True, thinking_budget=12, schema=schema)
    gen = torch.Generator().manual_seed(1)
    ids = drive(guide, gen, vocab, bias={close[0]: -100.0})  # a model that would never stop thinking
    reasoning, _, answer = tokenizer.decode(ids).partition(THINK_CLOSE)
    assert ids.index(close[0]) == 12, "</think> forced when the budget ran out"
    assert json.loads(answer)["n"] is not None
    # reasoning tokens are not masked: a token the schema forbids may appear while thinking
    seq = guide.start()
    logits = torch.zeros(vocab)
    assert torch.equal(seq.restrict(logits), logits)


@pytest.mark.parametrize("budget", [0, 3])
def test_thinking_budget_alone(budget):
    tokenizer = Tokenizer.from_dir(DEFAULT_MODEL)
    close = tokenizer.encode(THINK_CLOSE, add_special_tokens=False)
    guide = make_guide(tokenizer, tokenizer.vocab_size, starts_in_reasoning=True, thinking_budget=budget)
    seq, gen = guide.start(), torch.Generator().manual_seed(0)
    taken = []
    for _ in range(budget + len(close) + 5):
        logits = torch.randn(tokenizer.vocab_size, generator=gen)
        logits[close[0]] = -100.0
        token = int(seq.restrict(logits).argmax())
        seq.accept(token)
        taken.append(token)
    assert taken[budget:budget + len(close)] == close
    assert close[0] not in taken[budget + len(close):], "the answer after </think> is free again"
    assert make_guide(tokenizer, tokenizer.vocab_size, starts_in_reasoning=False, thinking_budget=3) is None


# -- tool calls ---------------------------------------------------------------------------------
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 12},
                                         "unit": {"type": "string", "enum": ["c", "f"]},
                                         "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["city", "days"]}}},
    {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"},
                                         "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3}},
        "required": ["a", "b"]}}},
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def _calls(tokenizer, ids):
    return parse_assistant(tokenizer.decode(ids), False, tools=TOOLS).tool_calls


@pytest.mark.parametrize("choice,parallel", [("required", True), ("required", False), ({"name": "add"}, True)])
def test_tool_calls_are_forced_and_valid(choice, parallel):
    tokenizer = Tokenizer.from_dir(DEFAULT_MODEL)
    vocab = tokenizer.vocab_size
    guide = make_guide(tokenizer, vocab, starts_in_reasoning=False, tools=TOOLS, tool_choice=choice,
                       parallel_tool_calls=parallel)
    # a newline between calls is how another call starts: favour it so parallel calls happen
    newline = tokenizer.encode("\n", add_special_tokens=False)[0]
    counts = set()
    for seed in range(6):
        calls = _calls(tokenizer, drive(guide, torch.Generator().manual_seed(seed), vocab, {newline: 2.0}))
        assert calls, "a forced choice makes at least one call"
        for call in calls:
            assert call.name in SCHEMAS and (choice == "required" or call.name == "add")
            # string parameters are raw text; the parser types the rest by the schema
            jsonschema.validate(json.loads(call.arguments_json), SCHEMAS[call.name])
        counts.add(len(calls))
    assert counts == {1} if not parallel else max(counts) >= 1


def test_tool_choice_none_bans_the_call_token():
    tokenizer = Tokenizer.from_dir(DEFAULT_MODEL)
    vocab = tokenizer.vocab_size
    open_id = tokenizer.encode(TOOL_CALL_OPEN, add_special_tokens=False)
    assert len(open_id) == 1
    guide = make_guide(tokenizer, vocab, starts_in_reasoning=False, tools=TOOLS, tool_choice="none")
    seq = guide.start()
    for seed in range(20):
        logits = torch.randn(vocab, generator=torch.Generator().manual_seed(seed))
        logits[open_id[0]] = 100.0  # a model set on calling a tool
        token = int(seq.restrict(logits).argmax())
        assert token != open_id[0]
        seq.accept(token)


def test_schema_and_tools_together_auto():
    """tool_choice auto with a response_format: the answer is the JSON or calls, nothing else."""
    tokenizer = Tokenizer.from_dir(DEFAULT_MODEL)
    vocab = tokenizer.vocab_size
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    guide = make_guide(tokenizer, vocab, starts_in_reasoning=False, schema=schema, tools=TOOLS)
    for seed in range(6):
        text = tokenizer.decode(drive(guide, torch.Generator().manual_seed(seed), vocab))
        result = parse_assistant(text, False, tools=TOOLS)
        assert result.tool_calls or json.loads(text)["ok"] in (True, False)


def test_accepts_counts_a_valid_prefix():
    tokenizer = Tokenizer.from_dir(DEFAULT_MODEL)
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
              "additionalProperties": False}
    guide = make_guide(tokenizer, tokenizer.vocab_size, starts_in_reasoning=False, schema=schema)
    good = tokenizer.encode('{"a": 12}', add_special_tokens=False)
    bad = tokenizer.encode('{"b": 12}', add_special_tokens=False)
    seq = guide.start()
    assert seq.accepts(good) == len(good)
    assert seq.accepts(bad) < len(bad)


# -- refusals -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,field", [
    ({"schema": {"type": "foo"}}, "schema"),
    ({"schema": [1, 2]}, "schema"),
    ({"schema": {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}}, "schema"),
    ({"tools": TOOLS, "tool_choice": {"name": "nope"}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "a<b"}}], "tool_choice": "required"}, "tools"),
    ({"tools": [{"type": "function", "function": {"parameters": {}}}], "tool_choice": "required"}, "tools"),
    ({"thinking_budget": -1}, "thinking_budget"),
])
def test_bad_constraints_are_refused(kwargs, field):
    tokenizer = Tokenizer.from_dir(DEFAULT_MODEL)
    with pytest.raises(GrammarError) as err:
        make_guide(tokenizer, tokenizer.vocab_size, starts_in_reasoning=True, **kwargs)
    assert err.value.field == field


@pytest.mark.parametrize("fmt", [{"type": "grammar"}, {"type": "json_schema"}, "json", {"type": "json_schema",
                                                                                      "json_schema": {"schema": 3}}])
def test_bad_response_formats(fmt):
    with pytest.raises(GrammarError):
        schema_of_response_format(fmt)


def test_llm_generate_and_chat_constrained():
    llm = zaya.load()
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"],
              "additionalProperties": False}
    messages = [{"role": "user", "content": "Start with 4, then apply +3 in order. What is the result?"}]
    r = llm.chat(messages, json_schema=schema, max_new_tokens=80, seed=0, temperature=1.5)
    jsonschema.validate(json.loads(r.content), schema)
    fmt = {"type": "json_schema", "json_schema": {"name": "r", "schema": {"enum": ["yes", "no"]}}}
    r = llm.chat(messages, response_format=fmt, reasoning_effort="none", max_new_tokens=40, seed=0)
    assert not r.reasoning and json.loads(r.content) in ("yes", "no")
    r = llm.chat(messages, tools=TOOLS, tool_choice={"name": "get_weather"}, thinking_budget=16,
                 max_new_tokens=200, seed=0)
    assert [c.name for c in r.tool_calls][:1] == ["get_weather"] and r.completion.finish_reason == "stop"
    with pytest.raises(zaya.errors.ZayaError):
        llm.chat(messages, reasoning_effort="extreme")
