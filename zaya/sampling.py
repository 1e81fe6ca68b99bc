"""Sampling parameters and the pure functions that turn logits into the next token.

logits -> penalties -> temperature -> top-k -> top-p -> min-p -> sample (or argmax when the
temperature is 0). Randomness comes only from an explicit ``torch.Generator`` per request, so a
seed reproduces a request whatever else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Protocol

import torch

from zaya.errors import ContextLengthError, ZayaError

MAX_STOP_STRINGS = 16
MAX_N = 64
MAX_DRAFT = 16  # the longest speculative draft a request may ask for
DEFAULT_MAX_NEW_TOKENS = 256  # the Python API's and `zaya generate`'s cap when max_new_tokens is unset


def fit_max_new_tokens(prompt_len: int, max_context: int, requested: int | None = None, *,
                       default: int = DEFAULT_MAX_NEW_TOKENS, name: str = "max_new_tokens") -> int:
    """How many new tokens a request may generate: the one rule every entry point applies.

    Unset (``requested`` None): up to the context's end, at most ``default``. Set: that many, or a
    ``ContextLengthError`` that says how many tokens are left. A prompt that fills the context
    leaves no room at all, which is an error either way. ``name`` is what the caller calls the
    setting (``max_tokens`` on the server, ``--max-new-tokens`` on the command line).
    """
    left = max_context - prompt_len
    if left < 1:
        raise ContextLengthError(f"the prompt ({prompt_len} tokens) fills the context of {max_context} tokens: "
                                 f"no room for new tokens")
    if requested is None:
        return min(default, left)
    if isinstance(requested, int) and requested > left:
        raise ContextLengthError(f"{name} ({requested}) does not fit: the prompt takes {prompt_len} of the "
                                 f"context's {max_context} tokens, so {left} are left")
    return requested


class Constraint(Protocol):
    """A per-sequence hook on the sampling step: constrained decoding, a thinking budget.

    The engine calls it in one place, around `sample`: ``restrict(logits)`` returns the row's
    logits with every token the constraint forbids at -inf (all but one when it forces a token),
    and ``accept(token)`` hands it the token that was sampled, so it can advance its state.
    ``accepts(tokens)`` says how
    many of a run of proposed tokens (drafted ones, for speculative decoding) it would take in
    order, without advancing.
    """

    def restrict(self, logits: torch.Tensor) -> torch.Tensor: ...

    def accept(self, token: int) -> None: ...

    def accepts(self, tokens: list[int]) -> int: ...


class ConstraintSpec(Protocol):
    """What a request carries: ``start()`` makes the `Constraint` of one of its sequences."""

    def start(self) -> Constraint: ...


@dataclass
class SamplingParams:
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
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
    constraint: ConstraintSpec | None = None  # structured output / thinking budget (zaya.grammar)

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
    return draw(probs, generator)


def draw(weights: torch.Tensor, generator: torch.Generator | None) -> int:
    """One index drawn with probability proportional to ``weights`` (V,), non-negative, by the
    inverse of their cumulative sum at one uniform number: the first index whose running total
    exceeds u x total. ``torch.multinomial`` gives the same distribution but draws one random
    number per entry: 5.4 ms a token for ZAYA1's 262,272-entry vocabulary on one core, against
    0.26 ms here (0.67 against 0.04 ms at 32,768 entries)."""
    cdf = weights.cumsum(-1)
    u = torch.rand((), generator=generator, dtype=cdf.dtype, device=cdf.device) * cdf[-1]
    i = int(torch.searchsorted(cdf, u, right=True))
    if i >= weights.shape[-1]:  # u rounded up to the total: the last entry with any weight
        i = int(torch.nonzero(weights).max())
    return i


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
    return draw(residual, generator)


def token_logprobs(logits: torch.Tensor, token: int, top: int) -> tuple[float, dict[int, float] | None]:
    """log p(token) under the raw next-token distribution (before penalties, temperature and
    truncation, as vLLM reports by default) and, when ``top`` > 0, the ``top`` most likely ids."""
    lp = torch.log_softmax(logits, -1)
    if not top:
        return float(lp[token]), None
    values, ids = torch.topk(lp, top)
    return float(lp[token]), {int(i): float(v) for i, v in zip(ids, values)}
