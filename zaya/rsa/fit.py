"""Fitting an RSA run into a model's context: the profile's beta and tau are caps, not demands.

``zaya.sampling.fit_max_new_tokens`` is the rule every entry point applies to one generation: an
unset budget runs up to the context's end (capped by the command's default), an explicit one that
cannot fit is an error saying how many tokens are left. ``fit_to_context`` is the same rule for an
RSA run, whose sequences also carry K tails of tau tokens; ``fit_for_model`` measures the prompts
on a local model (duck-typed: ``apply_chat_template`` and ``max_context``) and applies it.
"""

from __future__ import annotations

import dataclasses

from zaya.rsa.algorithm import _split_problem
from zaya.rsa.config import RSAConfig, RSAError
from zaya.rsa.prompts import resolve_template


def fit_to_context(cfg: RSAConfig, left: int, explicit=()) -> RSAConfig:
    """``cfg`` with beta (``budget``) and tau (``tail``) shrunk to fit ``left`` tokens of context.

    ``left`` is what the context leaves after the longest prompt's fixed part (chat wrapper,
    question and aggregation template); every sequence then needs K * tau for the carried tails
    (none without aggregation) plus beta. This is ``zaya.sampling.fit_max_new_tokens``'s rule for
    RSA: a profile's beta and tau are caps that shrink to fit, both in the same proportion when
    neither was set; a value named in ``explicit`` (``"budget"``, ``"tail"``) that cannot fit is an
    error saying how many tokens are left. Full-chain RSA (``tail=0``) carries tails as long as
    beta, so there only beta moves.
    """
    k = min(cfg.k, cfg.n) if cfg.rounds or cfg.selection == "final_agg" else 0
    budget, tail = cfg.budget, cfg.tail_limit
    if left < 1 + k:
        raise RSAError(f"{max(left, 0)} tokens of context are left after the prompt, too few for "
                       + (f"K={k} tails and an answer" if k else "an answer"))
    if k * tail + budget > left:
        movable = ({"budget", "tail"} if k and cfg.tail else {"budget"}) - set(explicit)
        if not movable:
            need = f"budget {budget} + K*tau = {k}*{tail} needs {budget + k * tail} tokens" if k else \
                f"budget {budget} does not fit"
            raise RSAError(f"{need}: {left} tokens of context are left after the prompt")
        if movable == {"tail"}:
            tail = (left - budget) // k
            if tail < 1:
                raise RSAError(f"budget {budget} does not fit: {left} tokens of context are left after the "
                               f"prompt and K={k} tails need at least {k}, so at most {left - k} fit")
        elif movable == {"budget"}:
            budget = left - k * tail if cfg.tail else left // (k + 1)
            if budget < 1:
                raise RSAError(f"tail {tail} does not fit: K*tau = {k * tail} tokens, but {left} tokens of "
                               f"context are left after the prompt")
        else:
            tail = max(1, int(tail * left / (k * tail + budget)))
            budget = min(budget, left - k * tail)
    final = cfg.final_budget and min(cfg.final_budget, left - k * (tail if cfg.tail else budget))
    return dataclasses.replace(cfg, budget=budget, tail=tail if cfg.tail else 0, final_budget=final or None)


def fit_for_model(llm, problem, cfg: RSAConfig, template=None, explicit=(), max_context: int | None = None
                  ) -> RSAConfig:
    """``cfg`` fitted to ``llm``'s context (or ``max_context``) for ``problem`` (see ``fit_to_context``).

    The longest fixed part is the round-0 prompt or the aggregation prompt with empty tails, as the
    chat template renders them, plus one token per tail that may merge across its boundary.
    """
    messages, question, system = _split_problem(problem)
    k = min(cfg.k, cfg.n)

    def length(msgs) -> int:
        return len(llm.apply_chat_template(msgs, add_generation_prompt=True, enable_thinking=cfg.enable_thinking))

    fixed = length(messages)
    if cfg.rounds or cfg.selection == "final_agg":
        empty = resolve_template(template)(question, [""] * k)
        fixed = max(fixed, length([*system, {"role": "user", "content": empty}]) + k)
    return fit_to_context(cfg, (max_context or llm.max_context) - fixed, explicit)
