"""Sampling parameters and the pure functions that turn logits into the next token.

logits -> penalties -> temperature -> top-k -> top-p -> min-p -> sample (or argmax when the
temperature is 0). Randomness comes only from an explicit ``torch.Generator`` per request, so a
seed reproduces a request whatever else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from zaya.errors import ZayaError

MAX_STOP_STRINGS = 16
MAX_N = 64
MAX_DRAFT = 16  # the longest speculative draft a request may ask for


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    n: int = 1
    logprobs: bool = False
    top_logprobs: int = 0
    speculative: bool | int | None = None   # prompt-lookup drafts: None engine default, False off,
                                            # True on, an int: drafts of at most that many tokens (0: off)

    @classmethod
    def from_kwargs(cls, **kwargs) -> "SamplingParams":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"unknown sampling argument(s): {', '.join(unknown)}")
        kwargs = {k: v for k, v in kwargs.items() if v is not None or k == "seed"}
        if isinstance(kwargs.get("stop"), str):
            kwargs["stop"] = [kwargs["stop"]]
        params = cls(**kwargs)
        params.stop = list(params.stop or [])
        params.stop_token_ids = list(params.stop_token_ids or [])
        params.validate()
        return params

    def validate(self) -> None:
        def need(cond: bool, msg: str):
            if not cond:
                raise ZayaError(msg)

        need(isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1,
             f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        need(_num(self.temperature) and 0 <= self.temperature <= 100, f"temperature must be in [0, 100], got {self.temperature!r}")
        need(_num(self.top_p) and 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p!r}")
        need(isinstance(self.top_k, int) and self.top_k >= 0, f"top_k must be an integer >= 0, got {self.top_k!r}")
        need(_num(self.min_p) and 0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p!r}")
        need(_num(self.repetition_penalty) and 0 < self.repetition_penalty <= 10,
             f"repetition_penalty must be in (0, 10], got {self.repetition_penalty!r}")
        need(_num(self.presence_penalty) and -2 <= self.presence_penalty <= 2,
             f"presence_penalty must be in [-2, 2], got {self.presence_penalty!r}")
        need(_num(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
             f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty!r}")
        need(self.seed is None or (isinstance(self.seed, int) and not isinstance(self.seed, bool)),
             f"seed must be an integer, got {self.seed!r}")
        need(all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings")
        need(len(self.stop) <= MAX_STOP_STRINGS, f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        need(isinstance(self.n, int) and 1 <= self.n <= MAX_N, f"n must be an integer in [1, {MAX_N}], got {self.n!r}")
        need(isinstance(self.top_logprobs, int) and 0 <= self.top_logprobs <= 20,
             f"top_logprobs must be an integer in [0, 20], got {self.top_logprobs!r}")
        need(self.speculative is None or isinstance(self.speculative, bool)
             or (isinstance(self.speculative, int) and 0 <= self.speculative <= MAX_DRAFT),
             f"speculative must be true, false or a draft length in [0, {MAX_DRAFT}] (0: off), "
             f"got {self.speculative!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def uses_penalties(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, seen: torch.Tensor, p: SamplingParams
                    ) -> torch.Tensor:
    """Repetition penalty (multiplicative, as in transformers/vLLM) on every token seen in the prompt or
    the output, and OpenAI-style presence / frequency penalties on output tokens. ``counts`` (V,)
    counts generated tokens, ``seen`` (V,) is a bool mask of prompt and generated tokens."""
    if p.repetition_penalty != 1:
        penalised = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if p.presence_penalty or p.frequency_penalty:
        out = counts.clamp_min(0)
        logits = logits - p.frequency_penalty * out - p.presence_penalty * (out > 0).to(logits.dtype)
    return logits


def filter_logits(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p on one row of float logits (V,)."""
    logits = logits / p.temperature
    if p.top_k and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= p.top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    if p.min_p > 0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
    return logits


def sample(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> int:
    """Next token for one row of float logits (V,), penalties already applied."""
    if p.greedy:
        return int(torch.argmax(logits))
    probs = filter_logits(logits, p).softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def verify_draft(logits: torch.Tensor, draft: int, p: SamplingParams, generator: torch.Generator | None) -> int:
    """The token at a position where a deterministic draft proposed ``draft``, for one row of float
    logits (V,), penalties already applied: ``draft`` itself when accepted, else a replacement.

    Speculative sampling (Leviathan et al., arXiv:2211.17192; Chen et al., arXiv:2302.01318) with
    a draft distribution that puts all its mass on ``draft``: accept with probability p(draft);
    on rejection sample from p with ``draft`` removed and renormalised. The token then follows p
    exactly. Greedy: the argmax, which equals ``draft`` exactly when the draft is right."""
    if p.greedy:
        return int(torch.argmax(logits))
    probs = filter_logits(logits, p).softmax(-1)
    if float(torch.rand((), generator=generator)) < float(probs[draft]):
        return draft
    residual = probs.clone()
    residual[draft] = 0
    return int(torch.multinomial(residual, 1, generator=generator))


def token_logprobs(logits: torch.Tensor, token: int, top: int) -> tuple[float, dict[int, float] | None]:
    """log p(token) under the raw next-token distribution (before penalties, temperature and
    truncation, as vLLM reports by default) and, when ``top`` > 0, the ``top`` most likely ids."""
    lp = torch.log_softmax(logits, -1)
    if not top:
        return float(lp[token]), None
    values, ids = torch.topk(lp, top)
    return float(lp[token]), {int(i): float(v) for i, v in zip(ids, values)}
