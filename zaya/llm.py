"""The Python API: ``load`` a checkpoint as an ``LLM`` and generate, stream, chat or solve with it.

``LLM`` puts text and chat templates on top of the token-level ``Engine`` and runs Markovian RSA
on itself (``solve``, zaya.rsa). It sits above rsa: rsa drives an LLM through the methods its
``LocalBackend`` calls and never imports this module.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterator

import torch

from zaya import rsa
from zaya.chat import DEFAULT_CHAT_TEMPLATE, generation_starts_in_reasoning, parse_assistant, render_chat
from zaya.checkpoint import load_model, load_tokenizer, resolve
from zaya.engine import Completion, Engine, PagedCache, Request, SpecStats, TokenEvent, compiled, parse_memory
from zaya.engine.cache import CACHE_FLAGS, pool_blocks
from zaya.errors import CheckpointError, ContextLengthError, ZayaError
from zaya.grammar import REASONING_EFFORT, make_guide, schema_of_response_format
from zaya.rsa.fit import fit_for_model
from zaya.sampling import SamplingParams, fit_max_new_tokens
from zaya.tokenizer import Tokenizer

DEFAULT_MODEL = Path(__file__).parent / "assets" / "zaya-tiny"
# Per-step token budget of generate() and stream(): a batch call waits for all its sequences, so
# admitting waiting prompts in bigger prefill forwards (several per forward) beats keeping each
# step short for the running rows (the server keeps 512). 2048 measured fastest of 512..8192 on
# 128 RSA-round-shaped prompts (docs/speculative.md).
BATCH_STEP_TOKENS = 2048

# generate / stream / chat keywords that constrain the output rather than sample it
_CONSTRAINT_ARGS = ("response_format", "json_schema", "thinking_budget", "tools", "tool_choice",
                    "parallel_tool_calls")

_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "fp32": torch.float32, "float32": torch.float32}


def parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ZayaError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def load(model: str | Path | None = None, *, dtype=None, device=None, quantize: str | None = None,
         max_context: int | None = None, adapter: str | Path | None = None, cache_memory=None,
         prefix_caching: bool = True, compile: str | None = None) -> LLM:
    """Load a ZAYA checkpoint (a local directory or a hub repo id) as an `LLM`.

    With no ``model``, the small built-in model that ships with zaya is loaded (no download).
    ``dtype`` defaults to the checkpoint's; ``quantize`` is ``"int8"`` or ``"int4"`` (weight-only).
    ``adapter`` (a directory or hub repo id with a LoRA adapter in PEFT's format) is applied
    unmerged; the tokenizer and chat template come from it when it carries them (a checkpoint of
    ``zaya train`` does), else from the base.
    ``cache_memory`` is the KV cache budget (bytes, or a size such as ``"4GiB"``; default: from
    the free memory and the model, see docs/server.md); ``prefix_caching=False`` turns off the
    reuse of cached prompt prefixes. ``compile`` is ``"auto"``, ``"on"`` or ``"off"``: whether
    decode steps run as compiled graphs (zaya.engine.compiled; unset: ``ZAYA_COMPILE``, else
    ``"auto"``, which today is eager; docs/performance.md, "Compiled decode step").
    """
    if model is None:
        if not (DEFAULT_MODEL / "config.json").is_file():
            raise CheckpointError(f"the built-in model is not installed at {DEFAULT_MODEL}; pass a model path")
        model = DEFAULT_MODEL
    path = resolve(model)
    extra = resolve(adapter) if adapter is not None else None
    net, config, layout = load_model(path, dtype=parse_dtype(dtype), device=device, quantize=quantize, adapter=extra)
    # an adapter directory's own tokenizer wins (it may add tokens); else the checkpoint's
    tokenizer = Tokenizer.from_dir(extra) if extra is not None and (extra / "tokenizer.json").is_file() \
        else load_tokenizer(path)
    # the prefix cache's identity: anything that changes a token's keys and values
    identity = f"{path}|{layout}|{quantize or config.quantization}|{extra}"
    return LLM(net, tokenizer, path=path, layout=layout, max_context=max_context, cache_memory=cache_memory,
               prefix_caching=prefix_caching, identity=identity, compile=compile)


class LLM:
    """A loaded model with its tokenizer: `generate`, `stream`, `chat`, `logits`, `solve`."""

    def __init__(self, model, tokenizer=None, *, path=None, layout: str = "native", max_context: int | None = None,
                 cache_memory=None, prefix_caching: bool = True, identity: str | None = None,
                 compile: str | None = None):
        self.model, self.tokenizer, self.path, self.layout = model, tokenizer, path, layout
        compiled.resolve(compile)  # a bad value fails here, not at the first request
        self.compile_setting = compile
        self.config = model.config
        self.max_context = max_context or self.config.max_position_embeddings
        self.cache_memory = parse_memory(cache_memory)
        if self.cache_memory is not None:  # a budget too small fails here, not at the first request
            pool_blocks(self.config, self._cache_dtype(), self.cache_memory)
        self.prefix_caching = prefix_caching
        self.identity = identity if identity is not None else f"{path}|{layout}"
        self._cache: PagedCache | None = None
        self.spec_stats = SpecStats()   # decode work of every engine of this LLM

    def __repr__(self) -> str:
        return f"LLM({self.path or 'in-memory'}, layers={self.config.num_hidden_layers}, layout={self.layout})"

    # -- raw logits -----------------------------------------------------------------------------
    @torch.inference_mode()
    def logits(self, input_ids, attention_mask=None) -> torch.Tensor:
        ids = torch.as_tensor(input_ids, dtype=torch.long)
        if ids.dim() == 1:
            ids = ids[None]
        mask = None if attention_mask is None else torch.as_tensor(attention_mask, dtype=torch.long)
        device = next(self.model.parameters()).device
        return self.model(ids.to(device), attention_mask=None if mask is None else mask.to(device),
                          logits_dtype=torch.float32)

    # -- generation -----------------------------------------------------------------------------
    def _requests(self, prompts, kwargs) -> list[Request]:
        """One Request per prompt. An unset ``max_new_tokens`` runs up to the context's end, at most
        ``DEFAULT_MAX_NEW_TOKENS`` (``fit_max_new_tokens``), so it can differ between prompts."""
        kwargs = dict(kwargs)
        constraint = {k: kwargs.pop(k) for k in _CONSTRAINT_ARGS if k in kwargs}
        seeds = kwargs.pop("seed") if isinstance(kwargs.get("seed"), (list, tuple)) else None
        params = SamplingParams.from_kwargs(**kwargs)
        requested = kwargs.get("max_new_tokens")
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise ZayaError("no prompts given")
        if seeds is not None and len(seeds) != len(prompts):
            raise ZayaError(f"seed: {len(seeds)} seeds for {len(prompts)} prompts; give one per prompt or one int")
        for s in seeds or ():
            dataclasses.replace(params, seed=s).validate()
        out = []
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, str):
                if self.tokenizer is None:
                    raise ZayaError("this model has no tokenizer: pass token-id lists instead of strings")
                ids = self.tokenizer.encode_prompt(prompt)
            else:
                ids = [int(t) for t in prompt]
            budget = self._fit(len(ids), requested)
            guide = self.guide(ids, max_new_tokens=budget, **constraint) if constraint else None
            seed = params.seed if seeds is None else seeds[i]
            out.append(Request(ids, dataclasses.replace(params, seed=seed, max_new_tokens=budget, constraint=guide), i))
        return out

    def _fit(self, prompt_len: int, requested: int | None) -> int:
        """``fit_max_new_tokens`` within the context and what the KV cache budget holds."""
        limit = min(self.max_context, self.cache.sequence_limit)
        try:
            return fit_max_new_tokens(prompt_len, limit, requested)
        except ContextLengthError as exc:
            if limit < self.max_context:
                raise ContextLengthError(f"{exc} (the KV cache budget of {self.cache.memory / 2**20:,.1f} MiB holds "
                                         f"{limit:,} tokens; raise {CACHE_FLAGS})") from None
            raise

    @property
    def cache(self) -> PagedCache:
        """The paged KV cache every engine of this LLM shares (built on first use), so a prefix
        computed by one call is reused by the next."""
        if self._cache is None:
            device = next(self.model.parameters()).device
            self._cache = PagedCache(self.config, dtype=self._cache_dtype(), device=device, memory=self.cache_memory,
                                     max_context=self.max_context, identity=self.identity,
                                     prefix_caching=self.prefix_caching)
        return self._cache

    @property
    def compile(self) -> compiled.Decision:
        """Whether this LLM's decode steps run compiled, and why."""
        return compiled.decide(self.compile_setting, next(self.model.parameters()).device)

    def _cache_dtype(self) -> torch.dtype:
        param = next(self.model.parameters())
        return param.dtype if param.is_floating_point() else torch.bfloat16

    def guide(self, prompt_ids, *, response_format=None, json_schema=None, thinking_budget=None, tools=None,
              tool_choice="auto", parallel_tool_calls=True, max_new_tokens=None):
        """The constraint (zaya.grammar) for a prompt: ``json_schema`` (or an OpenAI
        ``response_format``) and ``tool_choice`` ("auto", "none", "required" or {"name": NAME})
        shape the answer, after ``</think>`` when the prompt leaves a think block open;
        ``thinking_budget`` caps the reasoning tokens, then ``</think>`` is forced."""
        schema = json_schema if json_schema is not None else schema_of_response_format(response_format)
        if schema is None and thinking_budget is None and tool_choice in (None, "auto"):
            return None
        if self.tokenizer is None:
            raise ZayaError("constrained decoding needs a tokenizer")
        starts = generation_starts_in_reasoning(self.tokenizer.decode(list(prompt_ids)[-16:]))
        return make_guide(self.tokenizer, self.config.vocab_size, starts_in_reasoning=starts,
                          thinking_budget=thinking_budget, schema=schema, tools=tools,
                          tool_choice=tool_choice or "auto", parallel_tool_calls=parallel_tool_calls,
                          max_new_tokens=max_new_tokens)

    def engine(self, **kwargs) -> Engine:
        """An engine over this LLM's shared cache (the server's scheduler owns one)."""
        kwargs.setdefault("max_context", self.max_context)
        kwargs.setdefault("stats", self.spec_stats)
        kwargs.setdefault("compile", self.compile_setting)
        return Engine(self.model, self.tokenizer, cache=self.cache, **kwargs)

    def generate(self, prompts, **sampling) -> list[Completion]:
        """One Completion per prompt and sample, prompt-major (see docs/architecture.md)."""
        requests = self._requests(prompts, sampling)
        for _ in self.engine(step_tokens=BATCH_STEP_TOKENS).run(requests):
            pass
        return [s.completion() for r in requests for s in r.sequences]

    def stream(self, prompts, **sampling) -> Iterator[TokenEvent]:
        yield from self.engine(step_tokens=BATCH_STEP_TOKENS).run(self._requests(prompts, sampling))

    # -- chat -----------------------------------------------------------------------------------
    def chat_template(self, tools=None) -> str:
        """The checkpoint's template (its ``tool_use`` one when tools are given and it has one, as
        transformers chooses), else zaya's default."""
        own = self.tokenizer.chat_template_for(tools) if self.tokenizer is not None else None
        return own or DEFAULT_CHAT_TEMPLATE

    def render_chat(self, messages, *, tools=None, add_generation_prompt=True, enable_thinking=None, **kwargs) -> str:
        tok = self.tokenizer
        return render_chat(self.chat_template(tools), messages, tools=tools,
                           add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking,
                           bos_token=tok.bos_token or "", eos_token=tok.eos_token or "", **kwargs)

    def apply_chat_template(self, messages, *, tools=None, add_generation_prompt=True, enable_thinking=None,
                            **kwargs) -> list[int]:
        text = self.render_chat(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                enable_thinking=enable_thinking, **kwargs)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def chat(self, messages, *, enable_thinking=None, tools=None, tool_choice="auto", reasoning_effort=None,
             **sampling):
        """One assistant turn, parsed (reasoning, content, tool calls). Besides the sampling
        keywords: ``response_format`` / ``json_schema``, ``tool_choice``, ``parallel_tool_calls``,
        ``thinking_budget``, and ``reasoning_effort`` ("none" turns thinking off; "minimal" / "low"
        / "medium" / "high" set the thinking budget of ``zaya.grammar.REASONING_EFFORT``)."""
        if self.tokenizer is None:
            raise ZayaError("chat needs a tokenizer")
        if reasoning_effort == "none":
            enable_thinking = False
        elif reasoning_effort is not None:
            if reasoning_effort not in REASONING_EFFORT:
                raise ZayaError(f"reasoning_effort must be none or one of {', '.join(REASONING_EFFORT)}")
            sampling.setdefault("thinking_budget", REASONING_EFFORT[reasoning_effort])
        text = self.render_chat(messages, tools=tools, enable_thinking=enable_thinking)
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        completion = self.generate([ids], tools=tools, tool_choice=tool_choice, **sampling)[0]
        parse = tools if tool_choice != "none" else None
        result = parse_assistant(completion.text, generation_starts_in_reasoning(text), tools=parse)
        result.completion = completion
        return result

    # -- test-time compute ----------------------------------------------------------------------
    def solve(self, problem, profile: str | None = None, **overrides):
        """Markovian RSA on this model (see zaya.rsa for the profiles and parameters).

        The profile's budget and tail shrink to fit this model's context; a ``budget`` or ``tail``
        given here that cannot fit is an error (``zaya.rsa.fit``). A profile given as an
        ``RSAConfig`` counts as given in full.
        """
        fields = {f.name for f in dataclasses.fields(rsa.RSAConfig)}
        settings = {k: v for k, v in overrides.items() if k in fields}
        explicit = {k for k, v in settings.items() if v is not None}
        if isinstance(profile, rsa.RSAConfig):
            explicit |= {"budget", "tail"}
        cfg = fit_for_model(self, problem, rsa.make_config(profile, **settings), overrides.get("template"), explicit)
        rest = {k: v for k, v in overrides.items() if k not in fields}
        return rsa.solve(rsa.LocalBackend(self), problem, profile=cfg, **rest)
