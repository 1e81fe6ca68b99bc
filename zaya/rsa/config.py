"""Markovian RSA parameters and named profiles.

Symbols follow the ZAYA1-8B report (arXiv 2605.05365 §VI-A): population N (``n``), candidates per
aggregation prompt C, called K in RSA (``k``), aggregation rounds T (``rounds``), per-rollout
budget beta (``budget``, new tokens) and carried tail tau (``tail``, tokens). ``rounds`` counts
aggregation rounds *after* round 0, as in the report (rounds t = 0..T; T=0 is N parallel samples),
so a run makes N * (T + 1) generations. Zyphra's ``rsa/`` proxy instead counts round 0 in its ``t``
(its ``t=2`` is our ``rounds=1``) and its ``tail_tokens`` / ``max_tokens`` are our ``tail`` /
``budget``. ``tail=0`` carries whole reasoning traces (full-chain RSA, arXiv 2509.26626), which
are then bounded by ``budget`` instead.

Profiles (any field can be overridden, e.g. ``make_config("deployment", n=8)``):

| profile            | T | N  | K | beta  | tau  | source                                                  |
|--------------------|---|----|---|-------|------|---------------------------------------------------------|
| report-headline    | 2 | 16 | 4 | 40000 | 4096 | [Z8] Tables XI-XII: AIME'25 91.9, HMMT'25 89.6          |
| deployment         | 2 | 16 | 4 | 16384 | 4096 | [Z8] §VI-C-j recommended setting (AIME'25 88.8)         |
| markovian-baseline | 4 | 16 | 1 | 8192  | 4096 | [Z8] Table XII, C=1 (parallel Delethink-style)          |
| apex-light         | 2 | 16 | 4 | 8192  | 4096 | [Z8] Table XIII                                         |
| apex-high          | 8 | 16 | 4 | 16384 | 4096 | [Z8] Table XIII                                         |
| apex-extra-high    | 8 | 32 | 4 | 32768 | 4096 | [Z8] Table XIII; Zyphra's rsa_proxy_server.py defaults  |
| cpu-tiny           | 1 | 4  | 2 | 64    | 32   | smoke test on a tiny model, seconds on a CPU            |
| cpu-small          | 2 | 8  | 4 | 256   | 64   | a small CPU run that still exercises K-of-N sampling    |

All profiles sample at temperature 1.0, top-p 1.0 (the report's setting) and select by majority
vote. The final-aggregation mode (``selection="final_agg"``) samples at 0.6 / top-p 0.95 /
top-k 40, the defaults of Zyphra's proxy. The report's 40000 / 4096 follow Zyphra's ``rsa/config.py``;
the "K" budgets of the other rows are taken as powers of two (16K = 16384), as in the proxy's 32768.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from zaya.errors import ZayaError

SELECTIONS = ("majority", "final_agg", "population")


class RSAError(ZayaError):
    """Invalid RSA settings, or a run that could not complete (message meant for people)."""


SPECULATIVE = ("off", "aggregation", "all")


@dataclass(frozen=True)
class RSAConfig:
    n: int = 16                      # population N
    k: int = 4                       # distinct candidates per aggregation prompt (K, C in [Z8])
    rounds: int = 2                  # aggregation rounds T after round 0
    budget: int = 16384              # beta: new tokens per candidate
    tail: int = 4096                 # tau: reasoning tokens carried per candidate (0 = all)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                   # 0 = off
    selection: str = "majority"      # majority | final_agg | population
    final_budget: int | None = None  # final_agg generation budget (None = budget)
    final_temperature: float = 0.6
    final_top_p: float = 0.95
    final_top_k: int = 40
    seed: int | None = None
    batch_size: int | None = None    # local backend: max sequences decoded together
    enable_thinking: bool | None = None  # passed to the chat template (None = its default)
    thinking_budget: int | None = None   # reasoning tokens per candidate before </think> is forced
    speculative: str = "aggregation"  # prompt-lookup drafting in: off | aggregation (rounds >= 1) | all

    def __post_init__(self):
        checks = [
            (self.n >= 1, "n (population) must be >= 1"),
            (1 <= self.k <= self.n or self.rounds == 0,
             f"k must be between 1 and n={self.n}: each prompt draws k distinct candidates"),
            (self.rounds >= 0, "rounds must be >= 0"),
            (self.budget >= 1, "budget must be >= 1 token"),
            (self.tail >= 0, "tail must be >= 0 tokens (0 carries whole reasoning traces)"),
            (self.temperature >= 0 and self.final_temperature >= 0, "temperatures must be >= 0"),
            (0 < self.top_p <= 1 and 0 < self.final_top_p <= 1, "top_p must be in (0, 1]"),
            (self.selection in SELECTIONS, f"selection must be one of {', '.join(SELECTIONS)}"),
            (self.final_budget is None or self.final_budget >= 1, "final_budget must be >= 1"),
            (self.batch_size is None or self.batch_size >= 1, "batch_size must be >= 1"),
            (self.thinking_budget is None or self.thinking_budget >= 0, "thinking_budget must be >= 0"),
            (self.speculative in SPECULATIVE, f"speculative must be one of {', '.join(SPECULATIVE)}"),
        ]
        for ok, message in checks:
            if not ok:
                raise RSAError(f"invalid RSA setting: {message}")

    @property
    def tail_limit(self) -> int:
        """Tokens carried per candidate: tau, or beta for full-chain RSA (``tail=0``)."""
        return self.tail if self.tail > 0 else self.budget

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PROFILES: dict[str, RSAConfig] = {
    "report-headline": RSAConfig(n=16, k=4, rounds=2, budget=40000, tail=4096),
    "deployment": RSAConfig(n=16, k=4, rounds=2, budget=16384, tail=4096),
    "markovian-baseline": RSAConfig(n=16, k=1, rounds=4, budget=8192, tail=4096),
    "apex-light": RSAConfig(n=16, k=4, rounds=2, budget=8192, tail=4096),
    "apex-high": RSAConfig(n=16, k=4, rounds=8, budget=16384, tail=4096),
    "apex-extra-high": RSAConfig(n=32, k=4, rounds=8, budget=32768, tail=4096),
    "cpu-tiny": RSAConfig(n=4, k=2, rounds=1, budget=64, tail=32),
    "cpu-small": RSAConfig(n=8, k=4, rounds=2, budget=256, tail=64),
}
DEFAULT_PROFILE = "deployment"


def make_config(profile: str | RSAConfig | None = None, **overrides) -> RSAConfig:
    """A profile (by name or object; default ``deployment``) with ``overrides`` applied.

    Overrides whose value is None are ignored, so CLI flags can be passed through unchanged.
    """
    if isinstance(profile, RSAConfig):
        base = profile
    else:
        name = profile or DEFAULT_PROFILE
        if name not in PROFILES:
            raise RSAError(f"unknown RSA profile {name!r}; choose from {', '.join(PROFILES)}")
        base = PROFILES[name]
    fields = {f.name for f in dataclasses.fields(RSAConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise RSAError(f"unknown RSA parameter(s) {unknown}; valid: {', '.join(sorted(fields))}")
    return dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})
