"""`zaya serve`: the OpenAI-compatible server on uvicorn."""

from __future__ import annotations

import ipaddress
import logging
import os
import sys
from pathlib import Path

from zaya.commands import add_model_args, load_from_args
from zaya.errors import ZayaError
from zaya.sampling import MAX_DRAFT
from zaya.server.app import ServerConfig, create_app


def register(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching",
                       description="Serve a model over an OpenAI-compatible API (/v1/chat/completions, "
                                   "/v1/completions, /v1/responses, /v1/models), Anthropic's /v1/messages, vLLM's "
                                   "/tokenize and /detokenize, /health and /metrics. See docs/server.md.")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("ZAYA_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every route but /health (default: $ZAYA_API_KEY)")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: from --model)")
    p.add_argument("--max-batch", type=int, default=16, help="sequences decoded together (default 16)")
    p.add_argument("--speculative", type=int, default=0, metavar="K",
                   help="prompt-lookup speculative decoding with drafts of up to K tokens for requests that do "
                        "not set `speculative` (default 0: off; 1-16)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting before 429 (default 64)")
    p.add_argument("--step-tokens", type=int, default=512,
                   help="tokens one engine step computes: the decoding rows plus chunks of waiting prompts, so a "
                        "long prompt delays running streams by at most this much work per token (default 512)")
    p.add_argument("--max-body", type=int, default=4 << 20, help="largest request body in bytes (default 4 MiB)")
    p.add_argument("--thinking-budget", type=int, default=None, metavar="N",
                   help="default reasoning tokens before </think> is forced, for requests that set no "
                        "thinking_budget or reasoning_effort (default: no limit)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=cmd_serve)


def served_name(model: str | None) -> str:
    if model is None:
        return "zaya-tiny"
    path = Path(model).expanduser()
    return path.name if path.exists() else model


def cmd_serve(args) -> int:
    import uvicorn  # start-up time: only `zaya serve` needs the ASGI server

    for flag in ("max_batch", "max_queue", "max_body", "step_tokens", "port"):
        if getattr(args, flag) < (0 if flag == "port" else 1):
            raise ZayaError(f"--{flag.replace('_', '-')} must be positive")
    if args.thinking_budget is not None and args.thinking_budget < 0:
        raise ZayaError("--thinking-budget must be >= 0")
    if not 0 <= args.speculative <= MAX_DRAFT:
        raise ZayaError(f"--speculative must be a draft length in [0, {MAX_DRAFT}] (0: off), got {args.speculative}")
    if args.max_context is not None and args.max_context < 2:
        raise ZayaError("--max-context must be at least 2")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.api_key and not _is_loopback(args.host):
        print(f"zaya: warning: serving on {args.host} without --api-key: anyone who can reach it can use it",
              file=sys.stderr)
    llm = load_from_args(args)
    name = args.served_model_name or served_name(args.model)
    aliases = tuple(a for a in {args.model, str(llm.path) if llm.path else None} if a and a != name)
    config = ServerConfig(model_name=name, aliases=aliases, api_key=args.api_key, max_batch=args.max_batch,
                          max_queue=args.max_queue, max_body_bytes=args.max_body, step_tokens=args.step_tokens,
                          thinking_budget=args.thinking_budget, speculative=args.speculative)
    app = create_app(llm, config)  # allocates the KV cache: a budget too small for one sequence fails here
    print(f"zaya: {llm.cache.describe()}; longest request {app.state.zaya.max_context:,} tokens; "
          f"decode step {llm.compile}", file=sys.stderr)
    # uvicorn handles SIGINT/SIGTERM: it stops accepting, lets open requests finish (up to the
    # timeout), then runs the app's shutdown, which stops the scheduler thread.
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=30)
    return 0


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
