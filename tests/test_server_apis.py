"""Structured outputs, enforced tool choice, the thinking budget, /tokenize, /v1/responses and
/v1/messages: the official `openai` and `anthropic` clients against a live server on the
built-in model. Constrained answers are checked with `jsonschema`, whatever the model says."""

from __future__ import annotations

import json

import anthropic
import httpx
import jsonschema
import openai
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import zaya
from zaya.server import ServerConfig, create_app

from tests.live_server import LiveServer

MODEL = "zaya-tiny"
KEY = "sk-test"
QUESTION = "Start with 6, then apply +5, *2 in order. What is the result?"
ASK = [{"role": "user", "content": QUESTION}]
INT = {"type": "integer", "minimum": -9999, "maximum": 9999}  # bounded: a small model may pad digits forever
SCHEMA = {"type": "object", "properties": {"result": INT, "steps": {"type": "array", "items": INT, "maxItems": 3}}, "required": ["result", "steps"],
    "additionalProperties": False}
TOOL_PARAMS = {"type": "object", "properties": {"a": INT, "b": INT,
                                                "op": {"type": "string", "enum": ["add", "mul"]}},
               "required": ["a", "b", "op"]}
CHAT_TOOLS = [{"type": "function", "function": {"name": "calc", "description": "Arithmetic.",
                                                "parameters": TOOL_PARAMS}},
              {"type": "function", "function": {"name": "note", "parameters": {
                  "type": "object", "properties": {"text": {"type": "string", "maxLength": 10}},
                  "required": ["text"]}}}]
FAST = {"thinking_budget": 24}  # short reasoning keeps the tests quick; answers still follow


@pytest.fixture(scope="module")
def server():
    llm = zaya.load(max_context=1024)
    live = LiveServer(create_app(llm, ServerConfig(model_name=MODEL, api_key=KEY, max_batch=4)))
    yield live
    live.stop()


@pytest.fixture(scope="module")
def oai(server):
    return server.client(api_key=KEY)


@pytest.fixture(scope="module")
def claude(server):
    return anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0, timeout=60)


# -- chat completions ---------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1])
def test_json_schema_validates(oai, seed):
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}}
    r = oai.chat.completions.create(model=MODEL, messages=ASK, response_format=fmt, max_tokens=160, seed=seed,
                                    temperature=1.3, extra_body=FAST)
    choice = r.choices[0]
    assert choice.finish_reason == "stop"
    jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    assert choice.message.reasoning_content is not None  # the reasoning stayed free
    details = r.usage.completion_tokens_details
    assert 0 < details.reasoning_tokens <= FAST["thinking_budget"]


def test_json_object_streamed_equals_whole(oai):
    kwargs = dict(model=MODEL, messages=ASK, response_format={"type": "json_object"}, max_tokens=200, temperature=0,
                  extra_body=FAST)
    whole = oai.chat.completions.create(**kwargs)
    stream = oai.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    text, usage = "", None
    for chunk in stream:
        usage = chunk.usage or usage
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
    assert text == whole.choices[0].message.content
    # free-form JSON from a toy model may run to max_tokens (cut mid-object); a finished one parses
    finish = whole.choices[0].finish_reason
    assert finish == "length" or isinstance(json.loads(text), dict), finish
    assert usage.completion_tokens_details.reasoning_tokens == whole.usage.completion_tokens_details.reasoning_tokens


def test_reasoning_effort_none(oai):
    fmt = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": {"enum": ["odd", "even"]}}}
    r = oai.chat.completions.create(model=MODEL, messages=ASK, response_format=fmt, max_tokens=40, seed=0,
                                    reasoning_effort="none")
    assert json.loads(r.choices[0].message.content) in ("odd", "even")
    assert r.usage.completion_tokens_details.reasoning_tokens == 0 and not r.choices[0].message.reasoning_content


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "note"}}])
def test_tool_choice_enforced(oai, choice):
    r = oai.chat.completions.create(model=MODEL, messages=ASK, tools=CHAT_TOOLS, tool_choice=choice,
                                    max_tokens=240, seed=0, parallel_tool_calls=False, extra_body=FAST)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and len(c.message.tool_calls) == 1
    call = c.message.tool_calls[0]
    if isinstance(choice, dict):
        assert call.function.name == "note"
    params = {t["function"]["name"]: t["function"]["parameters"] for t in CHAT_TOOLS}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), params)


def test_tool_choice_none_and_thinking_budget(oai):
    r = oai.chat.completions.create(model=MODEL, messages=ASK, tools=CHAT_TOOLS, tool_choice="none", max_tokens=60,
                                    seed=0, extra_body={"thinking_budget": 5})
    c = r.choices[0]
    assert not c.message.tool_calls and c.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens_details.reasoning_tokens == 5


