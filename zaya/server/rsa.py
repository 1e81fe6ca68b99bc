"""Markovian RSA per request: ``"rsa": {...}`` in a chat completion body (the OpenAI client's
``extra_body={"rsa": {...}}``), in the format of Zyphra's RSA proxy.

The run goes through the server's own scheduler (`SchedulerBackend`), so its N candidates are
decoded in the same continuous batch as everyone else's requests. ``"rsa": true`` runs the default
profile; an object picks a ``profile`` and overrides any `RSAConfig` field. Zyphra's names are
accepted too: ``t`` (rounds *including* round 0, so ``t = rounds + 1``), ``tail_tokens`` (tau) and
``max_tokens`` (beta). Top-level ``temperature``, ``top_p``, ``top_k``, ``seed`` and ``max_tokens``
apply when the rsa object does not set them. Usage sums every token of every round; the response
carries an ``rsa`` summary (rounds, population, vote). A streaming client gets SSE comment lines
``: rsa {...progress...}`` (and keep-alives) while rounds run, then the answer as normal chunks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import queue
import threading
import time

from zaya.chat import generation_starts_in_reasoning, split_reasoning
from zaya.errors import ContextLengthError, ZayaError
from zaya.rsa import PROFILES, RSAConfig, RSAError, make_config, solve
from zaya.rsa.backends import Candidate, TokenTools, derive_seed
from zaya.rsa.config import DEFAULT_PROFILE
from zaya.sampling import MAX_N, SamplingParams
from zaya.server import responses as R
from zaya.server.app import ClientGone, watch_client
from zaya.server.prepare import chat_messages, render, template_kwargs
from zaya.server.protocol import ApiError, bad_request
from zaya.server.scheduler import DONE

MAX_ROUNDS = 16
_ALIASES = {"tail_tokens": "tail", "max_tokens": "budget"}
_FIELD_TYPES = {f.name: f.type for f in dataclasses.fields(RSAConfig)}


class Cancelled(RSAError):
    pass


class SchedulerBackend(TokenTools):
    """An RSA generator backend that decodes through the server's scheduler."""

    name = "zaya-server"
    drafts = True  # takes ``speculative`` (prompt-lookup drafting) per call

    def __init__(self, state, on_progress=None):
        self.state, self.llm, self.tokenizer = state, state.llm, state.llm.tokenizer
        self.cancelled = threading.Event()
        self.on_progress = on_progress
        self.round = -1

    def generate(self, messages_list, *, n, max_tokens, temperature, top_p, top_k, seed, enable_thinking=None,
                 batch_size=None, progress=None, speculative=None):
        self.round += 1
        sched = self.state.scheduler
        texts = [self.llm.render_chat(m, enable_thinking=enable_thinking) for m in messages_list]
        prompts = [self.tokenizer.encode(t, add_special_tokens=False) for t in texts]
        chunk = max(1, min(n, batch_size or sched.max_batch, sched.max_batch))
        inbox: queue.Queue = queue.Queue()
        jobs, out = [], {}
        start = time.perf_counter()
        total, finished, tokens = len(prompts) * n, 0, 0
        try:
            for p, ids in enumerate(prompts):
                for c, first in enumerate(range(0, n, chunk)):
                    params = SamplingParams.from_kwargs(max_new_tokens=max_tokens, temperature=temperature,
                                                        top_p=top_p, top_k=top_k, n=min(chunk, n - first),
                                                        seed=derive_seed(seed, p, c), speculative=speculative)
                    sched.check(len(ids), params)
                    j = len(jobs)
                    jobs.append((sched.submit(ids, params, lambda item, j=j: inbox.put((j, item)),
                                              bypass_limit=True), p, first))
            open_jobs = len(jobs)
            while open_jobs:
                try:
                    j, item = inbox.get(timeout=0.2)
                except queue.Empty:
                    item = None
                if self.cancelled.is_set():
                    raise Cancelled("the RSA run was cancelled")
                if item is None:
                    continue
                if item is DONE:
                    open_jobs -= 1
                    continue
                if isinstance(item, BaseException):
                    raise item
                _, p, first = jobs[j]
                new, done = 0, 0
                for ev in item:
                    rec = out.setdefault((p, first + ev.index), {"text": [], "tokens": 0, "finish": None})
                    rec["text"].append(ev.text)
                    rec["tokens"] += ev.token_id is not None
                    new += ev.token_id is not None
                    if ev.finish_reason:
                        rec["finish"], rec["seconds"] = ev.finish_reason, time.perf_counter() - start
                        done += 1
                tokens, finished = tokens + new, finished + done
                if progress:
                    progress(new, done)
                if self.on_progress:
                    self.on_progress({"round": self.round, "candidates": total, "finished": finished,
                                      "tokens": tokens})
        except BaseException:
            for job, _, _ in jobs:
                sched.cancel(job)
            raise
        result = []
        for p, text in enumerate(texts):
            thinking = generation_starts_in_reasoning(text)
            cands = []
            for s in range(n):
                rec = out[(p, s)]
                whole = "".join(rec["text"])
                reasoning, content = split_reasoning(whole, thinking)
                cands.append(Candidate(whole, reasoning or "", content, rec["finish"], len(prompts[p]),
                                       rec["tokens"], rec.get("seconds", 0.0)))
            result.append(cands)
        return result


