"""HTTP plumbing shared by every route: bodies, errors, SSE, client disconnects, the API key.

Nothing here knows a route. `api_error` is the one place an exception becomes OpenAI's error
JSON; `install_error_handlers` makes FastAPI answer with it (and with 499 for a client that left);
`Guard` checks the API key and counts requests per route. A route whose API has its own error
JSON (Anthropic's) names a function in ``shapes`` (path -> ``ApiError -> dict``), which both use.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from typing import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from zaya.errors import ContextLengthError, ZayaError
from zaya.server.protocol import ApiError, bad_request
from zaya.server.scheduler import ShuttingDown

log = logging.getLogger("zaya.server")


def api_error(exc: BaseException, *, rsa: bool = False) -> ApiError:
    """The API error for an exception raised while serving a request.

    Errors of the request (`ZayaError`) are 400s, with OpenAI's ``context_length_exceeded`` code
    when the context is what ran out; shutdown is a 503; anything else is a server fault (500,
    logged). With ``rsa`` the message and ``param`` point at the request's ``rsa`` settings.
    """
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ShuttingDown):
        return ApiError(503, str(exc), type="server_error")
    if isinstance(exc, ZayaError):
        context = isinstance(exc, ContextLengthError) or "context" in str(exc)
        code = "context_length_exceeded" if context else None
        if rsa:
            hint = "; lower rsa budget or tail" if context else ""
            return bad_request(f"RSA: {exc}{hint}", param="rsa", code=code)
        return bad_request(str(exc), code=code)
    log.error("%s failed: %r", "an RSA run" if rsa else "generation", exc)
    if rsa:
        return ApiError(500, f"the RSA run failed ({type(exc).__name__}); see the server log",
                        type="server_error")
    return ApiError(500, "the server failed while generating; see its log", type="server_error")


class ClientGone(Exception):
    """The client disconnected before its answer was ready (answered with 499)."""


def error_response(exc: ApiError, path: str, shapes: dict) -> JSONResponse:
    """``exc`` as the JSON error of the API at ``path`` (OpenAI's unless ``shapes`` names another)."""
    shape = shapes.get(path)
    return JSONResponse(shape(exc) if shape else exc.body(), status_code=exc.status, headers=exc.headers)


def install_error_handlers(app: FastAPI, shapes: dict | None = None) -> None:
    """Every error leaves as its API's error JSON (OpenAI's unless ``shapes`` says otherwise); a
    client that left gets 499."""
    shapes = shapes or {}

    @app.exception_handler(ApiError)
    async def api(request, exc: ApiError):
        return error_response(exc, request.url.path, shapes)

    @app.exception_handler(ClientGone)
    async def gone(request, exc: ClientGone):
        return Response(status_code=499)

    @app.exception_handler(StarletteHTTPException)
    async def http(request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = (f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405)
                   else str(exc.detail))
        return error_response(ApiError(exc.status_code, message, type=kind), request.url.path, shapes)

    @app.exception_handler(Exception)
    async def server(request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return error_response(ApiError(500, "internal server error", type="server_error"), request.url.path,
                              shapes)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes."""
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


async def _until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def watch_client(request: Request, work, on_gone: Callable[[], None]):
    """Await `work` (a coroutine or task); if the client disconnects first, cancel it, call
    `on_gone` and raise `ClientGone`."""
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


def sse_response(body: AsyncIterator[bytes], on_close: Callable[[], None]) -> StreamingResponse:
    """Server-sent events from `body`; `on_close` runs however the stream ends."""

    async def guarded():
        try:
            async for chunk in body:
                yield chunk
        finally:  # normal end, client disconnect (cancellation) or server shutdown
            on_close()

    return StreamingResponse(guarded(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class Guard:
    """Pure ASGI middleware: the API key (constant-time; ``Authorization: Bearer KEY`` or
    Anthropic's ``x-api-key: KEY``) on every route but /health, and the per-route request counter
    (paths outside ``routes`` count as "other")."""

    def __init__(self, app, *, api_key: str | None, metrics, routes, shapes: dict | None = None):
        self.app, self.metrics, self.routes = app, metrics, frozenset(routes)
        self.key = api_key.encode() if api_key else None
        self.shapes = shapes or {}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        status = {"code": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            if self.key is not None and path != "/health" and not self._authorized(scope):
                exc = ApiError(401, "invalid or missing API key (send 'Authorization: Bearer KEY' or 'x-api-key: KEY')",
                               code="invalid_api_key",
                               headers={"WWW-Authenticate": "Bearer"})
                return await error_response(exc, path, self.shapes)(scope, receive, send_wrapper)
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.requests.inc(1, path if path in self.routes else "other", status["code"])

    def _authorized(self, scope) -> bool:
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key):
                    return True
            elif name == b"x-api-key" and hmac.compare_digest(value.strip(), self.key):
                return True
        return False
