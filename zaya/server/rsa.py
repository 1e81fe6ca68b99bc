"""Markovian RSA per request: ``"rsa": {...}`` in a chat completion body (the OpenAI client's
``extra_body={"rsa": {...}}``), in the format of Zyphra's RSA proxy.

The run is a `zaya.rsa.RSARun` step machine driven on the event loop: each step's prompts go to
the server's own scheduler as jobs (so its candidates decode in the same continuous batch as
everyone else's requests) and their events come back through the jobs' asyncio queue; tail and
prompt bookkeeping between steps runs in a worker thread. A client that leaves cancels the task,
which cancels its jobs. ``"rsa": true`` runs the default profile; an object picks a ``profile``
and overrides any `RSAConfig` field. Zyphra's names are accepted too: ``t`` (rounds *including*
round 0, so ``t = rounds + 1``), ``tail_tokens`` (tau) and ``max_tokens`` (beta). Top-level
``temperature``, ``top_p``, ``top_k``, ``seed`` and ``max_tokens`` apply when the rsa object does
not set them. Usage sums every token of every round; the response carries an ``rsa`` summary
(rounds, population, vote). A streaming client gets SSE comment lines ``: rsa {...progress...}``
(and keep-alives) while rounds run, then the answer as normal chunks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time

from starlette.concurrency import run_in_threadpool

from zaya.chat import generation_starts_in_reasoning
from zaya.errors import ZayaError
from zaya.rsa import PROFILES, GenerateRequest, RSAConfig, RSAError, RSAResult, RSARun, make_config
from zaya.rsa.backends import Candidate, EventText, TokenTools, derive_seed
from zaya.rsa.config import DEFAULT_PROFILE
from zaya.grammar import make_guide
from zaya.rsa.fit import fit_for_model
from zaya.sampling import MAX_N, SamplingParams
from zaya.server import responses as R
from zaya.server.generation import Submission, Timing, chat_choices, respond
from zaya.server.http import api_error, sse_response, watch_client
from zaya.server.prepare import chat_messages, prepare_final, render, template_kwargs, thinking_settings
from zaya.server.protocol import ApiError, bad_request

MAX_ROUNDS = 16
_ALIASES = {"tail_tokens": "tail", "max_tokens": "budget"}
_FIELD_TYPES = {f.name: f.type for f in dataclasses.fields(RSAConfig)}


# -- the request's settings -------------------------------------------------------------------
def rsa_config(state, req) -> RSAConfig:
    spec = {} if req.rsa is True else dict(req.rsa)
    profile = spec.pop("profile", None)
    if profile is not None and (not isinstance(profile, str) or profile not in PROFILES):
        raise bad_request(f"rsa.profile must be one of {', '.join(PROFILES)}", param="rsa.profile")
    if "t" in spec:
        t = spec.pop("t")
        if not isinstance(t, int) or isinstance(t, bool) or t < 1:
            raise bad_request("rsa.t (rounds including round 0) must be an integer >= 1", param="rsa.t")
        spec.setdefault("rounds", t - 1)
    for alias, name in _ALIASES.items():
        if alias in spec:
            spec.setdefault(name, spec.pop(alias))
    top = {"temperature": req.temperature, "top_p": req.top_p, "top_k": req.top_k, "seed": req.seed,
           "budget": req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens}
    for key, value in top.items():
        if value is not None:
            spec.setdefault(key, value)
    thinking, _ = template_kwargs(req)
    budget, thinking = thinking_settings(state, req, thinking)
    if thinking is not None:
        spec.setdefault("enable_thinking", thinking)
    if budget is not None:
        spec.setdefault("thinking_budget", budget)
    for key, value in spec.items():
        if key not in _FIELD_TYPES:
            raise bad_request(f"unknown rsa parameter {key!r}; valid: profile, t, tail_tokens, max_tokens, "
                              f"{', '.join(_FIELD_TYPES)}", param=f"rsa.{key}")
        if not _type_ok(value, str(_FIELD_TYPES[key])):
            raise bad_request(f"rsa.{key} has the wrong type ({type(value).__name__})", param=f"rsa.{key}")
    try:
        cfg = make_config(profile or DEFAULT_PROFILE, **spec)
    except ZayaError as exc:
        raise bad_request(str(exc), param="rsa") from None
    if cfg.n > MAX_N or cfg.rounds > MAX_ROUNDS:
        raise bad_request(f"rsa: n must be <= {MAX_N} and rounds <= {MAX_ROUNDS} on this server", param="rsa")
    return cfg


def _explicit(req) -> set[str]:
    """The RSA lengths a request sets itself; the profile's others shrink to fit the context."""
    names = {_ALIASES.get(key, key) for key in (req.rsa if isinstance(req.rsa, dict) else {})}
    if req.max_completion_tokens is not None or req.max_tokens is not None:
        names.add("budget")
    return names & {"budget", "tail"}


