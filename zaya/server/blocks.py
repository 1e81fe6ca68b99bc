"""One chat sample's output as ordered blocks, the shape the Responses and Messages APIs share.

A sample is reasoning, then text, then tool calls (ZAYA writes `</think>` before its answer and
tool calls are parsed once the sample ends). `Blocks` follows a `ChatChoice` and turns its deltas
into block events: ``("start", index, block)``, ``("delta", index, text)`` and ``("stop", index,
block)``; each API names and frames those events its own way (``openai_responses``,
``anthropic``). A block is a dict: ``{"kind": "reasoning" | "text", "text": ...}`` or ``{"kind":
"tool_call", "id", "name", "arguments"}`` (arguments as a JSON string).
"""

from __future__ import annotations

from zaya.server.responses import ChatChoice


class Blocks:
    def __init__(self, choice: ChatChoice):
        self.choice = choice
        self.blocks: list[dict] = []
        self.open: dict | None = None
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None

    def feed(self, ev) -> list[tuple]:
        """One engine event -> block events."""
        if ev.token_id is not None:
            self.token_ids.append(ev.token_id)
        delta = (self.choice.feed(ev) or {}).get("delta", {})
        events = []
        for kind, key in (("reasoning", "reasoning_content"), ("text", "content")):
            if delta.get(key):
                events += self._text(kind, delta[key])
        if ev.finish_reason:
            self.finish_reason = self.choice.finish_reason
            events += self._close()
            for call in self.choice.tool_calls:
                fn = call["function"]
                block = {"kind": "tool_call", "id": call["id"], "name": fn["name"], "arguments": fn["arguments"]}
                self.blocks.append(block)
                i = len(self.blocks) - 1
                events += [("start", i, block), ("delta", i, fn["arguments"]), ("stop", i, block)]
        return events

    def _text(self, kind: str, text: str) -> list[tuple]:
        events = []
        if self.open is None or self.open["kind"] != kind:
            events += self._close()
            self.open = {"kind": kind, "text": ""}
            self.blocks.append(self.open)
            events.append(("start", len(self.blocks) - 1, self.open))
        self.open["text"] += text
        return events + [("delta", len(self.blocks) - 1, text)]

    def _close(self) -> list[tuple]:
        if self.open is None:
            return []
        block, self.open = self.open, None
        return [("stop", len(self.blocks) - 1, block)]

    @property
    def tokens(self) -> int:
        return self.choice.tokens

    @property
    def reasoning_tokens(self) -> int:
        return self.choice.thought.count
