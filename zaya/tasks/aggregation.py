"""Aggregation training examples, built the way the ZAYA1-8B report builds them (§IV-A, §VI-B).

An example is one user turn holding the problem and K candidate tails, rendered with the very
template ``zaya solve`` uses (``zaya.rsa.prompts.ZYPHRA``), and the correct worked solution as
the assistant's target. Candidates are a mix of right and wrong:

* the number of correct candidates is Binomial(K, q) with q drawn per example, so the model sees
  unanimous, split and all-wrong sets (with all wrong it must solve the problem itself);
* wrong candidates are systematically corrupted solutions (``corrupted_reasoning``), or, when a
  pool of the model's own samples is given, its real wrong chains for that problem;
* each candidate is cut to its last ``tail`` tokens by the same token-exact rule RSA applies
  (``zaya.rsa.backends.TokenTools.tail``), so training prompts look exactly like inference ones.
"""

from __future__ import annotations

import random

from zaya.rsa.backends import TokenTools
from zaya.rsa.prompts import ZYPHRA
from zaya.tasks.arithmetic import Problem, corrupted_reasoning, reasoning, solution_message


class Tails(TokenTools):
    """RSA's token-exact tail rule on a bare tokenizer."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer


def aggregation_example(problem: Problem, rng: random.Random, tails: Tails, *, k: int, tail: int,
                        own_samples: list[str] | None = None) -> dict:
    """A chat record: aggregation prompt of ``k`` candidates -> the correct solution."""
    q = rng.uniform(0.15, 0.9)
    n_right = sum(rng.random() < q for _ in range(k))
    right = reasoning(problem)
    cands = [right] * n_right
    wrong_pool = [s for s in own_samples or [] if s.strip() and s != right]
    for _ in range(k - n_right):
        if wrong_pool and rng.random() < 0.5:
            cands.append(rng.choice(wrong_pool))
        else:
            cands.append(corrupted_reasoning(problem, rng)[0])
    rng.shuffle(cands)
    prompt = ZYPHRA(problem.text, [tails.tail(c, tail) for c in cands])
    return {"messages": [{"role": "user", "content": prompt}, solution_message(problem)],
            "kind": "aggregation", "k": k, "correct_candidates": n_right}


def plain_example(problem: Problem) -> dict:
    return {"messages": [{"role": "user", "content": problem.text}, solution_message(problem)],
            "kind": "solve"}
