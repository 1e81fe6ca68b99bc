"""Turning engine events into OpenAI response objects, for whole responses and SSE chunks.

`ChatChoice` follows one sample of a chat request: it splits reasoning from content as tokens
arrive (`ReasoningParser`), holds back anything that may be a tool call (`ToolCallStreamer`) and,
at the end, parses the calls. Streaming deltas and the final message are built from the same
parsers, so a streamed response concatenates to the non-streamed one.
"""

from __future__ import annotations

import json
import time
import uuid

from zaya.chat import THINK_CLOSE, THINK_OPEN, ReasoningParser, ToolCallStreamer


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
SSE_KEEPALIVE = b": keep-alive\n\n"


class TokenText:
    """Token id -> text and UTF-8 bytes for logprob entries (cached: the same ids recur)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}
        # `<think>` / `</think>` ids, to count reasoning tokens exactly (None: not one token)
        self.think_ids = tuple(tokenizer.token_to_id(t) if tokenizer else None for t in (THINK_OPEN, THINK_CLOSE))

    def __call__(self, token_id: int) -> str:
        if token_id not in self._cache:
            self._cache[token_id] = self.tokenizer.decode([token_id]) if self.tokenizer else f"<{token_id}>"
        return self._cache[token_id]

    def chat_entry(self, token_id: int, logprob: float, top: dict | None) -> dict:
        text = self(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode()),
                "top_logprobs": [{"token": self(i), "logprob": lp, "bytes": list(self(i).encode())}
                                 for i, lp in (top or {}).items()]}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None,
          reasoning_tokens: int | None = None) -> dict:
    """OpenAI's usage object; ``cached_tokens`` (prompt tokens taken from the prefix cache) goes in
    ``prompt_tokens_details`` and ``reasoning_tokens`` in ``completion_tokens_details`` when known."""
    out = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
           "total_tokens": prompt_tokens + completion_tokens}
    if cached_tokens is not None:
        out["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    if reasoning_tokens is not None:
        out["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
    return out


class ReasoningTokens:
    """Counts the tokens a sample spends reasoning: from the start (when the prompt left `<think>`
    open) or from `<think>` on, up to `</think>`, the tags excluded."""

    def __init__(self, started_in_reasoning: bool, think_ids: tuple):
        self.open_id, self.close_id = think_ids
        self.inside, self.count = started_in_reasoning, 0

    def feed(self, token_id: int) -> None:
        if token_id == self.close_id:
            self.inside = False
        elif token_id == self.open_id:
            self.inside = True
        elif self.inside:
            self.count += 1


class ChatChoice:
    def __init__(self, index: int, started_in_reasoning: bool, tools=None, parse_tools: bool = False,
                 token_text: TokenText | None = None, logprobs: bool = False):
        self.index = index
        self.reasoning = ReasoningParser(started_in_reasoning)
        self.thought = ReasoningTokens(started_in_reasoning, token_text.think_ids if token_text else (None, None))
        self.tools = ToolCallStreamer(tools) if parse_tools else None
        self.token_text, self.want_logprobs = token_text, logprobs
        self.reasoning_text: list[str] = []
        self.content_text: list[str] = []
        self.logprobs: list[dict] = []
        self.tokens = 0
        self.finish_reason: str | None = None
        self.tool_calls: list[dict] = []

    def feed(self, ev) -> dict | None:
        """One engine event -> an SSE choice object, or None when it carries nothing to show."""
        reasoning, content = self.reasoning.feed(ev.text)
        entries = []
        if ev.token_id is not None:
            self.tokens += 1
            self.thought.feed(ev.token_id)
            if self.want_logprobs and ev.logprob is not None:
                entries.append(self.token_text.chat_entry(ev.token_id, ev.logprob, ev.top_logprobs))
                self.logprobs += entries
        if ev.finish_reason:
            r2, c2 = self.reasoning.flush()
            reasoning, content = reasoning + r2, content + c2
        if self.tools is not None:
            content = self.tools.feed(content)
        delta: dict = {}
        if ev.finish_reason:
            self.finish_reason = ev.finish_reason
            if self.tools is not None:
                tail, calls = self.tools.finish()
                content += tail
                self.tool_calls = [{"id": c.id, "type": "function",
                                    "function": {"name": c.name, "arguments": c.arguments_json}} for c in calls]
                if calls:
                    self.finish_reason = "tool_calls"
                    delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(self.tool_calls)]
        self.reasoning_text.append(reasoning)
        self.content_text.append(content)
        if reasoning:
            delta["reasoning_content"] = reasoning
        if content:
            delta["content"] = content
        if not delta and not entries and not ev.finish_reason:
            return None
        return {"index": self.index, "delta": delta,
                "logprobs": {"content": entries} if self.want_logprobs else None,
                "finish_reason": self.finish_reason if ev.finish_reason else None}

    def message(self) -> dict:
        content = "".join(self.content_text)
        msg = {"role": "assistant", "content": content if content or not self.tool_calls else None,
               "reasoning_content": "".join(self.reasoning_text) or None}
        if self.tool_calls:
            msg["tool_calls"] = self.tool_calls
        return {"index": self.index, "message": msg,
                "logprobs": {"content": self.logprobs} if self.want_logprobs else None,
                "finish_reason": self.finish_reason or "length"}


class TextChoice:
    """One sample of a text completion; logprobs in the legacy completions format."""

    def __init__(self, index: int, token_text: TokenText | None = None, logprobs: bool = False):
        self.index, self.token_text, self.want_logprobs = index, token_text, logprobs
        self.text: list[str] = []
        self.tokens = 0
        self.offset = 0
        self.finish_reason: str | None = None
        self.lp = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    def feed(self, ev) -> dict | None:
        lp = None
        if ev.token_id is not None:
            self.tokens += 1
            if self.want_logprobs and ev.logprob is not None:
                tt = self.token_text
                lp = {"tokens": [tt(ev.token_id)], "token_logprobs": [ev.logprob],
                      "top_logprobs": [{tt(i): v for i, v in (ev.top_logprobs or {}).items()}],
                      "text_offset": [self.offset]}
                self.offset += len(tt(ev.token_id))
                for key in self.lp:
                    self.lp[key] += lp[key]
        self.text.append(ev.text)
        if ev.finish_reason:
            self.finish_reason = ev.finish_reason
        if not ev.text and lp is None and not ev.finish_reason:
            return None
        return {"index": self.index, "text": ev.text, "logprobs": lp, "finish_reason": ev.finish_reason}

    def choice(self) -> dict:
        return {"index": self.index, "text": "".join(self.text),
                "logprobs": self.lp if self.want_logprobs else None, "finish_reason": self.finish_reason or "length"}


def chat_completion(rid: str, model: str, choices: list[dict], usage_: dict, **extra) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage_, **extra}


def chat_chunk(rid: str, model: str, created: int, choices: list[dict], **extra) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": choices, **extra}


def text_completion(rid: str, model: str, choices: list[dict], usage_: dict | None, created: int | None = None
                    ) -> dict:
    out = {"id": rid, "object": "text_completion", "created": created or int(time.time()), "model": model,
           "choices": choices}
    if usage_ is not None:
        out["usage"] = usage_
    return out


class Reply:
    """The choices of one request and the response objects built from them. Choices are
    job-major: job j's sample i is ``choices[j * per_job + i]``."""

    prefix = ""

    def __init__(self, model: str, choices: list, prompt_tokens: int, per_job: int = 1):
        self.id, self.created = new_id(self.prefix), int(time.time())
        self.model, self.choices, self.prompt_tokens, self.per_job = model, choices, prompt_tokens, per_job
        self.cached_tokens: int | None = None  # prompt tokens the prefix cache gave, once known

    def feed(self, job: int, ev) -> dict | None:
        """One engine event -> the choice object of a stream chunk, or None."""
        return self.choices[job * self.per_job + ev.index].feed(ev)

    def usage(self) -> dict:
        return usage(self.prompt_tokens, sum(c.tokens for c in self.choices), self.cached_tokens)

    def opening(self) -> list[list[dict]]:
        """Choice lists of the chunks sent before the first token."""
        return []

    # -- the SSE stream: OpenAI chunks and ``data: [DONE]``; other APIs frame their own events
    def stream_open(self, include_usage: bool) -> list[bytes]:
        extra = {"usage": None} if include_usage else {}
        return [sse(self.chunk(choices, **extra)) for choices in self.opening()]

    def stream_feed(self, job: int, ev, include_usage: bool) -> list[bytes]:
        choice = self.feed(job, ev)
        if choice is None:
            return []
        return [sse(self.chunk([choice], **({"usage": None} if include_usage else {})))]

    def stream_close(self, include_usage: bool) -> list[bytes]:
        return ([sse(self.chunk([], usage=self.usage()))] if include_usage else []) + [SSE_DONE]

    def stream_error(self, exc) -> list[bytes]:
        return [sse(exc.body()), SSE_DONE]

    def chunk(self, choices: list[dict], **extra) -> dict:
        raise NotImplementedError

    def body(self) -> dict:
        """The whole (non-streamed) response."""
        raise NotImplementedError


class ChatReply(Reply):
    prefix = "chatcmpl"

    def usage(self) -> dict:
        return usage(self.prompt_tokens, sum(c.tokens for c in self.choices), self.cached_tokens,
                     sum(c.thought.count for c in self.choices))

    def opening(self) -> list[list[dict]]:
        return [[{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                  "finish_reason": None} for i in range(len(self.choices))]]

    def chunk(self, choices: list[dict], **extra) -> dict:
        return chat_chunk(self.id, self.model, self.created, choices, **extra)

    def body(self) -> dict:
        return chat_completion(self.id, self.model, [c.message() for c in self.choices], self.usage())


class TextReply(Reply):
    prefix = "cmpl"

    def chunk(self, choices: list[dict], **extra) -> dict:
        return text_completion(self.id, self.model, choices, None, self.created) | extra

    def body(self) -> dict:
        return text_completion(self.id, self.model, [c.choice() for c in self.choices], self.usage(),
                               self.created)
