"""The OpenAI-compatible server, end to end: the official `openai` client against live uvicorn
servers on loopback, with a tiny random model (and a scripted engine where the output must be
known: reasoning and tool-call parsing, a slow engine for 429)."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import zaya
from zaya.engine import TokenEvent
from zaya.server import ServerConfig, create_app
from zaya.server.responses import ChatChoice
from zaya.server.scheduler import DONE, QueueFull, Scheduler

from tests.live_server import LiveServer

MODEL = "tiny"
HI = [{"role": "user", "content": "Hello! What is 12 + 30?"}]


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return zaya.load(tiny_model_dir, max_context=512)


@pytest.fixture(scope="module")
def server(llm):
    live = LiveServer(create_app(llm, ServerConfig(model_name=MODEL, max_batch=8, max_queue=8,
                                                   max_body_bytes=64 << 10)))
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


# -- scripted engine: known outputs through the real HTTP path ----------------------------------
class ScriptedEngine:
    """The Engine contract (check/add/step/cancel/active) emitting a fixed text per prompt: the
    prompt's last 'SCRIPT:name' picks SCRIPTS[name]; one token per step."""

    def __init__(self, tokenizer, delay=0.0):
        self.tokenizer, self.delay, self.max_context, self.rows = tokenizer, delay, 512, []

    def check(self, prompt_len, params):
        zaya.engine.Engine.check(self, prompt_len, params)

    def add(self, request):
        prompt = self.tokenizer.decode(request.prompt_ids)
        name = prompt.rsplit("SCRIPT:", 1)[-1].split("<", 1)[0].strip()
        pieces = list(SCRIPTS.get(name, "plain answer"))
        request.sequences = [type("S", (), {"finish_reason": None})() for _ in range(request.params.n)]
        for i, seq in enumerate(request.sequences):
            self.rows.append((request, i, seq, list(pieces)))

    @property
    def active(self):
        return len(self.rows)

    def cancel(self, request):
        for seq in request.sequences:
            seq.finish_reason = seq.finish_reason or "cancelled"
        self.rows = [r for r in self.rows if r[0] is not request]

    def step(self):
        time.sleep(self.delay)
        events, keep = [], []
        for request, i, seq, pieces in self.rows:
            if pieces:
                events.append(TokenEvent(request.prompt_index, i, 100, pieces.pop(0), None, -0.5, {100: -0.5}))
                keep.append((request, i, seq, pieces))
            else:
                seq.finish_reason = "stop"
                events.append(TokenEvent(request.prompt_index, i, None, "", "stop"))
        self.rows = keep
        return events


SCRIPTS = {
    "think": "Let me add 12 and 30.\n</think>\n\nThe answer is 42.",
    "tool": ("I should call the tool.</think>\nChecking now.\n<zyphra_tool_call>\n<function=get_weather>\n"
             "<parameter=city>\nParis\n</parameter>\n<parameter=days>\n3\n</parameter>\n</function>\n"
             "</zyphra_tool_call>"),
    "slow": "x" * 40,
}
WEATHER = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                             "parameters": {"type": "object", "properties": {
                                                 "city": {"type": "string"}, "days": {"type": "integer"}}}}}]


@pytest.fixture(scope="module")
def scripted(llm):
    live = LiveServer(create_app(llm, ServerConfig(model_name=MODEL, api_key="s3cret", max_batch=1, max_queue=1),
                                 engine_factory=lambda: ScriptedEngine(llm.tokenizer, delay=0.002)))
    yield live
    live.stop()


def say(script):
    return [{"role": "user", "content": f"SCRIPT:{script}"}]


