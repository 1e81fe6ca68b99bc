"""``POST /v1/messages``: Anthropic's Messages API on top of the chat path.

A request is translated into a chat completion request: ``system`` -> a system message; user
``text`` blocks -> user text, ``tool_result`` blocks -> tool messages; assistant ``thinking`` ->
``reasoning_content``, ``text`` -> content, ``tool_use`` -> tool calls; ``tools`` (``input_schema``)
and ``tool_choice`` (auto / any -> required / tool -> named / none; ``disable_parallel_tool_use``);
``thinking`` (``enabled`` with ``budget_tokens`` -> the thinking budget, ``disabled`` -> no think
block); ``max_tokens``, ``stop_sequences``, ``temperature``, ``top_p``, ``top_k``. The answer is a
``message`` whose content holds a ``thinking`` block (ZAYA's reasoning, ``signature`` empty), a
``text`` block and ``tool_use`` blocks; ``stream: true`` sends Anthropic's event sequence
(``message_start``, ``content_block_start`` / ``_delta`` / ``_stop``, ``message_delta``,
``message_stop``). Errors use Anthropic's shape, ``{"type": "error", "error": {"type", "message"}}``.
"""

from __future__ import annotations

import json
from typing import Any, Union

from zaya.server import responses as R
from zaya.server.blocks import Blocks
from zaya.server.protocol import ApiError, ChatCompletionRequest, _Body, bad_request, parse

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error"}
_STOP = {"length": "max_tokens", "tool_calls": "tool_use"}


def error_shape(exc: ApiError) -> dict:
    """An `ApiError` as Anthropic's error JSON."""
    return {"type": "error", "error": {"type": _ERROR_TYPES.get(exc.status, "api_error"), "message": exc.message}}


class MessagesRequest(_Body):
    model: str
    max_tokens: int
    messages: list[dict[str, Any]]
    system: Union[str, list[dict[str, Any]], None] = None
    stop_sequences: list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stream: bool = False
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    rsa: Union[bool, dict[str, Any], None] = None   # zaya extension, as on /v1/chat/completions
    speculative: Any = None  # zaya extension, as on /v1/chat/completions


def _blocks(content, where: str) -> list[dict]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list) or not all(isinstance(b, dict) for b in content):
        raise bad_request(f"{where}.content must be a string or a list of content blocks", param=f"{where}.content")
    return content


def _result_text(block: dict, where: str) -> str:
    content = block.get("content", "")
    text = content if isinstance(content, str) else "".join(
        b.get("text", "") for b in _blocks(content, where) if b.get("type") == "text")
    return f"Error: {text}" if block.get("is_error") else text


def _turn(role: str, content, where: str) -> list[dict]:
    """One Anthropic message as chat messages (a user turn's tool results come first)."""
    text, tools, reasoning, calls = [], [], [], []
    for j, b in enumerate(_blocks(content, where)):
        kind, here = b.get("type"), f"{where}.content.{j}"
        if kind == "text" and isinstance(b.get("text"), str):
            text.append(b["text"])
        elif kind == "tool_result" and role == "user" and isinstance(b.get("tool_use_id"), str):
            tools.append({"role": "tool", "tool_call_id": b["tool_use_id"], "content": _result_text(b, here)})
        elif kind == "thinking" and role == "assistant":
            reasoning.append(str(b.get("thinking", "")))
        elif kind == "redacted_thinking" and role == "assistant":
            continue
        elif kind == "tool_use" and role == "assistant" and isinstance(b.get("name"), str):
            calls.append({"id": str(b.get("id", "")), "type": "function",
                          "function": {"name": b["name"], "arguments": json.dumps(b.get("input", {}))}})
        else:
            raise bad_request(f"{here}: a {kind!r} block is not supported in a {role} message", param=here)
    if role == "user":
        return tools + ([{"role": "user", "content": "".join(text)}] if text or not tools else [])
    m = {"role": "assistant", "content": "".join(text)}
    if reasoning:
        m["reasoning_content"] = "".join(reasoning)
    if calls:
        m["tool_calls"] = calls
    return [m]


def _tool_choice(choice, tools) -> tuple[Any, bool]:
    """(OpenAI tool_choice, parallel_tool_calls)."""
    if choice is None:
        return ("auto" if tools else None), True
    kind, parallel = choice.get("type"), not choice.get("disable_parallel_tool_use", False)
    if kind in ("auto", "none"):
        return kind, parallel
    if kind == "any":
        return "required", parallel
    if kind == "tool" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}, parallel
    raise bad_request("tool_choice.type must be auto, any, tool (with a name) or none", param="tool_choice")


