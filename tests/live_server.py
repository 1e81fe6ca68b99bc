"""A live uvicorn server on loopback, in a thread, for tests that talk to it with real clients."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import openai


class LiveServer:
    def __init__(self, app):
        import uvicorn

        # bound here and handed to uvicorn: the port is the server's from the start, so no other
        # process can take it between choosing and serving
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"
        self.state = app.state.zaya

    def client(self, api_key="unused", **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=60, **kw)

    def http(self, timeout=60, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout, **kw)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()