# -- basics ---------------------------------------------------------------------------------------
def test_models_health_metrics(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    with server.http() as http:
        health = http.get("/health").json()
        assert health["status"] == "ok" and health["active_sequences"] == 0
        client.chat.completions.create(model=MODEL, messages=HI, max_tokens=3)
        text = http.get("/metrics").text
    for name in ("zaya_requests_total", "zaya_generation_tokens_total", "zaya_queue_depth", "zaya_batch_size",
                 "zaya_request_duration_seconds_bucket", "zaya_time_to_first_token_seconds_count"):
        assert name in text
    assert 'zaya_requests_total{route="/v1/chat/completions",status="200"}' in text
    cache = server.state.cache
    gauges = dict(line.split() for line in text.splitlines() if line.startswith(("zaya_cache", "zaya_prefix")))
    assert int(gauges["zaya_cache_blocks_total"]) == cache.num_blocks - 1
    assert int(gauges["zaya_cache_blocks_used"]) + int(gauges["zaya_cache_blocks_free"]) == cache.num_blocks - 1
    assert 0 <= float(gauges["zaya_prefix_cache_hit_rate"]) <= 1
    assert "# TYPE zaya_prefix_cache_hit_tokens_total counter" in text


def _random_ids(seed, n=120):
    return torch.randint(10, 200, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("stream", [False, True])
def test_cached_tokens_in_usage(server, client, stream):
    bs = server.state.cache.block_size
    ids = _random_ids(seed=7 + stream)

    def completion_usage():
        if not stream:
            return client.completions.create(model=MODEL, prompt=ids, max_tokens=2).usage
        chunks = list(client.completions.create(model=MODEL, prompt=ids, max_tokens=2, stream=True,
                                                stream_options={"include_usage": True}))
        return chunks[-1].usage

    first, again = completion_usage(), completion_usage()
    assert first.prompt_tokens_details.cached_tokens == 0
    assert again.prompt_tokens_details.cached_tokens == (len(ids) - 1) // bs * bs
    messages = [{"role": "system", "content": f"Rules {stream}: " + "be brief and exact. " * 30}] + HI
    kw = dict(model=MODEL, messages=messages, max_tokens=2)
    if stream:
        usages = [list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))[-1]
                  .usage for _ in range(2)]
    else:
        usages = [client.chat.completions.create(**kw).usage for _ in range(2)]
    assert usages[0].prompt_tokens_details.cached_tokens == 0
    assert usages[1].prompt_tokens_details.cached_tokens == (usages[1].prompt_tokens - 1) // bs * bs > 0


def test_cache_budget_limits_and_names_the_flag(llm, tiny_model_dir, capsys):
    from zaya.cli import main
    from zaya.engine.cache import bytes_per_block, state_bytes

    memory = 256 * state_bytes(llm.config, torch.float32) + 6 * bytes_per_block(llm.config, torch.float32, 32)
    small = zaya.LLM(llm.model, llm.tokenizer, cache_memory=memory, max_context=512)
    live = LiveServer(create_app(small, ServerConfig(model_name=MODEL)))
    try:
        assert live.state.max_context == 6 * 32
        with live.http() as http:
            r = http.post("/v1/completions", json={"model": MODEL, "prompt": _random_ids(1, 150), "max_tokens": 100})
            assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
            message = r.json()["error"]["message"]
            assert "KV cache budget" in message and "--cache-memory" in message
            ok = http.post("/v1/completions", json={"model": MODEL, "prompt": _random_ids(1, 150), "max_tokens": 5})
            assert ok.status_code == 200
    finally:
        live.stop()
    assert main(["serve", "--model", str(tiny_model_dir), "--cache-memory", "1000"]) == 1
    err = capsys.readouterr().err
    assert "too small for one sequence" in err and "--cache-memory" in err


