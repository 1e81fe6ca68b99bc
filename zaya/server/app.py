"""The OpenAI-compatible HTTP front (FastAPI): routes, auth, limits, errors.

    POST /v1/chat/completions   chat, reasoning split, tool calls, logprobs, n, SSE; RSA via "rsa"
    POST /v1/completions        raw text or token ids
    GET  /v1/models, /health, /metrics

Bodies are read by hand (size-limited, then validated strictly by `protocol`), so every bad
input becomes a 4xx with OpenAI's error JSON; only a server fault can give a 5xx. Generation
goes through the one `Scheduler`; a client that disconnects has its jobs cancelled.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from zaya.errors import ZayaError
from zaya.sampling import MAX_N
from zaya.server import responses as R
from zaya.server.metrics import Metrics
from zaya.server.prepare import prepare_chat, prepare_completion
from zaya.server.protocol import ApiError, ChatCompletionRequest, CompletionRequest, bad_request, error_body, parse
from zaya.server.scheduler import DONE, QueueFull, Scheduler, ShuttingDown

log = logging.getLogger("zaya.server")
ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")


@dataclass
class ServerConfig:
    model_name: str = "zaya"
    aliases: tuple[str, ...] = ()         # other names accepted in the "model" field
    api_key: str | None = None
    max_batch: int = 16                   # rows (sequences) decoded together
    max_queue: int = 64                   # requests waiting for a slot before 429
    max_body_bytes: int = 4 << 20
    max_prompts: int = 32                 # prompts per /v1/completions request
    max_rsa_runs: int = 2                 # concurrent Markovian RSA requests
    keepalive_s: float = 10.0             # SSE keep-alive interval while RSA runs
    retry_after_s: int = 2
    speculative: int = 0                  # longest prompt-lookup draft for requests that do not say; 0 off


class State:
    def __init__(self, llm, config: ServerConfig, engine_factory=None):
        self.llm, self.config = llm, config
        self.metrics = Metrics()
        factory = engine_factory or (lambda: llm.engine(speculative=config.speculative))
        self.scheduler = Scheduler(factory, max_batch=config.max_batch, max_queue=config.max_queue,
                                   metrics=self.metrics)
        self.max_context = self.scheduler.engine.max_context
        self.max_n = min(MAX_N, config.max_batch)
        self.model_names = {config.model_name, *config.aliases}
        self.token_text = R.TokenText(llm.tokenizer)
        self.rsa_pool = ThreadPoolExecutor(max(1, config.max_rsa_runs), thread_name_prefix="zaya-rsa")
        self.rsa_running: set = set()
        self.started = int(time.time())
        m = self.metrics
        m.gauge("zaya_queue_depth", "Requests waiting for a decode slot.", lambda: self.scheduler.queue_depth)
        m.gauge("zaya_batch_size", "Sequences (rows) being decoded now.", lambda: self.scheduler.active_rows)
        m.gauge("zaya_running_requests", "Requests being decoded now.", lambda: self.scheduler.active_requests)
        m.gauge("zaya_rsa_running", "Markovian RSA runs in progress.", lambda: len(self.rsa_running))
        m.gauge("zaya_spec_draft_tokens", "Prompt-lookup draft tokens verified (cumulative).",
                lambda: self._spec("drafted"))
        m.gauge("zaya_spec_accepted_tokens", "Draft tokens accepted (cumulative).", lambda: self._spec("accepted"))
        m.gauge("zaya_decode_row_forwards", "Rows in decode or verify forwards (cumulative).",
                lambda: self._spec("row_forwards"))
        m.gauge("zaya_decode_tokens", "Tokens those row-forwards produced (cumulative); over "
                "zaya_decode_row_forwards: tokens per forward.", lambda: self._spec("tokens"))

    def _spec(self, field: str) -> int:
        stats = getattr(self.scheduler.engine, "spec_stats", None)
        return getattr(stats, field, 0)

    def check_model(self, name: str) -> None:
        if name not in self.model_names:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves {self.config.model_name!r}",
                           param="model", code="model_not_found")


class Submission:
    """The scheduler jobs of one HTTP request, whose events arrive on one asyncio queue."""

    def __init__(self, state: State, items):
        self.state, self.queue, self.jobs = state, asyncio.Queue(), []
        loop = asyncio.get_running_loop()
        try:
            for i, (ids, params) in enumerate(items):
                def deliver(item, i=i):
                    loop.call_soon_threadsafe(self.queue.put_nowait, (i, item))
                self.jobs.append(state.scheduler.submit(ids, params, deliver))
        except QueueFull as exc:
            self.cancel()
            state.metrics.rejected.inc()
            raise ApiError(429, str(exc), type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(state.config.retry_after_s)}) from None
        except ShuttingDown as exc:
            self.cancel()
            raise ApiError(503, str(exc), type="server_error") from None
        self.open = len(self.jobs)

    async def events(self):
        """Yields (job index, TokenEvent) until every job is done; a job's error is raised."""
        while self.open:
            i, item = await self.queue.get()
            if item is DONE:
                self.open -= 1
            elif isinstance(item, BaseException):
                self.open -= 1
                raise _as_api_error(item)
            else:
                for ev in item:
                    yield i, ev

    def cancel(self) -> None:
        for job in self.jobs:
            self.state.scheduler.cancel(job)