@pytest.mark.parametrize("body,param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format"),
    ({"tools": CHAT_TOOLS, "tool_choice": {"type": "function", "function": {"name": "missing"}}}, "tool_choice"),
    ({"thinking_budget": -3}, "thinking_budget"),
    ({"reasoning_effort": "extreme"}, "reasoning_effort"),
])
def test_chat_refusals(oai, body, param):
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(model=MODEL, messages=ASK, max_tokens=8, extra_body=body)
    assert err.value.body["param"] == param


# -- /tokenize and /detokenize ------------------------------------------------------------------
def test_tokenize_detokenize(server):
    headers = {"Authorization": f"Bearer {KEY}"}
    with server.http(headers=headers) as http:
        got = http.post("/tokenize", json={"model": MODEL, "prompt": "Start with 6"}).json()
        assert got["count"] == len(got["tokens"]) and got["max_model_len"] == 1024
        back = http.post("/detokenize", json={"model": MODEL, "tokens": got["tokens"]}).json()
        assert back["prompt"].endswith("Start with 6")
        chat = http.post("/tokenize", json={"model": MODEL, "messages": ASK}).json()
        text = http.post("/detokenize", json={"tokens": chat["tokens"]}).json()["prompt"]
        assert QUESTION in text and chat["count"] > got["count"]
        for path, body in [("/tokenize", {"model": MODEL}), ("/tokenize", {"prompt": "a", "messages": ASK}),
                           ("/detokenize", {"tokens": [-1]}), ("/detokenize", {"tokens": "abc"}),
                           ("/tokenize", {"model": "other", "prompt": "a"})]:
            r = http.post(path, json=body)
            assert 400 <= r.status_code < 500 and "error" in r.json(), (path, body, r.text)


# -- /v1/responses ------------------------------------------------------------------------------
def test_responses_text_and_reasoning(oai):
    r = oai.responses.create(model=MODEL, input=QUESTION, instructions="Answer briefly.", max_output_tokens=200,
                             temperature=0, store=False, extra_body=FAST)
    kinds = [item.type for item in r.output]
    assert kinds[0] == "reasoning" and "message" in kinds
    assert r.output_text and r.status == "completed"
    assert r.usage.output_tokens_details.reasoning_tokens <= FAST["thinking_budget"]
    assert r.store is False


def test_responses_structured_stream(oai):
    # the Responses API has no seed: the sampler's seed comes from torch's global generator, which the
    # tests before this one advance by however many unseeded requests they make
    torch.manual_seed(0)
    fmt = {"format": {"type": "json_schema", "name": "answer", "schema": SCHEMA, "strict": True}}
    events = list(oai.responses.create(model=MODEL, input=[{"role": "user", "content": QUESTION}], text=fmt,
                                       max_output_tokens=200, stream=True, extra_body=FAST))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert "response.output_text.delta" in kinds and "response.reasoning_text.delta" in kinds
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    jsonschema.validate(json.loads(text), SCHEMA)
    assert events[-1].response.output_text == text