def test_a_full_pool_queues_requests_and_loses_none(llm):
    from zaya.engine.cache import bytes_per_block, state_bytes

    memory = 256 * state_bytes(llm.config, torch.float32) + 8 * bytes_per_block(llm.config, torch.float32, 32)
    small = zaya.LLM(llm.model, llm.tokenizer, cache_memory=memory, max_context=512)
    prompts = [_random_ids(20 + i, 100) for i in range(4)]
    want = [c.token_ids for c in llm.generate(prompts, max_new_tokens=60, temperature=0, ignore_eos=True)]
    live = LiveServer(create_app(small, ServerConfig(model_name=MODEL, step_tokens=64)))
    try:
        assert live.state.scheduler.engine.step_tokens == 64
        results = [None] * len(prompts)

        def call(i):  # each needs 5 of the 8 blocks: they run one or two at a time, the rest wait
            with live.http() as http:
                body = {"model": MODEL, "prompt": prompts[i], "max_tokens": 60, "temperature": 0, "ignore_eos": True,
                        "logprobs": 0}
                results[i] = http.post("/v1/completions", json=body).json()

        threads = [threading.Thread(target=call, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for r, ids in zip(results, want):
            tokens = r["choices"][0]["logprobs"]["tokens"]
            assert len(tokens) == 60 and tokens == [live.state.token_text(t) for t in ids]
        assert small.cache.blocks_used() == 0
    finally:
        live.stop()


def test_chat_reasoning_split_live(client):
    r = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=12, seed=1)
    c = r.choices[0]
    # the template opens <think>, so everything the random model says is reasoning
    assert c.message.role == "assistant" and c.message.reasoning_content and c.message.content == ""
    assert c.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 12 and r.usage.prompt_tokens > 5
    r = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=12, seed=1,
                                       extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert r.choices[0].message.content and getattr(r.choices[0].message, "reasoning_content", None) is None


def test_completions_logprobs(client):
    r = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=6, seed=2, logprobs=3,
                                  extra_body={"ignore_eos": True})
    c = r.choices[0]
    assert r.usage.completion_tokens == 6 and c.finish_reason == "length"
    # top_logprobs is keyed by token text, so byte tokens that all decode to U+FFFD collapse
    assert len(c.logprobs.tokens) == 6 and all(1 <= len(t) <= 3 for t in c.logprobs.top_logprobs)
    assert all(lp <= 0 for lp in c.logprobs.token_logprobs) and c.logprobs.text_offset[0] == 0


def test_chat_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=5, seed=3, logprobs=True,
                                       top_logprobs=2, extra_body={"ignore_eos": True})
    entries = r.choices[0].logprobs.content
    assert len(entries) == 5 and all(len(e.top_logprobs) == 2 for e in entries)
    assert all(e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob for e in entries)


def test_seed_reproducible_and_n(client):
    kw = dict(model=MODEL, prompt="Hello", max_tokens=8, temperature=1.0)
    a = client.completions.create(seed=7, **kw).choices[0].text
    assert client.completions.create(seed=7, **kw).choices[0].text == a
    assert client.completions.create(seed=8, **kw).choices[0].text != a
    r = client.completions.create(seed=7, n=3, **kw)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.text for c in r.choices}) > 1
    chat = client.chat.completions.create(model=MODEL, messages=HI, n=2, max_tokens=4, seed=7)
    assert [c.index for c in chat.choices] == [0, 1]


def test_speculative_via_extra_body(server, client):
    """Greedy output is the same with prompt-lookup speculation on, per request."""
    kw = dict(model=MODEL, prompt="one two three one two three one two", max_tokens=24, temperature=0)
    plain = client.completions.create(extra_body={"ignore_eos": True, "speculative": False}, **kw).choices[0]
    for value in (True, 3):
        spec = client.completions.create(extra_body={"ignore_eos": True, "speculative": value}, **kw).choices[0]
        assert spec.text == plain.text and spec.finish_reason == plain.finish_reason == "length"
    with server.http() as http:
        metrics = http.get("/metrics").text
    drafted = [line for line in metrics.splitlines() if line.startswith("zaya_spec_draft_tokens ")]
    assert drafted and float(drafted[0].split()[1]) > 0 and "zaya_decode_tokens " in metrics


def test_stop_string(client):
    kw = dict(model=MODEL, prompt="Numbers:", max_tokens=30, seed=11, extra_body={"ignore_eos": True})
    text = client.completions.create(**kw).choices[0].text
    stop = text[8:10]
    assert len(stop) == 2
    r = client.completions.create(stop=[stop, "@@never@@"], **kw).choices[0]
    assert r.text == text[:text.index(stop)] and r.finish_reason == "stop"


