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

``self_aggregation_examples`` builds the report's self-aggregation data (§IV-B): the candidates
are K of the model's own samples for the problem, drawn at the temperature RSA uses, so the mix of
right and wrong chains, and the kind of mistakes, are exactly what the model meets in RSA's rounds.
"""

from __future__ import annotations

import random

from zaya.rsa.answers import boxed_answer, normalize_answer
from zaya.rsa.backends import TokenTools
from zaya.rsa.drivers import sample_pool
from zaya.rsa.prompts import ZYPHRA
from zaya.tasks.arithmetic import Problem, corrupted_reasoning, reasoning, solution_message


class Tails(TokenTools):
    """RSA's token-exact tail rule on a bare tokenizer: ``Tails(tokenizer).tail(text, tau)``."""


def aggregation_example(problem: Problem, rng: random.Random, tails: Tails, *, k: int, tail: int,
                        own_samples: list[str] | None = None, q_range=(0.15, 0.9),
                        extra_step: bool = False, result_line: bool = True) -> dict:
    """A chat record: aggregation prompt of ``k`` candidates -> the correct solution. Each
    candidate is right with probability q ~ U(q_range)."""
    q = rng.uniform(*q_range)
    n_right = sum(rng.random() < q for _ in range(k))
    right = reasoning(problem, result_line)
    cands = [right] * n_right
    wrong_pool = [s for s in own_samples or [] if s.strip() and s != right]
    for _ in range(k - n_right):
        if wrong_pool and rng.random() < 0.5:
            cands.append(rng.choice(wrong_pool))
        else:
            cands.append(corrupted_reasoning(problem, rng, extra_step, result_line)[0])
    rng.shuffle(cands)
    prompt = ZYPHRA(problem.text, [tails.tail(c, tail) for c in cands])
    return {"messages": [{"role": "user", "content": prompt}, solution_message(problem, result_line)],
            "kind": "aggregation", "k": k, "correct_candidates": n_right}


def self_aggregation_examples(backend, problems: list[Problem], rng: random.Random, *, k: int, tail: int,
                              samples: int = 8, per_problem: int = 2, max_tokens: int = 96,
                              temperature: float = 1.0, seed: int = 0) -> tuple[list[dict], dict]:
    """Aggregation records whose candidates are the model's own samples (``backend`` is a
    ``zaya.rsa.LocalBackend``): ``samples`` chains per problem, then ``per_problem`` prompts per
    problem, each of ``k`` distinct samples cut to their last ``tail`` tokens, with the correct
    solution as the target. Returns (records, stats) where stats has the samples' accuracy."""
    if samples < k:
        raise ValueError(f"need at least k={k} samples per problem, got {samples}")
    pool = sample_pool(backend, [p.text for p in problems], samples=samples, max_tokens=max_tokens,
                       temperature=temperature, top_p=1.0, seed=seed, progress=False)
    records, right = [], 0
    for problem, cands in zip(problems, pool):
        correct = [normalize_answer(boxed_answer(c.content or c.text)) == str(problem.answer) for c in cands]
        right += sum(correct)
        for _ in range(per_problem):
            chosen = rng.sample(range(len(cands)), k)
            tails_ = [backend.tail(cands[i].reasoning or cands[i].text, tail) for i in chosen]
            records.append({"messages": [{"role": "user", "content": ZYPHRA(problem.text, tails_)},
                                         solution_message(problem)],
                            "kind": "self-aggregation", "k": k,
                            "correct_candidates": sum(correct[i] for i in chosen)})
    return records, {"samples": samples * len(problems), "sample_accuracy": right / max(1, samples * len(problems))}


def plain_example(problem: Problem, result_line: bool = True) -> dict:
    return {"messages": [{"role": "user", "content": problem.text}, solution_message(problem, result_line)],
            "kind": "solve"}
