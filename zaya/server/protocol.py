"""Request bodies of the OpenAI-compatible routes, and the errors the server answers with.

Bodies are validated strictly (a string is not a number, a number is not a string) with
pydantic; unknown fields are ignored, as OpenAI-compatible servers do. Every problem with client
input becomes an `ApiError` with a 4xx status and OpenAI's error JSON:
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from zaya.errors import ContextLengthError, ZayaError
from zaya.sampling import SamplingParams, fit_max_new_tokens

DEFAULT_MAX_TOKENS = 4096  # when a request sets none (capped by the context left after the prompt)
MAX_TOP_LOGPROBS = 20


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False


class FunctionDef(_Body):
    model_config = ConfigDict(extra="allow", strict=True)
    name: str = Field(min_length=1, max_length=256)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(_Body):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedToolChoice(_Body):
    type: Literal["function"] = "function"
    function: dict[str, Any]


class ChatMessage(_Body):
    model_config = ConfigDict(extra="allow", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[dict[str, Any]], None] = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None


class _Generation(_Body):
    """Fields shared by chat and text completions."""

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: Union[str, list[str], None] = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # vLLM extension: generate exactly max_tokens
    speculative: Any = None  # prompt-lookup drafting: true/false or the longest draft (checked by SamplingParams)
    user: str | None = None


class ChatCompletionRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Tool] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    thinking_budget: int | None = None
    reasoning_effort: str | None = None
    rsa: Union[bool, dict[str, Any], None] = None


class CompletionRequest(_Generation):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None
    rsa: Union[bool, dict[str, Any], None] = None


class TokenizeRequest(_Body):
    """vLLM's /tokenize: a raw ``prompt``, or chat ``messages`` rendered with the template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    tools: list[Tool] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]


def parse(model: type[BaseModel], body: bytes):
    """Validate a raw body: malformed JSON and wrong types become a 400 naming the field."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        if err["type"] == "json_invalid":
            raise bad_request(f"malformed JSON body: {err.get('ctx', {}).get('error', err['msg'])}") from None
        if err["type"] == "model_type" or not err["loc"]:
            raise bad_request("the body must be a JSON object") from None
        param = ".".join(str(p) for p in err["loc"])
        extra = f" (and {exc.error_count() - 1} more problem(s))" if exc.error_count() > 1 else ""
        raise bad_request(f"{param}: {err['msg']}{extra}", param=param) from None
    except (RecursionError, ValueError) as exc:
        raise bad_request(f"cannot parse the body: {exc}") from None


def sampling_params(req: _Generation, prompt_len: int, max_context: int, *, max_tokens: int | None,
                    logprobs: bool, top_logprobs: int, max_n: int, context_note: str = "") -> SamplingParams:
    """SamplingParams for a request, with OpenAI-style errors for bad values and context overflow
    (``context_note`` says why the context is what it is, e.g. the cache budget)."""
    if req.n < 1 or req.n > max_n:
        raise bad_request(f"n must be between 1 and {max_n} on this server, got {req.n}", param="n")
    if max_tokens is not None and max_tokens < 1:
        raise bad_request(f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
    if req.seed is not None and not -2**63 <= req.seed < 2**64:
        raise bad_request("seed must fit in 64 bits", param="seed")
    try:
        max_tokens = fit_max_new_tokens(prompt_len, max_context, max_tokens, default=DEFAULT_MAX_TOKENS,
                                        name="max_tokens")
    except ContextLengthError as exc:
        raise bad_request(f"{exc}{context_note}", param="messages" if prompt_len >= max_context else "max_tokens",
                          code="context_length_exceeded") from None
    try:
        return SamplingParams.from_kwargs(
            max_new_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
            min_p=req.min_p, repetition_penalty=req.repetition_penalty, presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty, seed=req.seed, stop=req.stop, n=req.n,
            ignore_eos=req.ignore_eos, logprobs=logprobs, top_logprobs=top_logprobs, speculative=req.speculative)
    except ContextLengthError as exc:
        raise bad_request(str(exc), code="context_length_exceeded") from None
    except (ZayaError, TypeError) as exc:
        raise bad_request(str(exc), param=_param_of(str(exc))) from None


_PARAMS = {"max_new_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
           "min_p": "min_p", "repetition_penalty": "repetition_penalty", "presence_penalty": "presence_penalty",
           "frequency_penalty": "frequency_penalty", "seed": "seed", "stop": "stop", "n": "n",
           "top_logprobs": "top_logprobs", "speculative": "speculative"}


def _param_of(message: str) -> str | None:
    words = message.replace(",", " ").split()
    return next((_PARAMS[w] for w in words if w in _PARAMS), None)