def test_streaming_chat_matches_whole(client):
    kw = dict(model=MODEL, messages=HI, max_tokens=16, seed=5, logprobs=True)
    whole = client.chat.completions.create(**kw).choices[0]
    assert whole.message.reasoning_content  # the template opens <think>: there is reasoning to compare
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert reasoning == (whole.message.reasoning_content or "") and content == whole.message.content
    assert sum(len(c.choices[0].logprobs.content) for c in chunks[1:] if c.choices and c.choices[0].logprobs) == \
        len(whole.logprobs.content)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(whole.logprobs.content)


def test_streaming_completions_raw_sse(server):
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 4, "n": 2, "stream": True,
            "stream_options": {"include_usage": True}}
    with server.http() as http:
        lines = [l for l in http.post("/v1/completions", json=body).text.splitlines() if l]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(l[6:]) for l in lines[:-1]]
    assert events[-1]["choices"] == [] and 2 <= events[-1]["usage"]["completion_tokens"] <= 8
    assert {c["index"] for e in events for c in e["choices"]} == {0, 1}
    assert sum(1 for e in events for c in e["choices"] if c["finish_reason"]) == 2


# -- reasoning and tool calls with known text -----------------------------------------------------
def test_scripted_reasoning_and_tools(scripted):
    client = scripted.client(api_key="s3cret")
    m = client.chat.completions.create(model=MODEL, messages=say("think")).choices[0].message
    assert m.reasoning_content == "Let me add 12 and 30." and m.content == "The answer is 42."
    r = client.chat.completions.create(model=MODEL, messages=say("tool"), tools=WEATHER)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content == "Checking now."
    call = c.message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris", "days": 3}
    chunks = list(client.chat.completions.create(model=MODEL, messages=say("tool"), tools=WEATHER, stream=True))
    deltas = [ch.choices[0].delta for ch in chunks]
    assert "".join(d.content or "" for d in deltas) == "Checking now."
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == "I should call the tool."
    calls = [tc for d in deltas for tc in d.tool_calls or []]
    assert len(calls) == 1 and json.loads(calls[0].function.arguments)["days"] == 3
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    none = client.chat.completions.create(model=MODEL, messages=say("tool"), tools=WEATHER, tool_choice="none")
    assert none.choices[0].message.tool_calls is None and "<zyphra_tool_call>" in none.choices[0].message.content


def test_chat_choice_stream_equals_whole():
    text = SCRIPTS["tool"]
    for cut in (1, 3, 7):
        choice = ChatChoice(0, True, WEATHER, True)
        pieces = [text[i:i + cut] for i in range(0, len(text), cut)]
        deltas = [choice.feed(TokenEvent(0, 0, 1, p)) for p in pieces]
        deltas.append(choice.feed(TokenEvent(0, 0, None, "", "stop")))
        msg = choice.message()["message"]
        assert "".join(d["delta"].get("content", "") for d in deltas if d) == msg["content"] == "Checking now."
        assert "".join(d["delta"].get("reasoning_content", "") for d in deltas if d) == msg["reasoning_content"]
        assert msg["tool_calls"][0]["function"]["name"] == "get_weather"


# -- RSA ------------------------------------------------------------------------------------------
# The aggregation template alone is ~480 tokens with the test tokenizer: budget + K*tau must fit the
# 512-token context that is left (see zaya.rsa.fit).
RSA = {"profile": "cpu-tiny", "n": 3, "k": 2, "max_tokens": 8, "tail_tokens": 4}


