"""Requests, the sequences they sample, and what the engine hands back (events, completions)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from zaya.engine.cache import SeqCache
from zaya.sampling import Constraint, SamplingParams


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_index: int = 0
    index: int = 0
    prompt_tokens: int = 0
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None
    cached_tokens: int = 0    # prompt tokens taken from the prefix cache instead of computed


@dataclass
class TokenEvent:
    prompt_index: int
    index: int
    token_id: int | None
    text: str
    finish_reason: str | None = None
    logprob: float | None = None
    top_logprobs: dict[int, float] | None = None


class Request:
    """One prompt and its sampling parameters; its n samples share one prefill and one generator."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, prompt_index: int = 0, tag=None):
        self.prompt_ids, self.params, self.prompt_index, self.tag = list(prompt_ids), params, prompt_index, tag
        self.generator = torch.Generator()
        self.generator.manual_seed(params.seed if params.seed is not None else int(torch.randint(2**62, ()).item()))
        self.sequences: list[Sequence] = []
        self.created = time.monotonic()
        self.cached_tokens: int | None = None  # set when its prefill starts

    @property
    def finished(self) -> bool:
        return all(s.finish_reason for s in self.sequences)


@dataclass
class Sequence:
    request: Request
    index: int
    decoder: object | None
    token_ids: list[int] = field(default_factory=list)   # generated tokens
    text: str = ""
    emitted: int = 0
    finish_reason: str | None = None
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None
    counts: torch.Tensor | None = None
    seen: torch.Tensor | None = None
    cache: SeqCache | None = None   # its place in the paged cache while it holds one
    drafter: object | None = None   # its speculative.Drafter when it drafts
    constraint: Constraint | None = None  # structured output / tool call / thinking budget state

    def completion(self) -> Completion:
        return Completion(self.text, list(self.token_ids), self.finish_reason or "length",
                          self.request.prompt_index, self.index, len(self.request.prompt_ids),
                          self.logprobs, self.top_logprobs, self.request.cached_tokens or 0)
