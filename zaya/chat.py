"""Chat templates, the `<think>` reasoning split and ZAYA's XML tool calls.

Text in, text out: nothing here knows about the model or token ids. A chat prompt rendered by
`render_chat` already contains `<bos>`, so encode it with `add_special_tokens=False`.

ZAYA1 is served with vLLM's `qwen3` reasoning parser (`<think>...</think>` then content) and
Zyphra's `zaya_xml` tool parser (`<zyphra_tool_call><function=NAME><parameter=ARG>value</parameter>
</function></zyphra_tool_call>`); the parsers here follow those formats.
"""

from __future__ import annotations

import copy
import json
import re
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from zaya.errors import ZayaError

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<zyphra_tool_call>", "</zyphra_tool_call>"

# -- templates --------------------------------------------------------------------------------

DEFAULT_CHAT_TEMPLATE = r"""{%- macro value(v) -%}
{%- if v is string -%}{{ v }}{%- else -%}{{ v | tojson }}{%- endif -%}
{%- endmacro -%}
{{- bos_token -}}
{%- set msgs = messages -%}
{%- set system = none -%}
{%- if msgs and msgs[0].role == 'system' -%}
{%- set system = msgs[0].content -%}
{%- set msgs = msgs[1:] -%}
{%- endif -%}
{%- if system or tools -%}
{{- '<start_of_turn>system\n' -}}
{%- if system -%}{{- system | trim -}}{%- endif -%}
{%- if tools -%}
{%- if system -%}{{- '\n\n' -}}{%- endif -%}
{{- '# Tools\n\nYou may call these functions (JSON schemas):\n<tools>\n' -}}
{%- for tool in tools -%}{{- tool | tojson -}}{{- '\n' -}}{%- endfor -%}
{{- '</tools>\n\nTo call a function, reply with:\n<zyphra_tool_call>\n<function=NAME>\n<parameter=ARGUMENT>\nVALUE\n</parameter>\n</function>\n</zyphra_tool_call>' -}}
{%- endif -%}
{{- '<end_of_turn>\n' -}}
{%- endif -%}
{%- set ns = namespace(last_user=-1) -%}
{%- for m in msgs -%}{%- if m.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}{%- endfor -%}
{%- for m in msgs -%}
{%- if m.role == 'user' or m.role == 'system' -%}
{{- '<start_of_turn>' + m.role + '\n' + (m.content or '') | trim + '<end_of_turn>\n' -}}
{%- elif m.role == 'assistant' -%}
{{- '<start_of_turn>model\n' -}}
{%- if m.reasoning_content and loop.index0 > ns.last_user -%}
{{- '<think>\n' + m.reasoning_content | trim + '\n</think>\n\n' -}}
{%- endif -%}
{%- if m.content -%}{{- m.content | trim -}}{%- endif -%}
{%- for call in m.tool_calls or [] -%}
{%- set f = call.function if call.function is defined else call -%}
{%- if loop.first and m.content -%}{{- '\n' -}}{%- endif -%}
{{- '<zyphra_tool_call>\n<function=' + f.name + '>\n' -}}
{%- if f.arguments is mapping -%}
{%- for k, v in f.arguments.items() -%}
{{- '<parameter=' + k + '>\n' + value(v) + '\n</parameter>\n' -}}
{%- endfor -%}
{%- elif f.arguments -%}{{- f.arguments + '\n' -}}
{%- endif -%}
{{- '</function>\n</zyphra_tool_call>' -}}
{%- if not loop.last -%}{{- '\n' -}}{%- endif -%}
{%- endfor -%}
{{- '<end_of_turn>\n' -}}
{%- elif m.role == 'tool' -%}
{%- if loop.first or loop.previtem.role != 'tool' -%}{{- '<start_of_turn>tool\n' -}}{%- endif -%}
{{- '<zyphra_tool_response>\n' + value(m.content) + '\n</zyphra_tool_response>' -}}
{%- if loop.last or loop.nextitem.role != 'tool' -%}{{- '<end_of_turn>\n' -}}{%- else -%}{{- '\n' -}}{%- endif -%}
{%- else -%}
{{- raise_exception('unknown message role: ' + m.role) -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<start_of_turn>model\n' -}}
{%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\n\n</think>\n\n' -}}
{%- else -%}{{- '<think>\n' -}}{%- endif -%}
{%- endif -%}"""
"""The template for zaya's own small models, which ship none. A checkpoint's own template
(`chat_template.jinja`, or `chat_template` in tokenizer_config.json) always takes precedence:
use `tokenizer.chat_template_for(tools) or DEFAULT_CHAT_TEMPLATE`.

Turns are Gemma-style, `<start_of_turn>role\n...<end_of_turn>\n` with the assistant as "model",
because ZAYA1 uses the Gemma-3 vocabulary. Tools are listed as JSON in a system turn, calls use
ZAYA's XML form, and consecutive tool results share one "tool" turn. Reasoning is rendered only
for assistant turns after the last user message, as Qwen3 templates do. With `enable_thinking`
unset or true the generation prompt opens `<think>\n`; false emits an empty think block.
"""


