"""From prepared prompts to an HTTP answer through the scheduler.

`Submission` is the scheduler jobs of one HTTP request; their events arrive on one asyncio queue
(the scheduler thread resolves it through each job's ``deliver`` callback), so a route awaits
them without threads or polling. `respond` is the one stream/collect skeleton of the token
routes: given a submission and a `responses.Reply`, it streams SSE chunks or returns the whole
response, records time to first token and latency, and cancels the jobs of a client that left.
"""

from __future__ import annotations

import asyncio
import time

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from zaya.server import responses as R
from zaya.server.http import api_error, sse_response, watch_client
from zaya.server.prepare import ChatPrep, prepare_chat
from zaya.server.protocol import ApiError, ChatCompletionRequest
from zaya.server.scheduler import DONE, QueueFull, ShuttingDown


class Submission:
    """The scheduler jobs of one HTTP request, whose events arrive on one asyncio queue.

    ``items`` are (prompt ids, SamplingParams) pairs, one job each. ``bypass_limit`` admits the
    jobs past the queue bound (an RSA run already counted against its own limit); ``rsa`` words
    job errors for an RSA request.
    """

    def __init__(self, state, items, *, bypass_limit: bool = False, rsa: bool = False):
        self.state, self.queue, self.jobs, self.rsa = state, asyncio.Queue(), [], rsa
        loop = asyncio.get_running_loop()
        try:
            for i, (ids, params) in enumerate(items):
                def deliver(item, i=i):
                    loop.call_soon_threadsafe(self.queue.put_nowait, (i, item))
                self.jobs.append(state.scheduler.submit(ids, params, deliver, bypass_limit=bypass_limit))
        except QueueFull as exc:
            self.cancel()
            state.metrics.rejected.inc()
            raise ApiError(429, str(exc), type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(state.config.retry_after_s)}) from None
        except ShuttingDown as exc:
            self.cancel()
            raise api_error(exc) from None
        self.open = len(self.jobs)

    async def events(self):
        """Yields (job index, TokenEvent) until every job is done; a job's error is raised as an
        `ApiError`."""
        while self.open:
            i, item = await self.queue.get()
            if item is DONE:
                self.open -= 1
            elif isinstance(item, BaseException):
                self.open -= 1
                raise api_error(item, rsa=self.rsa)
            else:
                for ev in item:
                    yield i, ev

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens its jobs took from the prefix cache (known once their prefill started)."""
        return sum(job.request.cached_tokens or 0 for job in self.jobs)

    def cancel(self) -> None:
        for job in self.jobs:
            self.state.scheduler.cancel(job)


async def start_chat(state, req: ChatCompletionRequest) -> tuple[ChatPrep, Submission]:
    """Prepare a chat request (in a worker thread) and submit it: what every chat-shaped route
    (chat completions, Responses, Messages) does before `respond`."""
    prep = await run_in_threadpool(prepare_chat, state, req)
    state.metrics.prompt_tokens.inc(len(prep.ids))
    return prep, Submission(state, [(prep.ids, prep.params)])


def chat_choices(state, prep: ChatPrep, logprobs: bool = False) -> list[R.ChatChoice]:
    return [R.ChatChoice(i, prep.starts_in_reasoning, prep.tools, prep.parse_tools, state.token_text, logprobs)
            for i in range(prep.params.n)]


class Timing:
    """Time to first token and request latency, per route."""

    def __init__(self, metrics, route: str, arrived: float):
        self.metrics, self.route, self.arrived, self.first = metrics, route, arrived, None

    def token(self):
        if self.first is None:
            self.first = time.monotonic()
            self.metrics.ttft.observe(self.first - self.arrived, self.route)

    def done(self):
        self.metrics.latency.observe(time.monotonic() - self.arrived, self.route)


async def respond(request: Request, sub: Submission, reply: R.Reply, timing: Timing, *, stream: bool,
                  include_usage: bool = False):
    """The answer of a token route: SSE chunks when ``stream``, else the whole response (a
    client that leaves first has its jobs cancelled and gets 499)."""
    if stream:
        return sse_response(_chunks(sub, reply, timing, include_usage), sub.cancel)
    await watch_client(request, _collect(sub, reply, timing), sub.cancel)
    return reply.body()


async def _collect(sub: Submission, reply: R.Reply, timing: Timing) -> None:
    async for job, ev in sub.events():
        timing.token()
        reply.feed(job, ev)
    reply.cached_tokens = sub.cached_tokens
    timing.done()


async def _chunks(sub: Submission, reply: R.Reply, timing: Timing, include_usage: bool):
    try:
        for data in reply.stream_open(include_usage):
            yield data
        async for job, ev in sub.events():
            timing.token()
            for data in reply.stream_feed(job, ev, include_usage):
                yield data
        reply.cached_tokens = sub.cached_tokens
        for data in reply.stream_close(include_usage):
            yield data
        timing.done()
    except ApiError as exc:
        for data in reply.stream_error(exc):
            yield data
