"""From a validated request to what the scheduler needs: token ids and `SamplingParams`.

Runs in a worker thread (templating and tokenizing a large prompt takes a while). Anything the
client got wrong raises a 400 `ApiError`.
"""

from __future__ import annotations

from dataclasses import dataclass

from zaya.chat import THINK_CLOSE, generation_starts_in_reasoning
from zaya.errors import ZayaError
from zaya.grammar import REASONING_EFFORT, GrammarError, make_guide, schema_of_response_format
from zaya.sampling import SamplingParams
from zaya.server.protocol import MAX_TOP_LOGPROBS, ChatCompletionRequest, CompletionRequest, bad_request, sampling_params

_TEMPLATE_RESERVED = {"messages", "tools", "documents", "add_generation_prompt", "bos_token", "eos_token",
                      "template", "enable_thinking"}


@dataclass
class ChatPrep:
    ids: list[int]
    text: str
    params: SamplingParams
    tools: list[dict] | None
    parse_tools: bool
    starts_in_reasoning: bool


@dataclass
class CompletionPrep:
    items: list[tuple[list[int], SamplingParams]]
    logprobs: bool


def chat_messages(req: ChatCompletionRequest) -> list[dict]:
    messages = []
    for i, m in enumerate(req.messages):
        d = m.model_dump(exclude_none=True)
        if d["role"] == "developer":  # OpenAI's newer name for the system role
            d["role"] = "system"
        if isinstance(d.get("content"), list):
            for part in d["content"]:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise bad_request(f"messages.{i}.content: only text parts are supported "
                                      f"(got type {part.get('type')!r})", param=f"messages.{i}.content")
        messages.append(d)
    return messages


def template_kwargs(req: ChatCompletionRequest) -> tuple[bool | None, dict]:
    kwargs = dict(req.chat_template_kwargs or {})
    thinking = kwargs.pop("enable_thinking", None)
    if thinking is not None and not isinstance(thinking, bool):
        raise bad_request("chat_template_kwargs.enable_thinking must be a boolean",
                          param="chat_template_kwargs.enable_thinking")
    for key in kwargs:
        if not key.isidentifier() or key in _TEMPLATE_RESERVED:
            raise bad_request(f"chat_template_kwargs may not set {key!r}", param="chat_template_kwargs")
    return thinking, kwargs


def render(llm, messages, tools, thinking, kwargs) -> str:
    try:
        return llm.render_chat(messages, tools=tools, enable_thinking=thinking, **kwargs)
    except ZayaError as exc:
        raise bad_request(f"cannot render these messages: {exc}", param="messages") from None
    except Exception as exc:  # noqa: BLE001 - odd message shapes break templates in odd ways
        raise bad_request(f"the chat template cannot render these messages ({type(exc).__name__}: {exc})",
                          param="messages") from None


def prepare_chat(state, req: ChatCompletionRequest) -> ChatPrep:
    llm = state.llm
    if llm.tokenizer is None:
        raise bad_request("this model has no tokenizer: use /v1/completions with token ids")
    if req.top_logprobs is not None:
        if not req.logprobs:
            raise bad_request("top_logprobs needs logprobs: true", param="top_logprobs")
        if not 0 <= req.top_logprobs <= MAX_TOP_LOGPROBS:
            raise bad_request(f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}", param="top_logprobs")
    messages = chat_messages(req)
    thinking, kwargs = template_kwargs(req)
    budget, thinking = thinking_settings(state, req, thinking)
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
    text = render(llm, messages, tools, thinking, kwargs)
    ids = llm.tokenizer.encode(text, add_special_tokens=False)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    params = sampling_params(req, len(ids), state.max_context, max_tokens=max_tokens, logprobs=req.logprobs,
                             top_logprobs=req.top_logprobs or 0, max_n=state.max_n,
                             context_note=state.context_note)
    starts = generation_starts_in_reasoning(text)
    params.constraint = guide(state, req, tools, starts, budget, params.max_new_tokens)
    parse_tools = bool(tools) and req.tool_choice != "none"
    return ChatPrep(ids, text, params, tools, parse_tools, starts)


