"""Load test for `zaya serve`: C concurrent streaming clients on loopback.

    python benchmarks/load_server.py --url http://127.0.0.1:8000 --clients 32 --requests 64
    python benchmarks/load_server.py --serve tests-tiny --max-batch 32   # start a server in-process
    python benchmarks/load_server.py --serve tests-tiny --max-batch 1    # one at a time, for comparison

Each client sends streaming chat requests (``ignore_eos`` so every request decodes exactly
``--max-tokens``) until ``--requests`` have been sent or ``--duration`` seconds have passed.
Reports completed / failed requests, output tokens per second over the wall time, p50/p99
time-to-first-token and latency, and ends with one JSON line. ``--serve tests-tiny`` builds the
tiny random test model; any other value is a model path or name for `zaya.load`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx


def pct(values, q):
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


async def one_request(http, model, max_tokens, prompt, stats):
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}, "temperature": 1.0}
    start, first, tokens = time.perf_counter(), None, 0
    try:
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                stats["errors"].append(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
                return
            done = False
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    stats["errors"].append(chunk["error"]["message"])
                    return
                if first is None and chunk.get("choices"):
                    delta = chunk["choices"][0]["delta"]
                    if delta.get("content") or delta.get("reasoning_content"):
                        first = time.perf_counter()
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
            if not done:
                stats["errors"].append("stream ended without [DONE]")
                return
    except httpx.HTTPError as exc:
        stats["errors"].append(f"{type(exc).__name__}: {exc}")
        return
    end = time.perf_counter()
    stats["ttft"].append((first or end) - start)
    stats["latency"].append(end - start)
    stats["tokens"] += tokens


async def run(url, model, clients, requests, duration, max_tokens, api_key):
    stats = {"ttft": [], "latency": [], "tokens": 0, "errors": []}
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=clients + 4)
    sent = 0
    deadline = time.perf_counter() + duration

    async with httpx.AsyncClient(base_url=url, timeout=duration + 60, headers=headers, limits=limits) as http:
        if model is None:
            model = (await http.get("/v1/models")).json()["data"][0]["id"]

        async def client(i):
            nonlocal sent
            while sent < requests and time.perf_counter() < deadline:
                sent += 1
                await one_request(http, model, max_tokens, f"Client {i}, request {sent}: tell me a story.", stats)

        start = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(clients)))
        wall = time.perf_counter() - start
    ok = len(stats["latency"])
    return {"clients": clients, "sent": sent, "completed": ok, "errors": len(stats["errors"]),
            "first_errors": stats["errors"][:3], "max_tokens": max_tokens, "wall_s": round(wall, 3),
            "output_tokens": stats["tokens"], "throughput_tok_s": round(stats["tokens"] / wall, 1),
            "requests_per_s": round(ok / wall, 2),
            "ttft_p50_s": _r(pct(stats["ttft"], 50)), "ttft_p99_s": _r(pct(stats["ttft"], 99)),
            "latency_p50_s": _r(pct(stats["latency"], 50)), "latency_p99_s": _r(pct(stats["latency"], 99)),
            "latency_mean_s": _r(statistics.fmean(stats["latency"]) if ok else None)}


def _r(x):
    return None if x is None else round(x, 4)


def serve_in_process(model: str, max_batch: int, max_queue: int, threads: int | None):
    import torch
    import uvicorn

    import zaya
    from zaya.server import ServerConfig, create_app

    if threads:
        torch.set_num_threads(threads)
    if model == "tests-tiny":
        import tempfile

        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from tests.tiny_model import make_tiny_model_dir

        model = str(make_tiny_model_dir(Path(tempfile.mkdtemp(prefix="zaya-load-"))))
    llm = zaya.load(model)
    app = create_app(llm, ServerConfig(model_name="load", max_batch=max_batch, max_queue=max_queue))
    sock = socket.socket()  # bound here and handed to uvicorn: no window for another process to take the port
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--serve", default=None, help="start a server in-process on this model ('tests-tiny' = random tiny)")
    p.add_argument("--max-batch", type=int, default=32, help="with --serve")
    p.add_argument("--threads", type=int, default=None, help="with --serve: torch threads")
    p.add_argument("--model", default=None, help="model id to request (default: the server's first)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--clients", "-c", type=int, default=32)
    p.add_argument("--requests", "-n", type=int, default=None, help="total requests (default: = clients)")
    p.add_argument("--duration", type=float, default=300, help="stop sending new requests after this many seconds")
    p.add_argument("--max-tokens", type=int, default=64)
    args = p.parse_args(argv)
    requests = args.requests or args.clients
    server = None
    url = args.url
    if args.serve:
        url, server = serve_in_process(args.serve, args.max_batch, max(64, requests), args.threads)
    host = httpx.URL(url).host
    if host not in ("127.0.0.1", "localhost", "::1"):
        p.error("load tests run against loopback only")
    result = asyncio.run(run(url, args.model, args.clients, requests, args.duration, args.max_tokens, args.api_key))
    if server:
        result["server_max_batch"] = args.max_batch
        server.should_exit = True
    print(f"{result['completed']}/{result['sent']} requests completed, {result['errors']} errors, "
          f"{result['output_tokens']} tokens in {result['wall_s']} s = {result['throughput_tok_s']} tok/s")
    print(f"TTFT p50 {result['ttft_p50_s']} s, p99 {result['ttft_p99_s']} s; "
          f"latency p50 {result['latency_p50_s']} s, p99 {result['latency_p99_s']} s")
    print(json.dumps(result))
    return 0 if result["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
