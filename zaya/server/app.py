"""The OpenAI-compatible HTTP front (FastAPI): its routes and the app that serves them.

    POST /v1/chat/completions   chat, reasoning split, tool calls, logprobs, n, SSE; RSA via "rsa"
    POST /v1/completions        raw text or token ids
    GET  /v1/models, /health, /metrics

Bodies are read by hand (size-limited, then validated strictly by `protocol`), so every bad
input becomes a 4xx with OpenAI's error JSON; only a server fault can give a 5xx. Generation
goes through the one `Scheduler`; a client that disconnects has its jobs cancelled.

A route is an ``async def handler(request)`` that finds the server's `State` on
``request.app.state.zaya`` and is listed in `ROUTES`. A token route prepares its prompts
(`prepare`), submits them (`generation.Submission`) and hands the submission with a
`responses.Reply` to `generation.respond`, which streams or collects; errors are raised as
`ApiError` (or mapped by `http.api_error`) and leave as OpenAI's error JSON.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse
from starlette.concurrency import run_in_threadpool

from zaya.sampling import MAX_N
from zaya.server import responses as R
from zaya.server.generation import Submission, Timing, chat_choices, respond, start_chat
from zaya.server.http import Guard, install_error_handlers, read_body
from zaya.server import anthropic
from zaya.server.anthropic import MessagesReply, MessagesRequest
from zaya.server.metrics import Metrics
from zaya.server.openai_responses import ResponsesReply, ResponsesRequest, to_chat
from zaya.server.prepare import chat_messages, prepare_completion, render, template_kwargs
from zaya.server.protocol import (ApiError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                  TokenizeRequest, bad_request, parse)
from zaya.server.rsa import rsa_chat
from zaya.server.scheduler import Scheduler

log = logging.getLogger("zaya.server")


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
    thinking_budget: int | None = None    # reasoning tokens before </think> is forced (None: no limit)
    retry_after_s: int = 2
    step_tokens: int = 512                # per engine step: decode rows plus prefill chunks
    speculative: int = 0                  # longest prompt-lookup draft for requests that do not say; 0 off


class State:
    """What the routes share: the model, the scheduler, the metrics, the running RSA runs."""

    def __init__(self, llm, config: ServerConfig, engine_factory=None):
        self.llm, self.config = llm, config
        self.metrics = Metrics()
        factory = engine_factory or (lambda: llm.engine(step_tokens=config.step_tokens,
                                                        speculative=config.speculative))
        self.scheduler = Scheduler(factory, max_batch=config.max_batch, max_queue=config.max_queue,
                                   metrics=self.metrics)
        engine = self.scheduler.engine
        self.max_context = engine.max_context
        self.cache = getattr(engine, "cache", None)  # the LLM's pool, shared by every engine it makes
        self.context_note = ""  # why the context is shorter than the model's, for error messages
        if self.cache is not None and engine.max_context < engine.context_limit:
            self.context_note = (f" (the KV cache budget of {self.cache.memory / 2**20:,.1f} MiB holds "
                                 f"{self.cache.capacity_tokens:,} tokens; raise --cache-memory for more)")
        self.max_n = min(MAX_N, config.max_batch)
        self.model_names = {config.model_name, *config.aliases}
        self.token_text = R.TokenText(llm.tokenizer)
        self.rsa_running: set = set()  # asyncio tasks
        self.started = int(time.time())
        m = self.metrics
        m.gauge("zaya_queue_depth", "Requests waiting for a decode slot.", lambda: self.scheduler.queue_depth)
        m.gauge("zaya_batch_size", "Sequences (rows) being decoded now.", lambda: self.scheduler.active_rows)
        m.gauge("zaya_running_requests", "Requests being decoded now.", lambda: self.scheduler.active_requests)
        m.gauge("zaya_rsa_running", "Markovian RSA runs in progress.", lambda: len(self.rsa_running))
        if self.cache is not None:
            m.cache_gauges(self.cache)
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

    @asynccontextmanager
    async def lifespan(self, app):
        self.scheduler.start()
        log.info("serving %s (context %d, max batch %d, queue %d)", self.config.model_name, self.max_context,
                 self.config.max_batch, self.config.max_queue)
        try:
            yield
        finally:
            self.scheduler.stop()  # fails every job still open with ShuttingDown
            for task in list(self.rsa_running):
                task.cancel()


async def read_request(request: Request, kind):
    """The validated body of ``request`` as ``kind``, for a model this server serves."""
    state = request.app.state.zaya
    req = parse(kind, await read_body(request, state.config.max_body_bytes))
    state.check_model(req.model)
    return req


# -- routes -------------------------------------------------------------------------------------
async def health(request: Request):
    state = request.app.state.zaya
    s = state.scheduler
    return {"status": "ok", "model": state.config.model_name, "queue_depth": s.queue_depth,
            "running_requests": s.active_requests, "active_sequences": s.active_rows,
            "rsa_running": len(state.rsa_running)}


async def metrics(request: Request):
    return PlainTextResponse(request.app.state.zaya.metrics.render(), media_type="text/plain; version=0.0.4")


async def models(request: Request):
    state = request.app.state.zaya
    return {"object": "list", "data": [{"id": state.config.model_name, "object": "model", "created": state.started,
                                        "owned_by": "zaya", "max_model_len": state.max_context}]}


async def chat_completions(request: Request):
    arrived, state = time.monotonic(), request.app.state.zaya
    req = await read_request(request, ChatCompletionRequest)
    if req.rsa:
        return await rsa_chat(state, request, req)
    prep, sub = await start_chat(state, req)
    choices = chat_choices(state, prep, prep.params.logprobs)
    return await respond(request, sub, R.ChatReply(req.model, choices, len(prep.ids)),
                         Timing(state.metrics, "/v1/chat/completions", arrived), stream=req.stream,
                         include_usage=bool(req.stream_options and req.stream_options.include_usage))


async def completions(request: Request):
    arrived, state = time.monotonic(), request.app.state.zaya
    req = await read_request(request, CompletionRequest)
    if req.rsa:
        raise bad_request("Markovian RSA ('rsa') is available on /v1/chat/completions only", param="rsa")
    prep = await run_in_threadpool(prepare_completion, state, req)
    prompt_tokens = sum(len(ids) for ids, _ in prep.items)
    state.metrics.prompt_tokens.inc(prompt_tokens)
    sub = Submission(state, prep.items)
    choices = [R.TextChoice(i, state.token_text, prep.logprobs) for i in range(len(prep.items) * req.n)]
    return await respond(request, sub, R.TextReply(req.model, choices, prompt_tokens, per_job=req.n),
                         Timing(state.metrics, "/v1/completions", arrived), stream=req.stream,
                         include_usage=bool(req.stream_options and req.stream_options.include_usage))


async def tokenize(request: Request):
    """vLLM's /tokenize: ``prompt`` (special tokens added unless ``add_special_tokens`` is false) or
    chat ``messages`` (rendered with the template, encoded without adding any)."""
    state = request.app.state.zaya
    req = parse(TokenizeRequest, await read_body(request, state.config.max_body_bytes))
    if req.model is not None:
        state.check_model(req.model)
    tok = state.llm.tokenizer
    if tok is None:
        raise bad_request("this model has no tokenizer")
    if (req.prompt is None) == (req.messages is None):
        raise bad_request("send either 'prompt' or 'messages'", param="prompt")
    if req.messages is not None:
        chat = ChatCompletionRequest(model=state.config.model_name, messages=req.messages, tools=req.tools,
                                     chat_template_kwargs=req.chat_template_kwargs)
        thinking, kwargs = template_kwargs(chat)
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
        text = await run_in_threadpool(render, state.llm, chat_messages(chat), tools, thinking,
                                       {**kwargs, "add_generation_prompt": req.add_generation_prompt})
        special = bool(req.add_special_tokens)
    else:
        text, special = req.prompt, req.add_special_tokens is not False
    ids = await run_in_threadpool(tok.encode, text, special)
    return {"count": len(ids), "max_model_len": state.max_context, "tokens": ids,
            "token_strs": [tok.id_to_token(i) for i in ids] if req.return_token_strs else None}


async def detokenize(request: Request):
    state = request.app.state.zaya
    req = parse(DetokenizeRequest, await read_body(request, state.config.max_body_bytes))
    if req.model is not None:
        state.check_model(req.model)
    vocab = state.llm.config.vocab_size
    if state.llm.tokenizer is None:
        raise bad_request("this model has no tokenizer")
    if any(not 0 <= t < vocab for t in req.tokens):
        raise bad_request(f"token ids must be in [0, {vocab})", param="tokens")
    return {"prompt": state.llm.tokenizer.decode(req.tokens)}


async def responses_api(request: Request):
    arrived, state = time.monotonic(), request.app.state.zaya
    req = await read_request(request, ResponsesRequest)
    chat = to_chat(req)
    if chat.rsa:
        return await rsa_chat(state, request, chat, lambda prep, choices: ResponsesReply(req, chat, choices[0],
                                                                                        len(prep.ids)))
    prep, sub = await start_chat(state, chat)
    reply = ResponsesReply(req, chat, chat_choices(state, prep)[0], len(prep.ids))
    return await respond(request, sub, reply, Timing(state.metrics, "/v1/responses", arrived), stream=req.stream)


async def messages_api(request: Request):
    arrived, state = time.monotonic(), request.app.state.zaya
    req = await read_request(request, MessagesRequest)
    chat = anthropic.to_chat(req)
    if chat.rsa:
        return await rsa_chat(state, request, chat, lambda prep, choices: MessagesReply(
            req, choices[0], len(prep.ids), state.llm.tokenizer))
    prep, sub = await start_chat(state, chat)
    reply = MessagesReply(req, chat_choices(state, prep)[0], len(prep.ids), state.llm.tokenizer)
    return await respond(request, sub, reply, Timing(state.metrics, "/v1/messages", arrived), stream=req.stream)


async def count_tokens(request: Request):
    """Anthropic's /v1/messages/count_tokens: the prompt's tokens as the template renders it."""
    state = request.app.state.zaya
    body = json.loads(await read_body(request, state.config.max_body_bytes) or b"null")
    if isinstance(body, dict):
        body.setdefault("max_tokens", 1)
    req = parse(MessagesRequest, json.dumps(body).encode())
    state.check_model(req.model)
    chat = anthropic.to_chat(req)
    thinking, kwargs = template_kwargs(chat)
    tools = [t.model_dump(exclude_none=True) for t in chat.tools] if chat.tools else None
    text = await run_in_threadpool(render, state.llm, chat_messages(chat), tools, thinking, kwargs)
    return {"input_tokens": len(state.llm.tokenizer.encode(text, add_special_tokens=False))}


# path -> (HTTP method, handler); the request counter labels requests by these paths
ROUTES = {
    "/v1/chat/completions": ("POST", chat_completions),
    "/v1/completions": ("POST", completions),
    "/v1/responses": ("POST", responses_api),
    "/v1/messages": ("POST", messages_api),
    "/v1/messages/count_tokens": ("POST", count_tokens),
    "/v1/models": ("GET", models),
    "/tokenize": ("POST", tokenize),
    "/detokenize": ("POST", detokenize),
    "/health": ("GET", health),
    "/metrics": ("GET", metrics),
}

# routes whose API has its own error JSON (OpenAI's everywhere else)
ERROR_SHAPES = {"/v1/messages": anthropic.error_shape, "/v1/messages/count_tokens": anthropic.error_shape}


def create_app(llm, config: ServerConfig | None = None, *, engine_factory=None) -> FastAPI:
    """The server for ``llm``; ``engine_factory`` replaces ``llm.engine`` (tests script engines)."""
    state = State(llm, config or ServerConfig(), engine_factory)
    app = FastAPI(title="zaya", version="0.1", lifespan=state.lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.zaya = state
    install_error_handlers(app, ERROR_SHAPES)
    for path, (method, handler) in ROUTES.items():
        app.add_api_route(path, handler, methods=[method])
    app.add_middleware(Guard, api_key=state.config.api_key, metrics=state.metrics, routes=ROUTES,
                       shapes=ERROR_SHAPES)
    return app