def prepare_final(state, req: ChatCompletionRequest, answer: str) -> ChatPrep:
    """The formatting pass after a Markovian RSA run: the request's own prompt with the selected
    candidate's ``answer`` as the (closed) think block, then an answer under the request's
    response_format / tools / tool_choice."""
    llm = state.llm
    thinking, kwargs = template_kwargs(req)
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
    text = render(llm, chat_messages(req), tools, thinking, kwargs)
    if generation_starts_in_reasoning(text):
        text += f"{answer.strip()}\n{THINK_CLOSE}\n\n"
    ids = llm.tokenizer.encode(text, add_special_tokens=False)
    params = sampling_params(req.model_copy(update={"n": 1}), len(ids), state.max_context, max_tokens=None,
                             logprobs=False, top_logprobs=0, max_n=1)
    params.constraint = guide(state, req, tools, False, None, params.max_new_tokens)
    return ChatPrep(ids, text, params, tools, bool(tools) and req.tool_choice != "none", False)


def thinking_settings(state, req, thinking: bool | None) -> tuple[int | None, bool | None]:
    """(thinking budget, enable_thinking) from ``thinking_budget``, ``reasoning_effort`` and the
    server's default budget; ``reasoning_effort: "none"`` turns thinking off in the template."""
    effort = req.reasoning_effort
    if effort is not None and effort != "none" and effort not in REASONING_EFFORT:
        raise bad_request(f"reasoning_effort must be one of none, {', '.join(REASONING_EFFORT)}; got {effort!r}",
                          param="reasoning_effort")
    if req.thinking_budget is not None and req.thinking_budget < 0:
        raise bad_request(f"thinking_budget must be >= 0, got {req.thinking_budget}", param="thinking_budget")
    if effort == "none" and thinking is None:
        thinking = False
    if req.thinking_budget is not None:
        return req.thinking_budget, thinking
    return REASONING_EFFORT.get(effort, state.config.thinking_budget), thinking


def tool_choice_of(req) -> str | dict:
    """OpenAI's tool_choice as zaya.grammar takes it: "auto", "none", "required" or {"name": NAME}."""
    choice = req.tool_choice
    if choice is None:
        return "auto"
    if isinstance(choice, str):
        return choice
    name = choice.function.get("name")
    if not isinstance(name, str) or not name:
        raise bad_request("tool_choice.function.name must be a function name", param="tool_choice")
    return {"name": name}


def guide(state, req, tools, starts_in_reasoning: bool, budget: int | None, max_new_tokens: int):
    """The request's constraint (response_format, tool_choice, thinking budget), or None."""
    try:
        schema = schema_of_response_format(req.response_format)
    except GrammarError as exc:
        raise bad_request(str(exc), param="response_format") from None
    choice = tool_choice_of(req)
    if choice not in ("auto", "none") and not tools:
        raise bad_request("tool_choice asks for a tool call but the request has no tools", param="tool_choice")
    try:
        return make_guide(state.llm.tokenizer, state.llm.config.vocab_size, starts_in_reasoning=starts_in_reasoning,
                          thinking_budget=budget, schema=schema, tools=tools, tool_choice=choice,
                          parallel_tool_calls=req.parallel_tool_calls, max_new_tokens=max_new_tokens)
    except GrammarError as exc:
        raise bad_request(str(exc), param="response_format" if exc.field == "schema" else exc.field) from None


def prepare_completion(state, req: CompletionRequest) -> CompletionPrep:
    llm = state.llm
    if req.echo:
        raise bad_request("echo is not supported", param="echo")
    if req.suffix:
        raise bad_request("suffix is not supported", param="suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise bad_request("best_of is not supported (use n)", param="best_of")
    if req.logprobs is not None and not 0 <= req.logprobs <= MAX_TOP_LOGPROBS:
        raise bad_request(f"logprobs must be between 0 and {MAX_TOP_LOGPROBS}", param="logprobs")
    prompt = req.prompt
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt:
        raise bad_request("prompt is empty", param="prompt")
    if len(prompt) > state.config.max_prompts:
        raise bad_request(f"at most {state.config.max_prompts} prompts per request", param="prompt")
    vocab = llm.config.vocab_size
    items = []
    for p in prompt:
        if isinstance(p, str):
            if llm.tokenizer is None:
                raise bad_request("this model has no tokenizer: send token ids", param="prompt")
            ids = llm.tokenizer.encode_prompt(p)
        else:
            ids = list(p)
            if any(not 0 <= t < vocab for t in ids):
                raise bad_request(f"prompt token ids must be in [0, {vocab})", param="prompt")
        if not ids:
            raise bad_request("prompt is empty", param="prompt")
        params = sampling_params(req, len(ids), state.max_context, max_tokens=req.max_tokens,
                                 logprobs=req.logprobs is not None, top_logprobs=req.logprobs or 0,
                                 max_n=state.max_n, context_note=state.context_note)
        items.append((ids, params))
    return CompletionPrep(items, req.logprobs is not None)
