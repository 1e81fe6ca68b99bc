"""``POST /v1/responses``: OpenAI's Responses API on top of the chat path.

A request is translated into a chat completion request (``input`` items -> messages,
``instructions`` -> a system message, function tools, ``tool_choice``, ``text.format`` ->
``response_format``, ``reasoning.effort`` -> ``reasoning_effort``, ``max_output_tokens``), prepared
and decoded like any chat request, and answered with a ``response`` object whose ``output`` holds
a ``reasoning`` item (ZAYA's thinking, as ``reasoning_text`` content), a ``message`` item and
``function_call`` items. ``stream: true`` sends the official event sequence (``response.created``,
``response.output_item.added``, ``response.output_text.delta``, ..., ``response.completed``).

Nothing is stored: ``store`` is accepted and answered as ``false``, and ``previous_response_id``
is refused (send the whole conversation in ``input``, as with ``store: false``).
"""

from __future__ import annotations

import json
from typing import Any, Literal, Union

from pydantic import ConfigDict

from zaya.server import responses as R
from zaya.server.blocks import Blocks
from zaya.server.protocol import ChatCompletionRequest, _Body, bad_request, parse

_PART_TEXT = {"input_text", "output_text", "text"}


class ResponsesRequest(_Body):
    model_config = ConfigDict(extra="ignore", strict=True)
    model: str
    input: Union[str, list[dict[str, Any]]]
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Union[Literal["auto", "none", "required"], dict[str, Any], None] = None
    parallel_tool_calls: bool = True
    stream: bool = False
    store: bool | None = None
    previous_response_id: str | None = None
    text: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    thinking_budget: int | None = None         # zaya extension, as on /v1/chat/completions
    chat_template_kwargs: dict[str, Any] | None = None
    rsa: Union[bool, dict[str, Any], None] = None
    speculative: Any = None  # zaya extension, as on /v1/chat/completions


def _text_of(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"{where}.content must be a string or a list of parts", param=f"{where}.content")
    out = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") not in _PART_TEXT or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise bad_request(f"{where}.content: only text parts are supported (got {kind!r})",
                              param=f"{where}.content")
        out.append(part["text"])
    return "".join(out)


def _messages(req: ResponsesRequest) -> list[dict]:
    """``instructions`` and ``input`` as chat messages; function calls join the assistant turn
    before them, reasoning items become the next assistant turn's ``reasoning_content``."""
    messages = [{"role": "system", "content": req.instructions}] if req.instructions else []
    items = [{"role": "user", "content": req.input}] if isinstance(req.input, str) else req.input
    if not items:
        raise bad_request("input is empty", param="input")
    reasoning = None
    for i, item in enumerate(items):
        where, kind = f"input.{i}", item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise bad_request(f"{where}.role must be user, system, developer or assistant", param=f"{where}.role")
            m = {"role": "system" if role == "developer" else role, "content": _text_of(item.get("content"), where)}
            if role == "assistant" and reasoning:
                m["reasoning_content"], reasoning = reasoning, None
            messages.append(m)
        elif kind == "function_call":
            if not all(isinstance(item.get(k), str) for k in ("call_id", "name", "arguments")):
                raise bad_request(f"{where}: a function_call needs call_id, name and arguments", param=where)
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            if not (messages and messages[-1]["role"] == "assistant"):
                messages.append({"role": "assistant", "content": ""})
                if reasoning:
                    messages[-1]["reasoning_content"], reasoning = reasoning, None
            messages[-1].setdefault("tool_calls", []).append(call)
        elif kind == "function_call_output":
            output = item.get("output")
            if not isinstance(item.get("call_id"), str):
                raise bad_request(f"{where}: a function_call_output needs call_id", param=where)
            messages.append({"role": "tool", "tool_call_id": item["call_id"],
                             "content": output if isinstance(output, str) else _text_of(output, where)})
        elif kind == "reasoning":
            parts = item.get("content") or item.get("summary") or []
            reasoning = "".join(p.get("text", "") for p in parts if isinstance(p, dict)) or None
        else:
            raise bad_request(f"{where}: input items of type {kind!r} are not supported", param=f"{where}.type")
    return messages