def test_rsa_via_extra_body(server, client):
    r = client.chat.completions.create(model=MODEL, messages=HI, seed=4, extra_body={"rsa": RSA})
    summary = r.model_extra["rsa"]
    assert len(summary["rounds"]) == 2 and summary["config"]["n"] == 3 and summary["requests"] == 6
    assert r.usage.completion_tokens == sum(rd["completion_tokens"] for rd in summary["rounds"])
    assert r.usage.prompt_tokens == summary["prompt_tokens"] and len(summary["population"]) == 3
    chunks = list(client.chat.completions.create(model=MODEL, messages=HI, seed=4, stream=True,
                                                 stream_options={"include_usage": True},
                                                 extra_body={"rsa": dict(RSA, t=2)}))
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason][0]
    assert len(final.model_extra["rsa"]["rounds"]) == 2
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens  # same seed, same run
    with server.http() as http:
        for body in ({"rsa": {"profile": "nope"}}, {"rsa": {"n": "4"}}, {"rsa": {"zzz": 1}}, {"rsa": RSA, "n": 2},
                     # an explicit budget that cannot fit; the default profile's K=4 empty tails fill the context
                     {"rsa": dict(RSA, max_tokens=30)}, {"rsa": True}):
            resp = http.post("/v1/chat/completions", json={"model": MODEL, "messages": HI, **body})
            assert resp.status_code == 400 and resp.json()["error"]["param"].startswith(("rsa", "n")), resp.text
            too_long = resp.json()["error"]["code"] == "context_length_exceeded"
            assert too_long == (body["rsa"] is True or body["rsa"].get("max_tokens") == 30), resp.text
            assert not too_long or "tokens of context are left" in resp.json()["error"]["message"]


def test_rsa_profile_lengths_fit_the_context(server, client):
    """The default profile asks beta=16384, tau=4096; on a 512-token server both shrink to fit."""
    r = client.chat.completions.create(model=MODEL, messages=HI, seed=4,
                                       extra_body={"rsa": {"n": 2, "k": 2, "rounds": 1}})
    cfg, context = r.model_extra["rsa"]["config"], r.model_extra["rsa"]["context"]
    assert cfg["budget"] < 16384 and 0 < cfg["tail"] < 4096
    assert context["max_sequence_tokens"] <= 512


def test_api_error_maps_every_kind_of_failure():
    from zaya.errors import ContextLengthError, ZayaError
    from zaya.server.http import api_error
    from zaya.server.protocol import ApiError
    from zaya.server.scheduler import ShuttingDown

    def shape(exc, **kw):
        e = api_error(exc, **kw)
        return e.status, e.body()["error"]["param"], e.body()["error"]["code"], e.body()["error"]["message"]

    same = ApiError(418, "teapot")
    assert api_error(same) is same and api_error(same, rsa=True) is same
    assert shape(ShuttingDown("bye"))[:1] == shape(ShuttingDown("bye"), rsa=True)[:1] == (503,)
    too_long = ContextLengthError("prompt + max_new_tokens exceeds the context limit")
    assert shape(too_long) == (400, None, "context_length_exceeded", str(too_long))
    assert shape(too_long, rsa=True) == (400, "rsa", "context_length_exceeded",
                                         f"RSA: {too_long}; lower rsa budget or tail")
    assert shape(ZayaError("bad"), rsa=True) == (400, "rsa", None, "RSA: bad")
    assert shape(RuntimeError("boom"))[0] == shape(RuntimeError("boom"), rsa=True)[0] == 500


def test_rsa_disconnect_cancels_its_jobs(slow_server):
    server = slow_server
    body = {"model": MODEL, "messages": HI, "seed": 1,
            "rsa": {"profile": "cpu-tiny", "n": 2, "k": 2, "max_tokens": 12, "tail_tokens": 2}}
    # two rounds of 12 steps at >= 50 ms a step: the client gives up long before the run ends
    with server.http(timeout=0.5) as http, pytest.raises(httpx.ReadTimeout):
        http.post("/v1/chat/completions", json=body)
    assert _wait_idle(server, timeout=10), "the RSA run's rows were not freed after the client left"
    with server.http() as http:
        assert http.get("/health").json()["rsa_running"] == 0


# -- auth, limits, errors -------------------------------------------------------------------------
def test_api_key(scripted):
    with scripted.http() as http:
        assert http.get("/health").status_code == 200
        for method, path in (("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/chat/completions"),
                             ("POST", "/v1/completions"), ("GET", "/nope")):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
                r = http.request(method, path, headers=headers)
                assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert http.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        scripted.client(api_key="wrong").models.list()


