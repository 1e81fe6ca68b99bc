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
from zaya.checkpoint import load_model, resolve
from zaya.engine import Completion, Engine, Request, TokenEvent
from zaya.errors import CheckpointError, ZayaError
from zaya.rsa.fit import fit_for_model
from zaya.sampling import SamplingParams, fit_max_new_tokens
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
         max_context: int | None = None) -> LLM:
    """Load a ZAYA checkpoint (a local directory or a hub repo id) as an `LLM`.

    With no ``model``, the small built-in model that ships with zaya is loaded (no download).
    ``dtype`` defaults to the checkpoint's; ``quantize`` is ``"int8"`` or ``"int4"`` (weight-only).
    """
    if model is None:
        if not (DEFAULT_MODEL / "config.json").is_file():
            raise CheckpointError(f"the built-in model is not installed at {DEFAULT_MODEL}; pass a model path")
        model = DEFAULT_MODEL
    path = resolve(model)
    net, config, layout = load_model(path, dtype=parse_dtype(dtype), device=device, quantize=quantize)
    tokenizer = Tokenizer.from_dir(path) if (path / "tokenizer.json").is_file() else None
    return LLM(net, tokenizer, path=path, layout=layout, max_context=max_context)


class LLM:
    """A loaded model with its tokenizer: `generate`, `stream`, `chat`, `logits`, `solve`."""

    def __init__(self, model, tokenizer=None, *, path=None, layout: str = "native", max_context: int | None = None):
        self.model, self.tokenizer, self.path, self.layout = model, tokenizer, path, layout
        self.config = model.config
        self.max_context = max_context or self.config.max_position_embeddings

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
        params = SamplingParams.from_kwargs(**kwargs)
        requested = kwargs.get("max_new_tokens")
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
            budget = fit_max_new_tokens(len(ids), self.max_context, requested)
            out.append(Request(ids, dataclasses.replace(params, max_new_tokens=budget), i))
        return out

    def engine(self, **kwargs) -> Engine:
        return Engine(self.model, self.tokenizer, max_context=kwargs.pop("max_context", self.max_context), **kwargs)

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