def test_responses_function_tools(oai):
    tools = [{"type": "function", "name": "calc", "parameters": TOOL_PARAMS, "strict": True}]
    r = oai.responses.create(model=MODEL, input=QUESTION, tools=tools, tool_choice="required",
                             parallel_tool_calls=False, max_output_tokens=240, extra_body=FAST)
    calls = [item for item in r.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "calc"
    jsonschema.validate(json.loads(calls[0].arguments), TOOL_PARAMS)
    # the next turn sends the call and its output back, as a client without stored state does
    follow = [{"role": "user", "content": QUESTION}, calls[0].model_dump(exclude_none=True),
              {"type": "function_call_output", "call_id": calls[0].call_id, "output": "22"}]
    r2 = oai.responses.create(model=MODEL, input=follow, tools=tools, tool_choice="none", max_output_tokens=60,
                              extra_body={"thinking_budget": 4})
    assert not [item for item in r2.output if item.type == "function_call"]


@pytest.mark.parametrize("body", [
    {"input": "hi", "previous_response_id": "resp_123"},
    {"input": []},
    {"input": [{"type": "image", "image_url": "x"}]},
    {"input": "hi", "tools": [{"type": "web_search"}]},
    {"input": "hi", "text": {"format": {"type": "json_schema", "schema": {"type": 7}}}},
    {"input": 5},
])
def test_responses_refusals(oai, body):
    with pytest.raises(openai.BadRequestError):
        oai.responses.create(model=MODEL, max_output_tokens=8, **body)


# -- /v1/messages -------------------------------------------------------------------------------
def test_messages_thinking_and_text(claude):
    m = claude.messages.create(model=MODEL, max_tokens=200, system="Answer briefly.", messages=ASK,
                               thinking={"type": "enabled", "budget_tokens": 24}, extra_body={"temperature": 0})
    kinds = [b.type for b in m.content]
    assert kinds[0] == "thinking" and "text" in kinds
    assert m.stop_reason in ("end_turn", "max_tokens") and m.usage.input_tokens > 0
    count = claude.messages.count_tokens(model=MODEL, system="Answer briefly.", messages=ASK)
    # Anthropic's input_tokens leaves out the prompt tokens read from the (prefix) cache
    assert count.input_tokens == m.usage.input_tokens + (m.usage.cache_read_input_tokens or 0)


def test_messages_stream_matches_event_sequence(claude):
    with claude.messages.stream(model=MODEL, max_tokens=120, messages=ASK,
                                thinking={"type": "enabled", "budget_tokens": 16}) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert "content_block_start" in kinds and "content_block_delta" in kinds and "message_delta" in kinds
    assert final.content[0].type == "thinking" and final.usage.output_tokens > 0


def test_messages_stop_sequences(claude):
    m = claude.messages.create(model=MODEL, max_tokens=200, messages=ASK, stop_sequences=["nope", "*2="],
                               extra_body={"temperature": 0})
    assert (m.stop_reason, m.stop_sequence) == ("stop_sequence", "*2="), m.content
    assert m.content[0].type == "thinking" and "*2=" not in m.content[0].thinking


@pytest.mark.parametrize("choice", [{"type": "any"}, {"type": "tool", "name": "calc"}])
def test_messages_tool_use(claude, choice):
    tools = [{"name": "calc", "description": "Arithmetic.", "input_schema": TOOL_PARAMS}]
    m = claude.messages.create(model=MODEL, max_tokens=240, messages=ASK, tools=tools,
                               tool_choice={**choice, "disable_parallel_tool_use": True},
                               thinking={"type": "enabled", "budget_tokens": 16}, extra_body={"temperature": 0})
    uses = [b for b in m.content if b.type == "tool_use"]
    assert m.stop_reason == "tool_use" and len(uses) == 1 and uses[0].name == "calc"
    jsonschema.validate(uses[0].input, TOOL_PARAMS)
    # the result goes back in a user turn; tool_choice none answers in text
    turn = [*ASK, {"role": "assistant", "content": m.content},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": uses[0].id, "content": "22"}]}]
    m2 = claude.messages.create(model=MODEL, max_tokens=60, messages=turn, tools=tools, tool_choice={"type": "none"},
                                thinking={"type": "enabled", "budget_tokens": 4})
    assert not [b for b in m2.content if b.type == "tool_use"]


@pytest.mark.parametrize("body", [
    {"messages": [{"role": "system", "content": "x"}]},
    {"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
    {"messages": ASK, "tools": [{"name": "calc", "input_schema": TOOL_PARAMS}], "tool_choice": {"type": "tool",
                                                                                               "name": "nope"}},
    {"messages": ASK, "thinking": {"type": "enabled", "budget_tokens": -1}},
    {"messages": ASK, "tool_choice": {"type": "any"}},
])
def test_messages_refusals_have_anthropic_shape(claude, body):
    with pytest.raises(anthropic.BadRequestError) as err:
        claude.messages.create(model=MODEL, max_tokens=8, **body)
    assert err.value.body["type"] == "error" and err.value.body["error"]["type"] == "invalid_request_error"


def test_messages_auth_and_malformed(server):
    with pytest.raises(anthropic.AuthenticationError) as err:
        anthropic.Anthropic(base_url=server.url, api_key="wrong", max_retries=0).messages.create(
            model=MODEL, max_tokens=8, messages=ASK)
    assert err.value.body["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.NotFoundError):
        anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0).messages.create(
            model="claude-nope", max_tokens=8, messages=ASK)
    bearer = anthropic.Anthropic(base_url=server.url, auth_token=KEY, api_key=None, max_retries=0)
    assert bearer.messages.count_tokens(model=MODEL, messages=ASK).input_tokens > 0
    with httpx.Client(base_url=server.url, headers={"x-api-key": KEY}) as http:
        for raw in [b"{", b"[]", b'{"model": "zaya-tiny"}', b'{"model": "zaya-tiny", "max_tokens": "x", "messages": []}']:
            r = http.post("/v1/messages", content=raw)
            assert 400 <= r.status_code < 500 and r.json()["type"] == "error", raw


def test_speculative_on_messages_and_responses(server, oai, claude):
    """The zaya extension ``speculative`` reaches the engine from both APIs: greedy output is the
    same with drafting on, and a bad value is a 4xx in each API's own error shape."""
    kw = dict(model=MODEL, max_tokens=40, messages=ASK)
    plain = claude.messages.create(**kw, extra_body={"speculative": False, "temperature": 0})
    spec = claude.messages.create(**kw, extra_body={"speculative": 4, "temperature": 0})
    assert [b.model_dump() for b in spec.content] == [b.model_dump() for b in plain.content]
    rkw = dict(model=MODEL, input=QUESTION, max_output_tokens=40, temperature=0)
    assert oai.responses.create(**rkw, extra_body={"speculative": True}).output_text == \
        oai.responses.create(**rkw, extra_body={"speculative": False}).output_text
    with server.http(headers={"x-api-key": KEY}) as http:
        r = http.post("/v1/messages", json={"model": MODEL, "max_tokens": 4, "messages": ASK, "speculative": 17})
        assert r.status_code == 400 and r.json()["type"] == "error" and "speculative" in r.json()["error"]["message"]
        r = http.post("/v1/responses", json={"model": MODEL, "input": "hi", "speculative": "yes"})
        assert r.status_code == 400 and "speculative" in r.json()["error"]["message"]


# -- RSA: rounds free, the final answer constrained -----------------------------------------------
def test_rsa_with_response_format(oai):
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}
    r = oai.chat.completions.create(model=MODEL, messages=ASK, response_format=fmt, seed=0,
                                    extra_body={"rsa": {"n": 2, "k": 2, "rounds": 1, "thinking_budget": 16}})
    jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)


# -- random bodies: a 4xx in the API's own error shape, never a 5xx --------------------------------
_json = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) |
                     st.text(max_size=12), lambda kids: st.lists(kids, max_size=3) |
                     st.dictionaries(st.sampled_from(["type", "name", "role", "content", "text", "schema", "format",
                                                      "budget_tokens", "call_id", "input_schema", "x"]), kids,
                                     max_size=3), max_leaves=10)