def _type_ok(value, kind: str) -> bool:
    if value is None:
        return "None" in kind
    if isinstance(value, bool):
        return "bool" in kind
    if isinstance(value, int):
        return "int" in kind or "float" in kind
    if isinstance(value, float):
        return "float" in kind
    return isinstance(value, str) and "str" in kind


# -- a run on the scheduler --------------------------------------------------------------------
class Progress:
    """The latest progress of a run, shown to a streaming client."""

    def __init__(self):
        self.state: dict | None = None
        self.seq = 0

    def update(self, **state) -> None:
        self.state, self.seq = state, self.seq + 1


async def solve_on_scheduler(state, messages: list[dict], cfg: RSAConfig, progress: Progress) -> RSAResult:
    """Drive one run to its result; every error leaves as an `ApiError` about ``rsa``."""
    try:
        tokens = TokenTools(state.llm.tokenizer, name="zaya-server")
        # the scheduler drafts where a request asks (RSARun asks in aggregation rounds by default)
        tokens.drafts, tokens.spec_stats = True, getattr(state.scheduler.engine, "spec_stats", None)
        run = await run_in_threadpool(RSARun, tokens, messages, profile=cfg)
        while (request := run.next_request()) is not None:
            outputs = await generate(state, request, progress)
            await run_in_threadpool(run.feed, outputs)
        return run.result
    except Exception as exc:
        raise api_error(exc, rsa=True) from None


async def generate(state, request: GenerateRequest, progress: Progress) -> list[list[Candidate]]:
    """One step of a run: its prompts become scheduler jobs of at most ``max_batch`` rows each
    (a prompt's samples share a prefill), admitted past the queue bound."""
    thinking, prompts = await run_in_threadpool(_render, state.llm, request)
    sched = state.scheduler
    chunk = max(1, min(request.n, request.batch_size or sched.max_batch, sched.max_batch))
    items, origin = [], []
    for p, ids in enumerate(prompts):
        for c, first in enumerate(range(0, request.n, chunk)):
            params = SamplingParams.from_kwargs(
                max_new_tokens=request.max_tokens, temperature=request.temperature, top_p=request.top_p,
                top_k=request.top_k, n=min(chunk, request.n - first), seed=derive_seed(request.seed, p, c),
                constraint=_budget(state, thinking[p], request.thinking_budget), speculative=request.speculative)
            sched.check(len(ids), params)
            items.append((ids, params))
            origin.append((p, first))
    events, tokens, finished = EventText(), 0, 0
    sub = Submission(state, items, bypass_limit=True, rsa=True)
    try:
        async for job, ev in sub.events():
            p, first = origin[job]
            new, done = events.add((p, first + ev.index), ev)
            tokens, finished = tokens + new, finished + done
            progress.update(round=request.round, candidates=request.sequences, finished=finished,
                            tokens=tokens)
    finally:
        sub.cancel()  # jobs still running when the client left or another job failed
    return [[events.candidate((p, s), thinking[p], len(ids)) for s in range(request.n)]
            for p, ids in enumerate(prompts)]


def _budget(state, starts_in_reasoning: bool, budget: int | None):
    if budget is None:
        return None
    return make_guide(state.llm.tokenizer, state.llm.config.vocab_size, starts_in_reasoning=starts_in_reasoning,
                      thinking_budget=budget)


def _render(llm, request: GenerateRequest) -> tuple[list[bool], list[list[int]]]:
    texts = [llm.render_chat(m, enable_thinking=request.enable_thinking) for m in request.prompts]
    return ([generation_starts_in_reasoning(t) for t in texts],
            [llm.tokenizer.encode(t, add_special_tokens=False) for t in texts])


# -- the route ----------------------------------------------------------------------------------
async def rsa_chat(state, request, req, reply_for=None):
    """A chat completion answered by a Markovian RSA run. With ``response_format`` or ``tools``,
    or for another API (``reply_for(prep, choices)`` makes its reply), the selected answer goes
    through one more generation that shapes it (`prepare_final`), answered like any chat request."""
    cfg = _admit(state, req)
    messages, cfg = _problem(state, req, cfg)
    progress = Progress()
    task = asyncio.ensure_future(solve_on_scheduler(state, messages, cfg, progress))
    state.rsa_running.add(task)
    state.metrics.rsa_runs.inc()

    def release():
        task.cancel()
        state.rsa_running.discard(task)

    if reply_for is not None or req.response_format or req.tools:
        try:
            result = await watch_client(request, task, release)
        finally:
            release()
        return await _final_pass(state, request, req, result, reply_for)

    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return sse_response(_chunks(state, req, task, progress, include_usage), release)
    try:
        result = await watch_client(request, task, release)
    finally:
        release()
    message, finish, usage, summary = _answer(result)
    return R.chat_completion(R.new_id("chatcmpl"), req.model, [{"index": 0, "message": message, "logprobs": None,
                                                              "finish_reason": finish}], usage, rsa=summary)