def to_chat(req: MessagesRequest) -> ChatCompletionRequest:
    """The chat completion request a Messages request amounts to."""
    messages = []
    if req.system:
        system = req.system if isinstance(req.system, str) else "".join(
            b.get("text", "") for b in _blocks(req.system, "system") if b.get("type") == "text")
        messages.append({"role": "system", "content": system})
    for i, m in enumerate(req.messages):
        if m.get("role") not in ("user", "assistant"):
            raise bad_request(f"messages.{i}.role must be user or assistant", param=f"messages.{i}.role")
        messages += _turn(m["role"], m.get("content"), f"messages.{i}")
    tools = [{"type": "function", "function": {"name": t.get("name"), "description": t.get("description"),
                                               "parameters": t.get("input_schema") or {}}}
             for t in req.tools or []]
    for i, t in enumerate(req.tools or []):
        if t.get("type") not in (None, "custom") or not isinstance(t.get("name"), str):
            raise bad_request(f"tools.{i}: only client tools with a name and input_schema are supported",
                              param=f"tools.{i}")
    choice, parallel = _tool_choice(req.tool_choice, tools)
    thinking = req.thinking or {}
    if thinking and thinking.get("type") not in ("enabled", "disabled", "adaptive"):
        raise bad_request("thinking.type must be enabled, disabled or adaptive", param="thinking.type")
    body = {"model": req.model, "messages": messages, "max_tokens": req.max_tokens,
            "stop": req.stop_sequences, "temperature": req.temperature, "top_p": req.top_p, "top_k": req.top_k,
            "tools": tools or None, "tool_choice": choice, "parallel_tool_calls": parallel,
            "thinking_budget": thinking.get("budget_tokens") if thinking.get("type") == "enabled" else None,
            "chat_template_kwargs": {"enable_thinking": False} if thinking.get("type") == "disabled" else None,
            "rsa": req.rsa, "speculative": req.speculative}
    return parse(ChatCompletionRequest, json.dumps({k: v for k, v in body.items() if v is not None}).encode())


# -- the answer -----------------------------------------------------------------------------------
def _content(block: dict, done: bool) -> dict:
    if block["kind"] == "reasoning":
        return {"type": "thinking", "thinking": block["text"] if done else "", "signature": ""}
    if block["kind"] == "text":
        return {"type": "text", "text": block["text"] if done else ""}
    return {"type": "tool_use", "id": block["id"].replace("call_", "toolu_", 1), "name": block["name"],
            "input": json.loads(block["arguments"]) if done else {}}


class MessagesReply(R.Reply):
    prefix = "msg"

    def __init__(self, req: MessagesRequest, choice: R.ChatChoice, prompt_tokens: int, tokenizer):
        super().__init__(req.model, [choice], prompt_tokens)
        self.id = "msg_" + self.id.removeprefix("msg-")
        self.stops, self.tokenizer, self.out = req.stop_sequences or [], tokenizer, Blocks(choice)
        self.last_token = None

    def feed(self, job: int, ev) -> list[tuple]:
        if ev.finish_reason:
            self.last_token = ev.token_id
        return self.out.feed(ev)

    def stop(self) -> tuple[str, str | None]:
        """(stop_reason, stop_sequence). A stop string ends a sample on a token (EOS ends it on
        none); which string it was is found in the decoded text."""
        finish = self.out.finish_reason or "length"
        if finish != "stop" or self.last_token is None or not self.stops:
            return _STOP.get(finish, "end_turn"), None
        text = self.tokenizer.decode(self.out.token_ids)
        hits = [(i, s) for s in self.stops if (i := text.find(s)) >= 0]
        return ("stop_sequence", min(hits)[1]) if hits else ("end_turn", None)

    def usage(self) -> dict:
        # Anthropic counts prompt tokens read from a cache apart from input_tokens
        cached = self.cached_tokens or 0
        return {"input_tokens": self.prompt_tokens - cached, "cache_read_input_tokens": cached,
                "output_tokens": self.out.tokens}

    def body(self) -> dict:
        reason, sequence = self.stop()
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model,
                "content": [_content(b, True) for b in self.out.blocks], "stop_reason": reason,
                "stop_sequence": sequence, "usage": self.usage()}

    @staticmethod
    def _event(kind: str, **data) -> bytes:
        return f"event: {kind}\ndata: ".encode() + json.dumps({"type": kind, **data}, ensure_ascii=False).encode() \
            + b"\n\n"

    def stream_open(self, include_usage: bool) -> list[bytes]:
        message = {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": [],
                   "stop_reason": None, "stop_sequence": None,
                   "usage": {"input_tokens": self.prompt_tokens, "output_tokens": 0}}
        return [self._event("message_start", message=message), self._event("ping")]

    def stream_feed(self, job: int, ev, include_usage: bool) -> list[bytes]:
        out = []
        for kind, index, data in self.feed(job, ev):
            if kind == "start":
                out.append(self._event("content_block_start", index=index, content_block=_content(data, False)))
            elif kind == "stop":
                out.append(self._event("content_block_stop", index=index))
            else:
                block = self.out.blocks[index]["kind"]
                delta = ({"type": "thinking_delta", "thinking": data} if block == "reasoning" else
                         {"type": "text_delta", "text": data} if block == "text" else
                         {"type": "input_json_delta", "partial_json": data})
                out.append(self._event("content_block_delta", index=index, delta=delta))
        return out

    def stream_close(self, include_usage: bool) -> list[bytes]:
        reason, sequence = self.stop()
        return [self._event("message_delta", delta={"stop_reason": reason, "stop_sequence": sequence},
                            usage={"output_tokens": self.out.tokens}),
                self._event("message_stop")]

    def stream_error(self, exc) -> list[bytes]:
        return [self._event("error", error=error_shape(exc)["error"])]