BAD = [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (b'{"model": "tiny"}', 400, "messages"),
    (json.dumps({"model": "gpt-4", "messages": HI}).encode(), 404, "model"),
    (json.dumps({"model": MODEL, "messages": "hi"}).encode(), 400, "messages"),
    (json.dumps({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}).encode(), 400, "messages.0.role"),
    (json.dumps({"model": MODEL, "messages": HI, "temperature": "hot"}).encode(), 400, "temperature"),
    (json.dumps({"model": MODEL, "messages": HI, "max_tokens": 2.5}).encode(), 400, "max_tokens"),
    (json.dumps({"model": MODEL, "messages": HI, "temperature": -1}).encode(), 400, "temperature"),
    (json.dumps({"model": MODEL, "messages": HI, "top_p": 0}).encode(), 400, "top_p"),
    (json.dumps({"model": MODEL, "messages": HI, "top_k": -3}).encode(), 400, "top_k"),
    (json.dumps({"model": MODEL, "messages": HI, "seed": 2**70}).encode(), 400, "seed"),
    (json.dumps({"model": MODEL, "messages": HI, "presence_penalty": 9}).encode(), 400, "presence_penalty"),
    (json.dumps({"model": MODEL, "messages": HI, "stop": ["a"] * 17}).encode(), 400, "stop"),
    (json.dumps({"model": MODEL, "messages": HI, "n": 9}).encode(), 400, "n"),
    (json.dumps({"model": MODEL, "messages": HI, "speculative": "yes"}).encode(), 400, "speculative"),
    (json.dumps({"model": MODEL, "messages": HI, "speculative": 17}).encode(), 400, "speculative"),
    (json.dumps({"model": MODEL, "messages": HI, "speculative": -1}).encode(), 400, "speculative"),
    (json.dumps({"model": MODEL, "messages": HI, "n": 0}).encode(), 400, "n"),
    (json.dumps({"model": MODEL, "messages": HI, "max_tokens": 100000}).encode(), 400, "max_tokens"),
    (json.dumps({"model": MODEL, "messages": HI, "max_tokens": 0}).encode(), 400, "max_tokens"),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "fox " * 600}]}).encode(), 400, "messages"),
    (json.dumps({"model": MODEL, "messages": HI, "top_logprobs": 3}).encode(), 400, "top_logprobs"),
    (json.dumps({"model": MODEL, "messages": HI, "logprobs": True, "top_logprobs": 50}).encode(), 400, "top_logprobs"),
    (json.dumps({"model": MODEL, "messages": HI, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "foo"}}}}).encode(), 400, "response_format"),
    (json.dumps({"model": MODEL, "messages": HI, "response_format": {"type": "grammar"}}).encode(), 400,
     "response_format"),
    (json.dumps({"model": MODEL, "messages": HI, "tools": [{"type": "function", "function": {"name": "f"}}],
                 "tool_choice": {"type": "function", "function": {"name": "g"}}}).encode(), 400, "tool_choice"),
    (json.dumps({"model": MODEL, "messages": HI, "tool_choice": "required"}).encode(), 400, "tool_choice"),
    (json.dumps({"model": MODEL, "messages": HI, "thinking_budget": -1}).encode(), 400, "thinking_budget"),
    (json.dumps({"model": MODEL, "messages": HI, "reasoning_effort": "max"}).encode(), 400, "reasoning_effort"),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}).encode(),
     400, "messages.0.content"),
    (json.dumps({"model": MODEL, "messages": HI, "chat_template_kwargs": {"messages": 1}}).encode(), 400,
     "chat_template_kwargs"),
]


@pytest.mark.parametrize("body,status,param", BAD)
def test_bad_chat_requests(server, body, status, param):
    with server.http() as http:
        r = http.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    if param:
        assert err["param"] == param, err


def test_bad_completion_requests_and_routes(server, client):
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model=MODEL, prompt=[5] * 600, max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="token ids"):
        client.completions.create(model=MODEL, prompt=[1, 99999], max_tokens=1)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="x", max_tokens=1)
    with server.http() as http:
        assert http.get("/v1/nothing").status_code == 404
        assert http.get("/v1/chat/completions").status_code == 405
        assert http.get("/v1/nothing").json()["error"]["type"] == "not_found_error"


