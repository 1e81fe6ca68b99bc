"""The OpenAI-compatible server: `create_app(llm, ServerConfig(...))` and `zaya serve`.

Modules: ``app`` (routes, auth, limits, errors), ``protocol`` (request bodies, error JSON),
``prepare`` (templating, tokenizing, sampling parameters), ``responses`` (response and SSE chunk
assembly, reasoning and tool-call parsing per choice), ``scheduler`` (continuous batching on one
thread), ``rsa`` (Markovian RSA per request), ``metrics`` (Prometheus text), ``cli`` (``zaya serve``).
"""

from zaya.server.app import ServerConfig, create_app

__all__ = ["create_app", "ServerConfig"]