class _GenerationTag(jinja2.ext.Extension):
    """HF templates may wrap assistant text in `{% generation %}` (for training masks); render
    the body unchanged so such templates still load."""

    tags = frozenset({"generation"})

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML and non-ASCII; chat templates want the raw characters.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def _prepare_message(message) -> dict:
    """A plain-dict copy the template can rely on: text content parts joined, reasoning under
    `reasoning_content` (OpenAI clients send `reasoning`), and tool-call arguments as dicts
    (OpenAI sends them as JSON strings; templates iterate over them, as vLLM arranges too)."""
    m = copy.deepcopy(dict(message))
    if isinstance(m.get("content"), list):
        m["content"] = "".join(p.get("text", "") for p in m["content"] if isinstance(p, dict))
    for alias in ("reasoning", "thinking"):
        if m.get("reasoning_content") is None and m.get(alias) is not None:
            m["reasoning_content"] = m[alias]
    for call in m.get("tool_calls") or []:
        target = call.get("function", call) if isinstance(call, dict) else None
        if isinstance(target, dict) and isinstance(target.get("arguments"), str):
            try:
                parsed = json.loads(target["arguments"])
            except json.JSONDecodeError:
                continue
            if isinstance(parsed, dict):
                target["arguments"] = parsed
    return m


def render_chat(
    template: str,
    messages,
    *,
    tools=None,
    add_generation_prompt: bool = True,
    enable_thinking: bool | None = None,
    bos_token: str | None = "<bos>",
    eos_token: str | None = "<end_of_turn>",
    **kwargs,
) -> str:
    """Render `messages` with a jinja chat template, the way transformers' apply_chat_template does.

    `enable_thinking=None` leaves the variable undefined so the template's default applies. Extra
    kwargs (e.g. the tokenizer's other special tokens) become template variables; None values are
    left undefined. Template errors, including `raise_exception(...)`, raise ZayaError.
    """
    variables = {"bos_token": bos_token, "eos_token": eos_token, **kwargs}
    if enable_thinking is not None:
        variables["enable_thinking"] = enable_thinking
    variables = {k: v for k, v in variables.items() if v is not None}
    try:
        return _compile(template).render(
            messages=[_prepare_message(m) for m in messages],
            tools=list(tools) if tools else None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **variables,
        )
    except jinja2.TemplateError as e:
        raise ZayaError(f"chat template error: {e.message or e}") from e


def generation_starts_in_reasoning(prompt_text: str) -> bool:
    """True when the prompt leaves a `<think>` open, so the model's first tokens are reasoning."""
    return prompt_text.rfind(THINK_OPEN) > prompt_text.rfind(THINK_CLOSE)


# -- reasoning ----------------------------------------------------------------------------------


def split_reasoning(text: str, started_in_reasoning: bool) -> tuple[str | None, str]:
    """Split generated text into (reasoning, content), Qwen3-parser style.

    Reasoning runs from the start (when the prompt left `<think>` open) or from the first
    `<think>` up to the first `</think>`, or to the end when `</think>` never comes (the model
    ran out of tokens while thinking). Stray `<think>` tags inside reasoning are dropped. Text
    before `<think>` and after `</think>` is content. Both parts are stripped; empty reasoning
    is None.
    """
    before = ""
    if not started_in_reasoning:
        start = text.find(THINK_OPEN)
        if start < 0:
            return None, text.strip()
        before, text = text[:start], text[start + len(THINK_OPEN) :]
    end = text.find(THINK_CLOSE)
    body, after = (text, "") if end < 0 else (text[:end], text[end + len(THINK_CLOSE) :])
    return body.replace(THINK_OPEN, "").strip() or None, (before + after).strip()