def test_body_size_limit(server):
    with server.http() as http:
        r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": HI, "pad": "x" * (70 << 10)})
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]


_json = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) |
                     st.text(max_size=20), lambda kids: st.lists(kids, max_size=4) |
                     st.dictionaries(st.text(max_size=8), kids, max_size=4), max_leaves=12)
_FIELDS = ["model", "messages", "prompt", "temperature", "top_p", "top_k", "min_p", "n", "stop", "seed",
           "logprobs", "top_logprobs", "stream", "stream_options", "tools", "tool_choice", "chat_template_kwargs",
           "presence_penalty", "frequency_penalty", "repetition_penalty", "response_format", "echo", "thinking_budget",
           "reasoning_effort", "parallel_tool_calls"]
_bodies = st.one_of(
    _json,
    st.dictionaries(st.sampled_from(_FIELDS), _json, max_size=5),
    st.builds(lambda k, v: {"model": MODEL, "messages": HI, "prompt": "x", "max_tokens": 3, k: v},
              st.sampled_from(_FIELDS), _json),
)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=_bodies, route=st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
def test_random_bodies_never_5xx(server, body, route):
    with server.http() as http:
        r = http.post(route, content=json.dumps(body).encode())
        assert 200 <= r.status_code < 500, (body, r.status_code, r.text)
        if r.status_code >= 400:
            assert r.json()["error"]["message"]
        assert http.get("/health").status_code == 200


# -- scheduling -----------------------------------------------------------------------------------
def _wait_idle(server, timeout=3.0):
    deadline = time.monotonic() + timeout
    with server.http() as http:
        while time.monotonic() < deadline:
            h = http.get("/health").json()
            if h["active_sequences"] == 0 and h["running_requests"] == 0:
                return True
            time.sleep(0.02)
    return False


def _cancelled(server) -> float:
    with server.http() as http:
        line = [l for l in http.get("/metrics").text.splitlines() if l.startswith("zaya_requests_cancelled_total")]
    return float(line[0].split()[-1])


def _slow_engine(llm, delay=0.05):
    """A real engine whose steps take at least `delay` seconds, so that a test can observe a
    request while it is still running on any machine: 450 tokens take over 20 s, far longer than
    a client starved of CPU on a loaded machine needs to read a few events and ask (at 10 ms a
    step the health check once found the stream's rows gone under heavy load)."""
    engine = llm.engine()
    step = engine.step
    engine.step = lambda: (time.sleep(delay), step())[1]
    return engine


@pytest.fixture
def slow_server(llm):
    live = LiveServer(create_app(llm, ServerConfig(model_name=MODEL, max_batch=8, max_queue=8),
                                 engine_factory=lambda: _slow_engine(llm)))
    yield live
    live.stop()


def test_disconnect_frees_the_slot(slow_server):
    server = slow_server
    before = _cancelled(server)
    body = {"model": MODEL, "messages": HI, "max_tokens": 450, "ignore_eos": True, "stream": True, "n": 2}
    with server.http() as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as r:
            lines = r.iter_lines()  # held: closing the generator would close the connection
            for i, _ in enumerate(lines):
                if i == 6:
                    break
            assert http.get("/health").json()["active_sequences"] == 2
    assert _wait_idle(server), "the stream's rows were not freed after the client left"
    # a non-streaming client that times out is cancelled too
    with server.http(timeout=0.3) as http, pytest.raises(httpx.ReadTimeout):
        http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 450, "ignore_eos": True})
    assert _wait_idle(server)
    assert _cancelled(server) == before + 2


def test_queue_full_429(scripted):
    client = scripted.client(api_key="s3cret")
    slow = dict(model=MODEL, messages=say("slow"))
    results = []

    def call():
        try:
            results.append(client.chat.completions.create(**slow).choices[0].message.reasoning_content)
        except openai.RateLimitError as exc:
            results.append(exc)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
        time.sleep(0.02)
    for t in threads:
        t.join()
    errors = [r for r in results if isinstance(r, Exception)]
    assert errors and all(e.response.headers["Retry-After"] == "2" for e in errors)
    assert any(r == "x" * 40 for r in results)