async def _final_pass(state, request, req, result: RSAResult, reply_for):
    chosen = _selected(result)
    prep = await run_in_threadpool(prepare_final, state, req, chosen.content or chosen.reasoning or chosen.text)
    sub = Submission(state, [(prep.ids, prep.params)], bypass_limit=True)
    choices = chat_choices(state, prep)
    reply = reply_for(prep, choices) if reply_for else R.ChatReply(req.model, choices, len(prep.ids))
    return await respond(request, sub, reply, Timing(state.metrics, request.url.path, time.monotonic()),
                         stream=req.stream, include_usage=bool(req.stream_options and req.stream_options.include_usage))


def _admit(state, req) -> RSAConfig:
    """The run's settings, or a 400 for what RSA cannot do, or a 429 when enough runs are going."""
    if req.n != 1:
        raise bad_request("rsa returns one answer: n must be 1", param="n")
    if req.logprobs:
        raise bad_request("rsa cannot return logprobs", param="logprobs")
    if len(state.rsa_running) >= state.config.max_rsa_runs:
        state.metrics.rejected.inc()
        raise ApiError(429, f"{state.config.max_rsa_runs} RSA runs are already in progress; retry later",
                       type="rate_limit_error", code="queue_full",
                       headers={"Retry-After": str(state.config.retry_after_s)})
    return rsa_config(state, req)


def _problem(state, req, cfg: RSAConfig) -> tuple[list[dict], RSAConfig]:
    """The request's messages as the run's problem, refused when the run cannot fit the context."""
    messages = chat_messages(req)
    for m in messages:
        if isinstance(m.get("content"), list):
            m["content"] = "".join(part["text"] for part in m["content"])
    render(state.llm, messages, None, cfg.enable_thinking, {})  # a message the template refuses is a 400 here
    try:
        cfg = fit_for_model(state.llm, messages, cfg, None, _explicit(req), max_context=state.max_context)
    except RSAError as exc:
        raise bad_request(f"rsa: {exc}{state.context_note}", param="rsa", code="context_length_exceeded") from None
    return messages, cfg


def _answer(result: RSAResult) -> tuple[dict, str, dict, dict]:
    """(message, finish reason, usage, rsa summary) of a finished run."""
    chosen = _selected(result)
    usage = R.usage(result.prompt_tokens, result.completion_tokens)
    message = {"role": "assistant", "content": chosen.content, "reasoning_content": chosen.reasoning or None}
    return message, chosen.finish_reason or "length", usage, result.to_dict()


def _selected(result) -> Candidate:
    if result.final is not None:
        return result.final.candidate
    if result.vote.winner_index is not None:
        return result.population[result.vote.winner_index].candidate
    stopped = [m.candidate for m in result.population if m.candidate.finish_reason == "stop"]
    return (stopped or [m.candidate for m in result.population])[0]


async def _chunks(state, req, task: asyncio.Task, progress: Progress, include_usage: bool):
    """The SSE body: progress comments while the run goes on, then the answer as chunks."""
    rid, created = R.new_id("chatcmpl"), int(time.time())
    async for comment in _progress_comments(task, progress, state.config.keepalive_s):
        yield comment
    try:
        result = task.result()
    except ApiError as exc:
        yield R.sse(exc.body())
        yield R.SSE_DONE
        return
    message, finish, usage, summary = _answer(result)
    delta = {k: v for k, v in message.items() if v is not None}
    yield R.sse(R.chat_chunk(rid, req.model, created, [{"index": 0, "delta": delta, "logprobs": None,
                                                         "finish_reason": None}]))
    yield R.sse(R.chat_chunk(rid, req.model, created, [{"index": 0, "delta": {}, "logprobs": None,
                                                         "finish_reason": finish}], rsa=summary))
    if include_usage:
        yield R.sse(R.chat_chunk(rid, req.model, created, [], usage=usage))
    yield R.SSE_DONE


async def _progress_comments(task: asyncio.Task, progress: Progress, keepalive_s: float):
    """While ``task`` runs: its latest progress at most once a second, else a keep-alive every
    ``keepalive_s`` (SSE comment lines, which clients ignore)."""
    sent_seq, last_sent = 0, time.monotonic()
    while not task.done():
        await asyncio.wait({task}, timeout=0.5)
        now = time.monotonic()
        if progress.seq != sent_seq and now - last_sent >= 1.0:
            sent_seq, last_sent = progress.seq, now
            yield b": rsa " + json.dumps(progress.state).encode() + b"\n\n"
        elif now - last_sent >= keepalive_s:
            last_sent = now
            yield R.SSE_KEEPALIVE
