"""The Python API: ``load`` a checkpoint as an ``LLM`` and generate, stream, chat or solve with it.

``LLM`` puts text and chat templates on top of the token-level ``Engine`` and runs Markovian RSA
on itself (``solve``, zaya.rsa). It sits above rsa: rsa drives an LLM through the methods its
``LocalBackend`` calls and never imports this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

from zaya import rsa
from zaya.chat import DEFAULT_CHAT_TEMPLATE, generation_starts_in_reasoning, parse_assistant, render_chat
from zaya.checkpoint import load_model, resolve
from zaya.engine import Completion, Engine, PagedCache, Request, SpecStats, TokenEvent, parse_memory
from zaya.errors import CheckpointError, ZayaError
from zaya.sampling import SamplingParams
from zaya.tokenizer import Tokenizer

DEFAULT_MODEL = Path(__file__).parent / "assets" / "zaya-tiny"

_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "fp32": torch.float32, "float32": torch.float32}


def parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ZayaError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def load(model: str | Path | None = None, *, dtype=None, device=None, quantize: str | None = None,
         max_context: int | None = None, cache_memory=None, prefix_caching: bool = True) -> LLM:
    """Load a ZAYA checkpoint (a local directory or a hub repo id) as an `LLM`.

    With no ``model``, the small built-in model that ships with zaya is loaded (no download).
    ``dtype`` defaults to the checkpoint's; ``quantize`` is ``"int8"`` or ``"int4"`` (weight-only).
    ``cache_memory`` is the KV cache budget (bytes, or a size such as ``"4GiB"``; default: from
    the free memory and the model, see docs/engine.md); ``prefix_caching=False`` turns off the
    reuse of cached prompt prefixes.
    """
    if model is None:
        if not (DEFAULT_MODEL / "config.json").is_file():
            raise CheckpointError(f"the built-in model is not installed at {DEFAULT_MODEL}; pass a model path")
        model = DEFAULT_MODEL
    path = resolve(model)
    net, config, layout = load_model(path, dtype=parse_dtype(dtype), device=device, quantize=quantize)
    tokenizer = Tokenizer.from_dir(path) if (path / "tokenizer.json").is_file() else None
    return LLM(net, tokenizer, path=path, layout=layout, max_context=max_context, cache_memory=cache_memory,
               prefix_caching=prefix_caching, identity=f"{path}|{layout}|{quantize or config.quantization}")


class LLM:
    """A loaded model with its tokenizer: `generate`, `stream`, `chat`, `logits`, `solve`."""

    def __init__(self, model, tokenizer=None, *, path=None, layout: str = "native", max_context: int | None = None,
                 cache_memory=None, prefix_caching: bool = True, identity: str | None = None):
        self.model, self.tokenizer, self.path, self.layout = model, tokenizer, path, layout
        self.config = model.config
        self.max_context = max_context or self.config.max_position_embeddings
        self.cache_memory = parse_memory(cache_memory)
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
        return self.model(ids.to(device), attention_mask=None if mask is None else mask.to(device)).float()

    # -- generation -----------------------------------------------------------------------------
    def _requests(self, prompts, kwargs) -> list[Request]:
        params = SamplingParams.from_kwargs(**kwargs)
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise ZayaError("no prompts given")
        out = []
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, str):
                if self.tokenizer is None:
                    raise ZayaError("this model has no tokenizer: pass token-id lists instead of strings")
                ids = self.tokenizer.encode_prompt(prompt)
            else:
                ids = [int(t) for t in prompt]
            out.append(Request(ids, params, i))
        return out

    @property
    def cache(self) -> PagedCache:
        """The paged KV cache every engine of this LLM shares (built on first use), so a prefix
        computed by one call is reused by the next."""
        if self._cache is None:
            param = next(self.model.parameters())
            self._cache = PagedCache(self.config, dtype=param.dtype if param.is_floating_point() else torch.bfloat16,
                                     device=param.device, memory=self.cache_memory, max_context=self.max_context,
                                     identity=self.identity, prefix_caching=self.prefix_caching)
        return self._cache

    def engine(self, **kwargs) -> Engine:
        """An engine over this LLM's shared cache (the server's scheduler owns one)."""
        kwargs.setdefault("max_context", self.max_context)
        kwargs.setdefault("stats", self.spec_stats)
        return Engine(self.model, self.tokenizer, cache=self.cache, **kwargs)

    def generate(self, prompts, **sampling) -> list[Completion]:
        """One Completion per prompt and sample, prompt-major (see docs/architecture.md)."""
        requests = self._requests(prompts, sampling)
        for _ in self.engine().run(requests):
            pass
        return [s.completion() for r in requests for s in r.sequences]

    def stream(self, prompts, **sampling) -> Iterator[TokenEvent]:
        yield from self.engine().run(self._requests(prompts, sampling))

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

    def chat(self, messages, *, enable_thinking=None, tools=None, **sampling):
        if self.tokenizer is None:
            raise ZayaError("chat needs a tokenizer")
        text = self.render_chat(messages, tools=tools, enable_thinking=enable_thinking)
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        completion = self.generate([ids], **sampling)[0]
        result = parse_assistant(completion.text, generation_starts_in_reasoning(text), tools=tools)
        result.completion = completion
        return result

    # -- test-time compute ----------------------------------------------------------------------
    def solve(self, problem, profile: str | None = None, **overrides):
        """Markovian RSA on this model (see zaya.rsa for the profiles and parameters)."""
        return rsa.solve(rsa.LocalBackend(self), problem, profile=profile, **overrides)