class FakeEngine:
    max_context = 100

    def __init__(self):
        self.rows, self.added = [], []

    @property
    def active(self):
        return len(self.rows)

    def check(self, prompt_len, params):
        pass

    def add(self, request):
        self.added.append(request.prompt_ids[0])
        request.sequences = [type("S", (), {"finish_reason": None})() for _ in range(request.params.n)]
        self.rows += [(request, i, 2) for i in range(request.params.n)]

    def cancel(self, request):
        self.rows = [r for r in self.rows if r[0] is not request]

    def step(self):
        events, keep = [], []
        for req, i, left in self.rows:
            done = left == 1
            if done:
                req.sequences[i].finish_reason = "length"
            else:
                keep.append((req, i, left - 1))
            events.append(TokenEvent(req.prompt_index, i, 5, "a", "length" if done else None))
        self.rows = keep
        return events


def test_scheduler_fifo_batching_and_bounds():
    from zaya.sampling import SamplingParams

    engine = FakeEngine()
    sched = Scheduler(lambda: engine, max_batch=4, max_queue=3)
    got, done = {}, threading.Event()

    def sink(name):
        def deliver(item):
            got.setdefault(name, []).append(item)
            if len([k for k, v in got.items() if v[-1] is DONE]) == 3:
                done.set()
        return deliver

    jobs = [sched.submit([k], SamplingParams(n=n), sink(k)) for k, n in ((1, 3), (2, 2), (3, 1))]
    with pytest.raises(QueueFull):
        sched.submit([9], SamplingParams(), sink(9))
    sched.cancel(jobs[2])  # a queued job leaves the queue at once
    sched.submit([4], SamplingParams(n=1), sink(4))
    sched.start()
    assert done.wait(5)
    sched.stop()
    # strict FIFO: 2 (two rows) waits for 1 (three rows) to leave, although 4 (one row) would fit
    assert engine.added == [1, 2, 4]
    assert 3 not in got and all(got[k][-1] is DONE for k in (1, 2, 4))
    assert sum(len(b) for b in got[1][:-1]) == 3 * 2


@pytest.mark.slow
def test_sigterm_graceful(tiny_model_dir, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(Path(zaya.__file__).parent.parent), OMP_NUM_THREADS="1")
    # --port 0: the server binds a free port itself and names it in uvicorn's startup line (info level)
    proc = subprocess.Popen([sys.executable, "-m", "zaya.cli", "serve", "--model", str(tiny_model_dir), "--port", "0",
                             "--log-level", "info"], env=env, stderr=subprocess.PIPE, text=True)
    log, ports = [], queue.Queue()

    def read_log():  # also keeps the pipe drained while the server runs
        for line in proc.stderr:
            log.append(line)
            if m := re.search(r"running on http://127\.0\.0\.1:(\d+)", line):
                ports.put(int(m.group(1)))
        ports.put(None)  # the server exited

    reader = threading.Thread(target=read_log, daemon=True)
    reader.start()
    try:
        try:
            port = ports.get(timeout=60)
        except queue.Empty:
            pytest.fail("the server logged no address within 60 s:\n" + "".join(log))
        assert port, "the server exited before it listened:\n" + "".join(log)
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
        body = {"model": tiny_model_dir.name, "prompt": "hi", "max_tokens": 60, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            next(lines)
            proc.send_signal(signal.SIGTERM)  # mid-stream: the stream still completes
            rest = [l for l in lines if l]
        assert rest[-1] == "data: [DONE]" and json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"
        # uvicorn re-raises the signal after its graceful shutdown, so the exit status is -SIGTERM
        assert proc.wait(20) in (0, -signal.SIGTERM)
        reader.join(10)
        started = "".join(log)
        assert "KV cache" in started and "(default: from" in started and "prefix caching on" in started
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        reader.join(5)