_BASE = {"/v1/responses": {"model": MODEL, "input": "hi", "max_output_tokens": 3},
         "/v1/messages": {"model": MODEL, "messages": ASK, "max_tokens": 3},
         "/v1/messages/count_tokens": {"model": MODEL, "messages": ASK},
         "/tokenize": {"model": MODEL, "prompt": "hi"}, "/detokenize": {"tokens": [1, 2]}}
_FIELDS = ["model", "input", "instructions", "max_output_tokens", "text", "reasoning", "tools", "tool_choice",
           "messages", "system", "max_tokens", "thinking", "stop_sequences", "temperature", "top_k", "stream",
           "prompt", "tokens", "add_special_tokens", "previous_response_id", "rsa", "thinking_budget",
           "speculative"]


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(route=st.sampled_from(sorted(_BASE)), field=st.sampled_from(_FIELDS), value=_json)
def test_random_fields_never_5xx(server, route, field, value):
    body = {**_BASE[route], field: value}
    if field == "stream":
        body["stream"] = False  # the status of a stream is 200 before any token; covered above
    with server.http(headers={"x-api-key": KEY}) as http:
        r = http.post(route, content=json.dumps(body).encode())
        assert 200 <= r.status_code < 500, (body, r.status_code, r.text)
        if r.status_code >= 400:
            err = r.json()
            assert err["error"]["message"] and (err.get("type") == "error") == route.startswith("/v1/messages"), err


def test_rsa_on_messages_and_responses(oai, claude):
    """RSA behind the other APIs: the rounds run, then the answer comes in that API's shape."""
    rsa = {"rsa": {"n": 2, "k": 2, "rounds": 1, "thinking_budget": 12, "max_tokens": 48}}
    tools = [{"name": "calc", "input_schema": TOOL_PARAMS}]
    m = claude.messages.create(model=MODEL, max_tokens=200, messages=ASK, tools=tools,
                               tool_choice={"type": "tool", "name": "calc"}, extra_body=rsa)
    uses = [b for b in m.content if b.type == "tool_use"]
    assert m.stop_reason == "tool_use" and uses and uses[0].name == "calc"
    jsonschema.validate(uses[0].input, TOOL_PARAMS)
    r = oai.responses.create(model=MODEL, input=QUESTION, max_output_tokens=200, extra_body=rsa)
    assert r.status in ("completed", "incomplete") and r.output


def test_responses_empty_answer_is_one_empty_message():
    """An answer that ends before any text (an end token first) is still a message item."""
    from types import SimpleNamespace

    from zaya.server.openai_responses import ResponsesReply, ResponsesRequest, to_chat
    from zaya.server.responses import ChatChoice

    req = ResponsesRequest(model=MODEL, input=QUESTION)
    reply = ResponsesReply(req, to_chat(req), ChatChoice(0, False), prompt_tokens=3)
    reply.feed(0, SimpleNamespace(token_id=None, text="", finish_reason="stop", logprob=None, top_logprobs=None))
    out = reply.body()["output"]
    assert [(o["type"], o["content"][0]["text"]) for o in out] == [("message", "")]