def _as_api_error(exc: BaseException) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ShuttingDown):
        return ApiError(503, str(exc), type="server_error")
    if isinstance(exc, ZayaError):
        code = "context_length_exceeded" if "context" in str(exc) else None
        return bad_request(str(exc), code=code)
    log.error("generation failed: %r", exc)
    return ApiError(500, "the server failed while generating; see its log", type="server_error")


class ClientGone(Exception):
    pass


async def _until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def watch_client(request: Request, work, on_gone):
    """Await `work` (a coroutine); if the client disconnects first, cancel it, call on_gone, raise."""
    task, watcher = asyncio.ensure_future(work), asyncio.ensure_future(_until_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        on_gone()
        raise ClientGone()
    finally:
        watcher.cancel()


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise bad_request("invalid Content-Length header")
        if int(declared) > limit:
            raise ApiError(413, f"the request body is larger than this server's limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the request body is larger than this server's limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


class Guard:
    """Pure ASGI middleware: the API key (constant-time) on every route but /health, and the
    per-route request counter."""

    def __init__(self, app, state: State):
        self.app, self.state = app, state
        self.key = state.config.api_key.encode() if state.config.api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        route = path if path in ROUTES else "other"
        status = {"code": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            if self.key is not None and path != "/health" and not self._authorized(scope):
                body = error_body("invalid or missing API key (send 'Authorization: Bearer KEY')", code="invalid_api_key")
                response = JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send_wrapper)
            await self.app(scope, receive, send_wrapper)
        finally:
            self.state.metrics.requests.inc(1, route, status["code"])

    def _authorized(self, scope) -> bool:
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)
        return False


def create_app(llm, config: ServerConfig | None = None, *, engine_factory=None) -> FastAPI:
    config = config or ServerConfig()
    state = State(llm, config, engine_factory)

    @asynccontextmanager
    async def lifespan(app):
        state.scheduler.start()
        log.info("serving %s (context %d, max batch %d, queue %d)", config.model_name, state.max_context,
                 config.max_batch, config.max_queue)
        try:
            yield
        finally:
            for cancel in list(state.rsa_running):
                cancel()
            state.scheduler.stop()
            state.rsa_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="zaya", version="0.1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.zaya = state

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else str(exc.detail)
        return JSONResponse(error_body(message, kind), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def server_error(request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse(error_body("internal server error", "server_error"), status_code=500)

    @app.get("/health")
    async def health():
        s = state.scheduler
        return {"status": "ok", "model": config.model_name, "queue_depth": s.queue_depth,
                "running_requests": s.active_requests, "active_sequences": s.active_rows,
                "rsa_running": len(state.rsa_running)}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": state.started,
                                            "owned_by": "zaya", "max_model_len": state.max_context}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        arrived = time.monotonic()
        req = parse(ChatCompletionRequest, await read_body(request, config.max_body_bytes))
        state.check_model(req.model)
        if req.rsa:
            from zaya.server.rsa import rsa_chat

            return await rsa_chat(state, request, req)
        prep = await run_in_threadpool(prepare_chat, state, req)
        state.metrics.prompt_tokens.inc(len(prep.ids))
        sub = Submission(state, [(prep.ids, prep.params)])
        n, lp = prep.params.n, prep.params.logprobs
        choices = [R.ChatChoice(i, prep.starts_in_reasoning, prep.tools, prep.parse_tools, state.token_text, lp)
                   for i in range(n)]
        rid, created, route = R.new_id("chatcmpl"), int(time.time()), "/v1/chat/completions"
        timing = _Timing(state, route, arrived)

        def finish_usage():
            return R.usage(len(prep.ids), sum(c.tokens for c in choices))

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            async def stream():
                try:
                    first = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None} for i in range(n)]
                    yield R.sse(R.chat_chunk(rid, req.model, created, first, **_usage_null(include_usage)))
                    async for _, ev in sub.events():
                        timing.token()
                        choice = choices[ev.index].feed(ev)
                        if choice is not None:
                            yield R.sse(R.chat_chunk(rid, req.model, created, [choice], **_usage_null(include_usage)))
                    if include_usage:
                        yield R.sse(R.chat_chunk(rid, req.model, created, [], usage=finish_usage()))
                    timing.done()
                except ApiError as exc:
                    yield R.sse(exc.body())
                yield R.SSE_DONE
            return _sse_response(stream(), sub.cancel)

        async def collect():
            async for _, ev in sub.events():
                timing.token()
                choices[ev.index].feed(ev)

        try:
            await watch_client(request, collect(), sub.cancel)
        except ClientGone:
            return Response(status_code=499)
        timing.done()
        return R.chat_completion(rid, req.model, [c.message() for c in choices], finish_usage())

    @app.post("/v1/completions")
    async def completions(request: Request):
        arrived = time.monotonic()
        req = parse(CompletionRequest, await read_body(request, config.max_body_bytes))
        state.check_model(req.model)
        if req.rsa:
            raise bad_request("Markovian RSA ('rsa') is available on /v1/chat/completions only", param="rsa")
        prep = await run_in_threadpool(prepare_completion, state, req)
        state.metrics.prompt_tokens.inc(sum(len(ids) for ids, _ in prep.items))
        sub = Submission(state, prep.items)
        n = req.n
        choices = [R.TextChoice(i, state.token_text, prep.logprobs) for i in range(len(prep.items) * n)]
        rid, created, route = R.new_id("cmpl"), int(time.time()), "/v1/completions"
        timing = _Timing(state, route, arrived)
        prompt_tokens = sum(len(ids) for ids, _ in prep.items)

        def finish_usage():
            return R.usage(prompt_tokens, sum(c.tokens for c in choices))

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            async def stream():
                try:
                    async for job, ev in sub.events():
                        timing.token()
                        choice = choices[job * n + ev.index].feed(ev)
                        if choice is not None:
                            yield R.sse(R.text_completion(rid, req.model, [choice], None, created)
                                        | _usage_null(include_usage))
                    if include_usage:
                        yield R.sse(R.text_completion(rid, req.model, [], finish_usage(), created))
                    timing.done()
                except ApiError as exc:
                    yield R.sse(exc.body())
                yield R.SSE_DONE
            return _sse_response(stream(), sub.cancel)

        async def collect():
            async for job, ev in sub.events():
                timing.token()
                choices[job * n + ev.index].feed(ev)

        try:
            await watch_client(request, collect(), sub.cancel)
        except ClientGone:
            return Response(status_code=499)
        timing.done()
        return R.text_completion(rid, req.model, [c.choice() for c in choices], finish_usage(), created)

    app.add_middleware(Guard, state=state)
    return app


def _usage_null(include_usage: bool) -> dict:
    return {"usage": None} if include_usage else {}


def _sse_response(body, on_close) -> StreamingResponse:
    async def guarded():
        try:
            async for chunk in body:
                yield chunk
        finally:  # normal end, client disconnect (cancellation) or server shutdown
            on_close()

    return StreamingResponse(guarded(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class _Timing:
    def __init__(self, state: State, route: str, arrived: float):
        self.metrics, self.route, self.arrived, self.first = state.metrics, route, arrived, None

    def token(self):
        if self.first is None:
            self.first = time.monotonic()
            self.metrics.ttft.observe(self.first - self.arrived, self.route)

    def done(self):
        self.metrics.latency.observe(time.monotonic() - self.arrived, self.route)