def rsa_config(req) -> RSAConfig:
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
    if thinking is not None:
        spec.setdefault("enable_thinking", thinking)
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


def _selected(result) -> Candidate:
    if result.final is not None:
        return result.final.candidate
    if result.vote.winner_index is not None:
        return result.population[result.vote.winner_index].candidate
    stopped = [m.candidate for m in result.population if m.candidate.finish_reason == "stop"]
    return (stopped or [m.candidate for m in result.population])[0]


async def rsa_chat(state, request, req):
    if req.n != 1:
        raise bad_request("rsa returns one answer: n must be 1", param="n")
    if req.tools:
        raise bad_request("rsa cannot be combined with tools", param="tools")
    if req.logprobs:
        raise bad_request("rsa cannot return logprobs", param="logprobs")
    if len(state.rsa_running) >= state.config.max_rsa_runs:
        state.metrics.rejected.inc()
        raise ApiError(429, f"{state.config.max_rsa_runs} RSA runs are already in progress; retry later",
                       type="rate_limit_error", code="queue_full",
                       headers={"Retry-After": str(state.config.retry_after_s)})
    cfg = rsa_config(req)
    messages = chat_messages(req)
    for m in messages:
        if isinstance(m.get("content"), list):
            m["content"] = "".join(part["text"] for part in m["content"])
    prompt = render(state.llm, messages, None, cfg.enable_thinking, {})
    prompt_len = len(state.llm.tokenizer.encode(prompt, add_special_tokens=False))
    need = prompt_len + cfg.budget + (min(cfg.k, cfg.n) * cfg.tail_limit if cfg.rounds else 0)
    if need > state.max_context:
        raise bad_request(f"this RSA setting needs about {need} tokens of context (prompt {prompt_len} + tails "
                          f"K*tau + budget {cfg.budget}) but the server allows {state.max_context}; lower budget "
                          f"or tail", param="rsa", code="context_length_exceeded")

    progress = {"state": None, "seq": 0}

    def on_progress(p):
        progress["state"], progress["seq"] = p, progress["seq"] + 1

    backend = SchedulerBackend(state, on_progress)
    state.rsa_running.add(backend.cancelled.set)
    state.metrics.rsa_runs.inc()
    loop = asyncio.get_running_loop()
    future = loop.run_in_executor(state.rsa_pool, lambda: solve(backend, messages, profile=cfg, progress=False))
    rid, created = R.new_id("chatcmpl"), int(time.time())

    def release():
        backend.cancelled.set()
        state.rsa_running.discard(backend.cancelled.set)

    def response_parts(result):
        chosen = _selected(result)
        usage = R.usage(result.prompt_tokens, result.completion_tokens)
        message = {"role": "assistant", "content": chosen.content,
                   "reasoning_content": chosen.reasoning or None}
        return message, chosen.finish_reason or "length", usage, result.to_dict()

    if not req.stream:
        try:
            result = await watch_client(request, _wait(future), release)
        except ClientGone:
            from fastapi.responses import Response

            return Response(status_code=499)
        except BaseException as exc:
            raise _rsa_error(exc) from None
        finally:
            release()
        message, finish, usage, summary = response_parts(result)
        return R.chat_completion(rid, req.model, [{"index": 0, "message": message, "logprobs": None,
                                                   "finish_reason": finish}], usage, rsa=summary)

    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    async def stream():
        sent_seq, last_sent = 0, time.monotonic()
        try:
            while not future.done():
                await asyncio.wait({future}, timeout=0.5)
                now = time.monotonic()
                if progress["seq"] != sent_seq and now - last_sent >= 1.0:
                    sent_seq, last_sent = progress["seq"], now
                    yield b": rsa " + json.dumps(progress["state"]).encode() + b"\n\n"
                elif now - last_sent >= state.config.keepalive_s:
                    last_sent = now
                    yield R.SSE_KEEPALIVE
            try:
                result = future.result()
            except BaseException as exc:
                yield R.sse(_rsa_error(exc).body())
                yield R.SSE_DONE
                return
            message, finish, usage, summary = response_parts(result)
            delta = {k: v for k, v in message.items() if v is not None}
            yield R.sse(R.chat_chunk(rid, req.model, created, [{"index": 0, "delta": delta, "logprobs": None,
                                                                 "finish_reason": None}]))
            yield R.sse(R.chat_chunk(rid, req.model, created, [{"index": 0, "delta": {}, "logprobs": None,
                                                                 "finish_reason": finish}], rsa=summary))
            if include_usage:
                yield R.sse(R.chat_chunk(rid, req.model, created, [], usage=usage))
            yield R.SSE_DONE
        finally:
            release()

    from zaya.server.app import _sse_response

    return _sse_response(stream(), release)


async def _wait(future):
    return await future


def _rsa_error(exc: BaseException) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ContextLengthError):
        return bad_request(f"RSA: {exc}; lower rsa budget or tail", param="rsa", code="context_length_exceeded")
    if isinstance(exc, ZayaError):
        return bad_request(f"RSA: {exc}", param="rsa")
    return ApiError(500, f"the RSA run failed ({type(exc).__name__}); see the server log", type="server_error")