def _tools(req: ResponsesRequest) -> list[dict] | None:
    if not req.tools:
        return None
    out = []
    for i, t in enumerate(req.tools):
        if t.get("type") != "function":
            raise bad_request(f"tools.{i}: only function tools are supported (got {t.get('type')!r})",
                              param=f"tools.{i}.type")
        out.append({"type": "function", "function": {k: t[k] for k in ("name", "description", "parameters")
                                                      if t.get(k) is not None}})
    return out


def _tool_choice(choice):
    if isinstance(choice, dict):
        if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
            raise bad_request("tool_choice must be auto, none, required or {type: function, name}",
                              param="tool_choice")
        return {"type": "function", "function": {"name": choice["name"]}}
    return choice


def _response_format(text):
    fmt = (text or {}).get("format")
    if fmt is None or not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        return fmt
    return {"type": "json_schema", "json_schema": {k: fmt[k] for k in ("name", "schema", "strict") if k in fmt}}


def to_chat(req: ResponsesRequest):
    """The chat completion request a Responses request amounts to."""
    if req.previous_response_id is not None:
        raise bad_request("previous_response_id is not supported: this server stores no responses; send the "
                          "whole conversation in input", param="previous_response_id")
    body = {"model": req.model, "messages": _messages(req), "max_completion_tokens": req.max_output_tokens,
            "temperature": req.temperature, "top_p": req.top_p, "tools": _tools(req),
            "tool_choice": _tool_choice(req.tool_choice), "parallel_tool_calls": req.parallel_tool_calls,
            "response_format": _response_format(req.text), "thinking_budget": req.thinking_budget,
            "reasoning_effort": (req.reasoning or {}).get("effort"),
            "chat_template_kwargs": req.chat_template_kwargs, "rsa": req.rsa, "speculative": req.speculative}
    return parse(ChatCompletionRequest, json.dumps({k: v for k, v in body.items() if v is not None}).encode())


# -- the answer -----------------------------------------------------------------------------------
def _item(block: dict, item_id: str, done: bool) -> dict:
    status = "completed" if done else "in_progress"
    if block["kind"] == "reasoning":
        return {"type": "reasoning", "id": item_id, "summary": [],
                "content": [{"type": "reasoning_text", "text": block["text"]}] if done else []}
    if block["kind"] == "text":
        return {"type": "message", "id": item_id, "status": status, "role": "assistant",
                "content": [_part(block["text"])] if done else []}
    return {"type": "function_call", "id": item_id, "call_id": block["id"], "name": block["name"],
            "arguments": block["arguments"] if done else "", "status": status}


def _part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