def _partial_tag_len(text: str, tags) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of one of `tags`."""
    for n in range(min(len(text), max(len(t) for t in tags) - 1), 0, -1):
        if any(t.startswith(text[-n:]) for t in tags):
            return n
    return 0


class _Stripper:
    """Streams a channel as if the whole of it were `.strip()`ped: drops leading whitespace and
    holds trailing whitespace until something non-blank follows it."""

    def __init__(self):
        self.started = False
        self.pending = ""

    def push(self, text: str) -> str:
        if not self.started:
            text = text.lstrip()
            if not text:
                return ""
            self.started = True
        text = self.pending + text
        kept = text.rstrip()
        self.pending = text[len(kept) :]
        return kept


class ReasoningParser:
    """Streaming `split_reasoning`: `feed(delta) -> (reasoning_delta, content_delta)`, then
    `flush()`. Partial tags are held back across deltas; the concatenated output equals
    `split_reasoning` of the concatenated input, however it was split."""

    def __init__(self, started_in_reasoning: bool):
        self.state = "reasoning" if started_in_reasoning else "before"
        self.buffer = ""
        self._reasoning, self._content = _Stripper(), _Stripper()

    def feed(self, delta: str) -> tuple[str, str]:
        self.buffer += delta
        reasoning, content = [], []
        while self.buffer:
            if self.state == "after":  # no tags matter any more
                content.append(self.buffer)
                self.buffer = ""
                break
            tags = (THINK_OPEN, THINK_CLOSE) if self.state == "reasoning" else (THINK_OPEN,)
            channel = reasoning if self.state == "reasoning" else content
            hits = [(i, t) for t in tags if (i := self.buffer.find(t)) >= 0]
            if not hits:
                emit = len(self.buffer) - _partial_tag_len(self.buffer, tags)
                channel.append(self.buffer[:emit])
                self.buffer = self.buffer[emit:]
                break
            i, tag = min(hits)
            channel.append(self.buffer[:i])
            self.buffer = self.buffer[i + len(tag) :]
            if tag == THINK_CLOSE:
                self.state = "after"
            elif self.state == "before":
                self.state = "reasoning"
            # else: a stray <think> inside reasoning is dropped
        return self._reasoning.push("".join(reasoning)), self._content.push("".join(content))

    def flush(self) -> tuple[str, str]:
        """Release a held partial tag as text; trailing whitespace is dropped, as by strip()."""
        rest, self.buffer = self.buffer, ""
        if self.state == "reasoning":
            return self._reasoning.push(rest), ""
        return "", self._content.push(rest)


# -- tool calls ---------------------------------------------------------------------------------


@dataclass
class ToolCall:
    id: str
    name: str
    arguments_json: str

    @property
    def arguments(self) -> Any:
        return json.loads(self.arguments_json)


_BLOCK_RE = re.compile(re.escape(TOOL_CALL_OPEN) + r"(.*?)" + re.escape(TOOL_CALL_CLOSE), re.DOTALL)
_FUNCTION_RE = re.compile(r"<function=([^>\n]+)>(.*?)(?:</function>|\Z)", re.DOTALL)
# A parameter ends at its closing tag or, leniently, where the next parameter or the function ends.
_PARAM_RE = re.compile(r"<parameter=([^>\n]+)>(.*?)(?:</parameter>|(?=<parameter=)|\Z)", re.DOTALL)


def _param_schemas(tools, name: str) -> dict | None:
    for tool in tools or []:
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if isinstance(fn, dict) and fn.get("name") == name:
            return (fn.get("parameters") or {}).get("properties") or {}
    return None


def schema_types(schema) -> set[str]:
    """The JSON types a schema allows (through type, anyOf / oneOf, or a string enum)."""
    if not isinstance(schema, dict):
        return set()
    kind = schema.get("type")
    types = set(kind) if isinstance(kind, list) else {kind} if isinstance(kind, str) else set()
    for alt in schema.get("anyOf", []) + schema.get("oneOf", []):
        types |= schema_types(alt)
    if "enum" in schema and not types:
        types = {"string"} if all(isinstance(v, str) for v in schema["enum"]) else set()
    return types


_PY_TYPES = {"integer": int, "number": (int, float), "boolean": bool, "object": dict, "array": list,
             "null": type(None)}  # fmt: skip


def _typed_value(raw: str, schema) -> Any:
    """A parameter value typed by its JSON schema: strings stay verbatim, other types are parsed
    as JSON; a value that doesn't parse to an allowed type stays a string. Without a schema,
    whatever parses as JSON is taken as JSON."""
    types = schema_types(schema)
    if types == {"string"}:
        return raw
    try:
        value = json.loads(raw)
    except ValueError:
        if "boolean" in types and raw.strip().lower() in ("true", "false"):
            return raw.strip().lower() == "true"
        return raw
    if not types - {"string"}:  # no schema, or a schema without types
        return value
    allowed = tuple(_PY_TYPES[t] for t in types if t in _PY_TYPES)
    ok = isinstance(value, allowed) and not (isinstance(value, bool) and "boolean" not in types)
    return value if ok else raw


def _strip_one_newline(value: str) -> str:
    return value.removeprefix("\n").removesuffix("\n")


def _parse_block(body: str, tools) -> list[tuple[str, dict]] | None:
    """The calls in one `<zyphra_tool_call>` body, or None when it is malformed."""
    stripped = body.strip()
    if stripped.startswith("{"):  # the JSON form: {"name": ..., "arguments": {...} or "{...}"}
        try:
            obj = json.loads(stripped)
            args = obj.get("arguments", obj.get("parameters", {}))
            args = json.loads(args) if isinstance(args, str) else args
        except ValueError:
            return None
        if not isinstance(obj.get("name"), str) or not isinstance(args, dict):
            return None
        return [(obj["name"], args)]
    calls = []
    for fn in _FUNCTION_RE.finditer(body):
        name = fn.group(1).strip()
        schemas = _param_schemas(tools, name) or {}
        args = {
            p.group(1).strip(): _typed_value(_strip_one_newline(p.group(2)), schemas.get(p.group(1).strip()))
            for p in _PARAM_RE.finditer(fn.group(2))
        }
        calls.append((name, args))
    return calls or None


def parse_tool_calls(content: str, tools=None) -> tuple[str, list[ToolCall]]:
    """Extract ZAYA XML tool calls: `(remaining_content, calls)`. Never raises: a malformed or
    unterminated call stays in the content as text. Remaining content is stripped."""
    calls: list[ToolCall] = []
    kept: list[str] = []
    pos = 0
    for block in _BLOCK_RE.finditer(content):
        parsed = _parse_block(block.group(1), tools)
        if parsed is None:
            continue
        kept.append(content[pos : block.start()])
        pos = block.end()
        for name, args in parsed:
            calls.append(ToolCall(f"call_{uuid.uuid4().hex[:24]}", name, json.dumps(args, ensure_ascii=False)))
    kept.append(content[pos:])
    return "".join(kept).strip(), calls


class ToolCallStreamer:
    """For streaming content: `feed(delta)` returns the text that is safe to show now, holding
    back everything from the first `<zyphra_tool_call>` on (and trailing whitespace or a partial
    tag, which may still turn into one). `finish()` returns `(tail, calls)` such that the shown
    text + tail == `parse_tool_calls(all content)[0]`."""

    def __init__(self, tools=None):
        self.tools = tools
        self.text = ""
        self.released = 0  # text[:released] went through the stripper
        self.shown = 0  # characters returned so far
        self.holding = False
        self._stripper = _Stripper()

    def feed(self, delta: str) -> str:
        search_from = max(0, len(self.text) - len(TOOL_CALL_OPEN) + 1)
        self.text += delta
        if self.holding:
            return ""
        cut = self.text.find(TOOL_CALL_OPEN, search_from)
        self.holding = cut >= 0
        end = cut if self.holding else len(self.text) - _partial_tag_len(self.text, (TOOL_CALL_OPEN,))
        out = self._stripper.push(self.text[self.released : end])
        self.released = end
        self.shown += len(out)
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        remaining, calls = parse_tool_calls(self.text, self.tools)
        return remaining[self.shown :], calls


# -- combined -----------------------------------------------------------------------------------


@dataclass
class ChatResult:
    reasoning: str | None
    content: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    completion: Any = None  # the engine's Completion, when there is one


def parse_assistant(text: str, started_in_reasoning: bool, tools=None) -> ChatResult:
    """Reasoning split, then tool calls parsed from the content (calls inside reasoning are the
    model thinking aloud, not calls)."""
    reasoning, content = split_reasoning(text, started_in_reasoning)
    content, calls = parse_tool_calls(content, tools)
    return ChatResult(reasoning=reasoning, content=content, tool_calls=calls)
