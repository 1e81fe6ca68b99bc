"""OpenAIBackend (and ``zaya solve --backend-url``) against a stub OpenAI-compatible server on
127.0.0.1: request shape, reasoning fields, usage, concurrency limit, remote tokenization, HTTP
errors."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests import test_rsa

from zaya.rsa import BackendError, OpenAIBackend, solve


class WordTokenizer(test_rsa.WordTokenizer):
    """The word tokenizer of test_rsa, safe to share between the backend's worker threads."""

    def __init__(self):
        super().__init__()
        self.lock = threading.Lock()

    def encode(self, text, add_special_tokens=False):
        with self.lock:
            return super().encode(text, add_special_tokens)


class Stub:
    """State of the stub server: requests seen, in-flight high-water mark, behaviour switches."""

    def __init__(self):
        self.tokenizer = WordTokenizer()
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        self.delay = 0.0
        self.reasoning_field = "reasoning_content"
        self.tokenize_routes = True

    def completion(self, body: dict) -> tuple[int, dict | str]:
        prompt = body["messages"][-1]["content"]
        if "FAIL" in prompt:
            return 500, "upstream exploded: CUDA out of memory"
        i = len(self.requests)
        reasoning = " ".join(f"s{body.get('seed')}w{j}" for j in range(12))
        answer = "17" if "Solution" in prompt else str(i % 2)
        words = self.tokenizer.encode(reasoning)[: body["max_tokens"]]
        finish = "stop" if len(words) < body["max_tokens"] else "length"
        message = {"role": "assistant", "content": f"Done. \\boxed{{{answer}}}"}
        if self.reasoning_field == "raw":
            message["content"] = f"<think>{reasoning}</think>{message['content']}"
        else:
            message[self.reasoning_field] = reasoning
        usage = {"prompt_tokens": len(self.tokenizer.encode(prompt)),
                 "completion_tokens": len(words) + 3}
        return 200, {"id": f"c{i}", "object": "chat.completion", "model": body["model"],
                     "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                     "usage": usage}


def make_handler(stub: Stub):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def reply(self, status: int, payload):
            data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain" if isinstance(payload, str)
                             else "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/v1/models":
                return self.reply(200, {"object": "list", "data": [{"id": "zaya-stub"}]})
            self.reply(404, "not found")

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path == "/v1/chat/completions":
                with stub.lock:
                    stub.in_flight += 1
                    stub.max_in_flight = max(stub.max_in_flight, stub.in_flight)
                time.sleep(stub.delay)
                status, payload = stub.completion(body)
                with stub.lock:
                    stub.in_flight -= 1
                    stub.requests.append(body)
                    stub.headers.append(dict(self.headers))
                return self.reply(status, payload)
            if self.path == "/tokenize" and stub.tokenize_routes:
                return self.reply(200, {"tokens": stub.tokenizer.encode(body["prompt"])})
            if self.path == "/detokenize" and stub.tokenize_routes:
                return self.reply(200, {"prompt": stub.tokenizer.decode(body["tokens"])})
            self.reply(404, '{"detail":"Not Found"}')

    return Handler


@pytest.fixture
def server():
    stub = Stub()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(stub))
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    stub.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield stub
    httpd.shutdown()
    httpd.server_close()


def ask(backend, prompts, **kw):
    kw = {"n": 1, "max_tokens": 64, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "seed": 3, **kw}
    return backend.generate([[{"role": "user", "content": p}] for p in prompts], **kw)


def test_requests_candidates_and_usage(server):
    with OpenAIBackend(server.url + "/v1/", api_key="sk-test", max_concurrency=4) as backend:
        out = ask(backend, ["a", "b"], n=3, top_k=40, enable_thinking=True)
    assert [len(row) for row in out] == [3, 3] and len(server.requests) == 6
    body = server.requests[0]
    assert body["model"] == "zaya-stub" and body["n"] == 1 and body["max_tokens"] == 64
    assert body["top_k"] == 40 and body["chat_template_kwargs"] == {"enable_thinking": True}
    assert len({r["seed"] for r in server.requests}) == 6  # one derived seed per request
    assert all(h.get("Authorization") == "Bearer sk-test" for h in server.headers)
    c = out[0][0]
    assert c.reasoning.startswith("s") and c.content.startswith("Done.")
    assert c.text == c.reasoning + "</think>" + c.content
    assert (c.finish_reason, c.completion_tokens, c.prompt_tokens) == ("stop", 15, 1)