class ResponsesReply(R.Reply):
    """One sample as a ``response`` object, or its stream of events."""

    prefix = "resp"

    def __init__(self, req: ResponsesRequest, chat, choice: R.ChatChoice, prompt_tokens: int):
        super().__init__(req.model, [choice], prompt_tokens)
        self.id = "resp_" + self.id.removeprefix("resp-")
        self.req, self.chat, self.out = req, chat, Blocks(choice)
        self.item_ids: list[str] = []
        self.seq = 0

    def feed(self, job: int, ev) -> list[tuple]:
        events = self.out.feed(ev)
        for kind, index, block in events:
            if kind == "start":
                prefix = {"reasoning": "rs", "text": "msg", "tool_call": "fc"}[block["kind"]]
                self.item_ids.append(f"{prefix}_{R.new_id('')[1:]}")
        return events

    def usage(self) -> dict:
        return {"input_tokens": self.prompt_tokens, "input_tokens_details": {"cached_tokens": self.cached_tokens or 0},
                "output_tokens": self.out.tokens,
                "output_tokens_details": {"reasoning_tokens": self.out.reasoning_tokens},
                "total_tokens": self.prompt_tokens + self.out.tokens}

    def body(self, done: bool = True) -> dict:
        incomplete = done and self.out.finish_reason == "length"
        req, chat = self.req, self.chat
        return {
            "id": self.id, "object": "response", "created_at": self.created,
            "status": ("incomplete" if incomplete else "completed") if done else "in_progress",
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None, "error": None,
            "model": self.model, "instructions": req.instructions,
            "output": self._output() if done else [],
            "max_output_tokens": req.max_output_tokens, "temperature": req.temperature, "top_p": req.top_p,
            "parallel_tool_calls": req.parallel_tool_calls, "tool_choice": req.tool_choice or "auto",
            "tools": req.tools or [], "text": req.text or {"format": {"type": "text"}},
            "reasoning": {"effort": chat.reasoning_effort, "summary": None}, "store": False,
            "previous_response_id": None, "truncation": "disabled", "metadata": req.metadata or {},
            "usage": self.usage() if done else None}

    def _output(self) -> list[dict]:
        """The finished items; an answer that is empty (an end token first) is still one message
        item with empty text, as OpenAI answers it, so a client always finds ``output_text``."""
        items = [_item(b, i, True) for b, i in zip(self.out.blocks, self.item_ids)]
        if not any(item["type"] != "reasoning" for item in items):
            items.append(_item({"kind": "text", "text": ""}, f"msg_{R.new_id('')[1:]}", True))
        return items

    # -- streaming --------------------------------------------------------------------------------
    def _event(self, kind: str, **data) -> bytes:
        payload = {"type": kind, "sequence_number": self.seq, **data}
        self.seq += 1
        return f"event: {kind}\ndata: ".encode() + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"

    def stream_open(self, include_usage: bool) -> list[bytes]:
        return [self._event("response.created", response=self.body(done=False)),
                self._event("response.in_progress", response=self.body(done=False))]

    def stream_feed(self, job: int, ev, include_usage: bool) -> list[bytes]:
        out = []
        for kind, index, data in self.feed(job, ev):
            out += getattr(self, f"_{kind}")(index, data)
        return out

    def _start(self, index: int, block: dict) -> list[bytes]:
        item_id = self.item_ids[index]
        out = [self._event("response.output_item.added", output_index=index, item=_item(block, item_id, False))]
        part = {"reasoning": {"type": "reasoning_text", "text": ""}, "text": _part("")}.get(block["kind"])
        if part is not None:
            out.append(self._event("response.content_part.added", item_id=item_id, output_index=index,
                                   content_index=0, part=part))
        return out

    def _delta(self, index: int, text: str) -> list[bytes]:
        item_id, kind = self.item_ids[index], self.out.blocks[index]["kind"]
        if kind == "tool_call":
            return [self._event("response.function_call_arguments.delta", item_id=item_id, output_index=index,
                                delta=text)]
        name = "response.reasoning_text.delta" if kind == "reasoning" else "response.output_text.delta"
        extra = {"logprobs": []} if kind == "text" else {}
        return [self._event(name, item_id=item_id, output_index=index, content_index=0, delta=text, **extra)]

    def _stop(self, index: int, block: dict) -> list[bytes]:
        item_id, out = self.item_ids[index], []
        if block["kind"] == "tool_call":
            out.append(self._event("response.function_call_arguments.done", item_id=item_id, output_index=index,
                                   name=block["name"], arguments=block["arguments"]))
        else:
            reasoning = block["kind"] == "reasoning"
            name = "response.reasoning_text.done" if reasoning else "response.output_text.done"
            part = {"type": "reasoning_text", "text": block["text"]} if reasoning else _part(block["text"])
            out.append(self._event(name, item_id=item_id, output_index=index, content_index=0, text=block["text"],
                                   **({} if reasoning else {"logprobs": []})))
            out.append(self._event("response.content_part.done", item_id=item_id, output_index=index,
                                   content_index=0, part=part))
        out.append(self._event("response.output_item.done", output_index=index, item=_item(block, item_id, True)))
        return out

    def stream_close(self, include_usage: bool) -> list[bytes]:
        body = self.body()
        return [self._event("response.incomplete" if body["status"] == "incomplete" else "response.completed",
                            response=body)]

    def stream_error(self, exc) -> list[bytes]:
        return [self._event("error", code=exc.code or exc.type, message=exc.message, param=exc.param)]