@pytest.mark.parametrize("field", ["reasoning", "raw"])
def test_reasoning_field_variants(server, field):
    server.reasoning_field = field
    with OpenAIBackend(server.url, model="m", tokenizer=WordTokenizer()) as backend:
        c = ask(backend, ["q"])[0][0]
    assert c.reasoning.split()[0].endswith("w0") and "<think>" not in c.reasoning
    assert c.content.startswith("Done.") and server.requests[0]["model"] == "m"


def test_concurrency_is_bounded(server):
    server.delay = 0.05
    with OpenAIBackend(server.url, max_concurrency=2, tokenizer=WordTokenizer()) as backend:
        ticks = []
        ask(backend, ["q"], n=6, progress=lambda tok, done: ticks.append(done))
    # at most 2 at once, and the 2 are used: 50 ms per request leaves the second time to start
    assert server.max_in_flight == 2 and len(server.requests) == 6 and sum(ticks) == 6


def test_http_errors_are_clear(server):
    with OpenAIBackend(server.url, tokenizer=WordTokenizer()) as backend:
        with pytest.raises(BackendError, match=r"HTTP 500: upstream exploded: CUDA out of memory"):
            ask(backend, ["please FAIL"])
    with socket.socket() as closed:  # bound but not listening: a connection to it is refused
        closed.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{closed.getsockname()[1]}"
        with OpenAIBackend(f"http://{address}", model="m", tokenizer=WordTokenizer(), timeout=2) as backend:
            with pytest.raises(BackendError, match=f"{address}/v1/chat/completions failed"):
                ask(backend, ["q"])
    server.tokenize_routes = False
    with OpenAIBackend(server.url) as backend:
        with pytest.raises(BackendError, match="--tokenizer"):
            backend.count_tokens("hello world")


def test_remote_tokenizer_tails_are_token_exact(server):
    with OpenAIBackend(server.url) as backend:
        text = "one two  three\nfour five"
        assert backend.count_tokens(text) == 5
        assert backend.tail(text, 2) == "\nfour five" and backend.tail(text, 9) == text


def test_solve_over_http(server, tmp_path):
    audit = tmp_path / "run.jsonl"
    with OpenAIBackend(server.url, max_concurrency=3) as backend:
        result = solve(backend, "What is 8+9?", profile="cpu-tiny", budget=20, tail=5, seed=1,
                       audit_path=audit, progress=False)
    assert len(server.requests) == 8 and result.requests == 8
    assert result.answer == "17" and result.vote.counts == {"17": 4}
    assert result.rounds[0]["answers"] == {"0": 2, "1": 2}
    assert result.completion_tokens == 8 * 15
    aggregation = server.requests[-1]["messages"][-1]["content"]
    assert aggregation.count("---- Solution") == 2 and "What is 8+9?" in aggregation
    assert result.context["max_prompt_tokens"] <= result.context["prompt_bound"]
    assert sum(1 for _ in audit.open()) == 1 + 5 + 8 + 2 + 1


def test_cli_solve_against_server(server, tmp_path, capsys):
    from zaya.cli import main

    audit = tmp_path / "cli.jsonl"
    args = ["solve", "What is 8+9?", "--backend-url", server.url, "--profile", "cpu-tiny", "--n", "2", "--k", "2",
            "--budget", "16", "--seed", "0", "--concurrency", "2", "--no-progress"]
    code = main(args + ["--audit", str(audit), "--json"])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and out[0] == "answer: 17" and out[1].startswith("vote: 17 x2 (2 candidates")
    assert any(line.startswith("cost: ") for line in out)
    summary = json.loads(out[-1])  # --json: the full summary, as the audit's last record holds it
    assert summary["answer"] == "17" and summary["requests"] == 4 and summary["config"]["n"] == 2
    assert json.loads(audit.read_text().splitlines()[-1])["summary"]["requests"] == 4
    assert main(args) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]  # without: one compact line for scripts
    assert json.loads(last) == {"answer": "17", "votes": {"17": 2}, "completion_tokens": summary["completion_tokens"],
                                "seconds": json.loads(last)["seconds"]} and len(last) < 120
    server.requests.clear()
    code = main(["solve", "please FAIL", "--backend-url", server.url, "--profile", "cpu-tiny",
                 "--no-progress"])
    assert code == 1 and "HTTP 500" in capsys.readouterr().err
