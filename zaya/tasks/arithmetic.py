"""Multi-step arithmetic: the reasoning task the built-in model is trained and evaluated on.

A problem starts from a number and applies a few operations in order::

    Start with 37, then apply +8, -9, *2 in order. What is the result?

Its worked solution is one line per step inside the reasoning, then the answer in ``\\boxed{}``::

    <think>
    37+8=45
    45-9=36
    36*2=72
    result 72
    </think>

    \\boxed{72}

The last line of the reasoning names the result. Markovian RSA carries only the tail of each
candidate's reasoning (the ``</think>`` and the boxed answer are not in it), so without that line an
aggregating model could not tell a finished chain from one cut off by its budget, and copying a
candidate it tended to run one step past the problem's last operation.

Steps are evaluated in the order given (no precedence to get wrong), every intermediate value stays
in 0..99, and answers are exact integers. ``level`` (1-6) sets the number of steps, the operand
range and whether multiplication appears (``LEVELS``).

The held-out split is disjoint from training **by construction**: a problem's canonical form
(start value and operations) is hashed, and a fixed slice of hash space (``TEST_BUCKETS`` of
``BUCKETS``) belongs to the test split. The generators for each split reject the other's problems,
so no test problem can ever appear in the training data, whatever seeds are used.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

MAX_VALUE = 99
BUCKETS = 100
TEST_BUCKETS = 10  # hash buckets 0..9 (10% of problem space) are held out

# level -> (steps, largest +/- operand, multiplication allowed). The scale is set by what a
# ~6M-parameter model learns in a 40-minute CPU run: small operands, values below 100.
LEVELS: dict[int, tuple[int, int, bool]] = {
    1: (2, 9, False),
    2: (3, 9, False),
    3: (4, 9, True),
    4: (5, 9, True),
    5: (6, 9, True),
    6: (6, 19, True),
}


@dataclass(frozen=True)
class Problem:
    start: int
    ops: tuple[tuple[str, int], ...]   # (operator, operand), applied left to right
    level: int

    @property
    def key(self) -> str:
        """The canonical form the split hash is computed from (wording-independent)."""
        return f"{self.start}|" + ",".join(f"{op}{b}" for op, b in self.ops)

    @property
    def text(self) -> str:
        # Operations are written as symbols, in order: a solution line copies its operation
        # straight from the problem (an induction-style copy a small model learns quickly)
        # instead of translating words.
        ops = ", ".join(f"{op}{b}" for op, b in self.ops)
        return f"Start with {self.start}, then apply {ops} in order. What is the result?"

    def values(self) -> list[int]:
        """The running value after each step."""
        out, v = [], self.start
        for op, b in self.ops:
            v = apply(v, op, b)
            out.append(v)
        return out

    @property
    def answer(self) -> int:
        return self.values()[-1]

    def steps(self) -> list[tuple[int, str, int, int]]:
        """(a, op, b, result) per step, with the true results."""
        out, v = [], self.start
        for op, b in self.ops:
            r = apply(v, op, b)
            out.append((v, op, b, r))
            v = r
        return out


def apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def split_of(problem: Problem) -> str:
    """'test' or 'train', from a hash of the problem's canonical form."""
    digest = hashlib.sha256(problem.key.encode()).digest()
    return "test" if int.from_bytes(digest[:4], "little") % BUCKETS < TEST_BUCKETS else "train"


def random_problem(rng: random.Random, level: int) -> Problem:
    """One problem of ``level`` whose every intermediate value stays in 0..MAX_VALUE."""
    steps, top, mult = LEVELS[level]
    while True:
        v = rng.randint(2, 50)
        start, ops = v, []
        for _ in range(steps):
            choices = ["+", "-"] + (["*"] if mult and 0 < v <= MAX_VALUE // 2 else [])
            op = rng.choice(choices)
            if op == "*":
                b = rng.randint(2, min(5, MAX_VALUE // v))
            elif op == "-":
                if v < 2:
                    op, b = "+", rng.randint(2, top)
                else:
                    b = rng.randint(1, min(top, v))
            else:
                b = rng.randint(2, min(top, MAX_VALUE - v)) if v <= MAX_VALUE - 2 else 0
                if b == 0:
                    op, b = "-", rng.randint(1, top)
            v = apply(v, op, b)
            ops.append((op, b))
        if all(0 <= x <= MAX_VALUE for x in Problem(start, tuple(ops), level).values()):
            return Problem(start, tuple(ops), level)


def sample_problems(count: int, split: str, levels, seed: int, weights=None) -> list[Problem]:
    """``count`` distinct problems of ``split`` ('train' or 'test'), levels drawn from ``levels``."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rng = random.Random(f"{split}:{seed}")
    levels = list(levels)
    seen, out = set(), []
    while len(out) < count:
        p = random_problem(rng, rng.choices(levels, weights=weights)[0])
        if split_of(p) == split and p.key not in seen:
            seen.add(p.key)
            out.append(p)
    return out


# ------------------------------------------------------------------------------- solutions
def format_steps(start: int, steps: list[tuple[int, str, int, int]], final: int | None,
                 result_line: bool = True) -> str:
    # No spaces: digits are one token each, so every space would be a token too.
    lines = [f"{a}{op}{b}={r}" for a, op, b, r in steps]
    if final is None:
        lines.append("...")
    elif result_line:
        lines.append(f"result {final}")
    return "\n".join(lines)


def reasoning(problem: Problem, result_line: bool = True) -> str:
    """The worked chain of thought (what goes inside <think>). ``result_line=False`` gives the
    older format without the closing ``result N`` line (the first stages of the built-in model's
    recipe were trained on it)."""
    return format_steps(problem.start, problem.steps(), problem.answer, result_line)


def answer_text(answer) -> str:
    return f"\\boxed{{{answer}}}"


def solution_message(problem: Problem, result_line: bool = True) -> dict:
    """The assistant turn of a correct solution, as zaya's chat template renders it."""
    return {"role": "assistant", "reasoning_content": reasoning(problem, result_line),
            "content": answer_text(problem.answer)}


# ------------------------------------------------------------------------------ corruptions
def corrupted_reasoning(problem: Problem, rng: random.Random, extra_step: bool = False,
                        result_line: bool = True) -> tuple[str, int | None]:
    """A plausible wrong chain: one systematic mistake, then correct arithmetic from it.

    Mistakes are the ones a small model makes: an off-by-a-digit result (carry slips), a
    misread operand, a wrong operation, a dropped step, or (with ``extra_step``) one step too
    many after the last operation (a model that copies chains can forget where they end).
    Later steps carry the error forward, so the chain is self-consistent and wrong (it may leave 0..99, as a model's wrong chain can).
    Returns (reasoning, its final answer); rarely the chain stops early with no answer, like a
    candidate cut off by its budget.
    """
    true = problem.steps()
    if extra_step and rng.random() < 0.25:
        a, op, b, r = true[-1]
        op, b = rng.choice([(op, b), ("+", rng.randint(1, 9)), ("-", rng.randint(1, 9))])
        if apply(r, op, b) == r:  # 0 * b: the extra step must change the answer
            op, b = "+", rng.randint(1, 9)
        steps = true + [(r, op, b, apply(r, op, b))]
        return format_steps(problem.start, steps, steps[-1][3], result_line), steps[-1][3]
    j = rng.randrange(len(true))
    kind = rng.choice(["slip", "slip", "operand", "op", "skip"])
    steps, v = [], problem.start
    for i, (_, op, b, _) in enumerate(true):
        if i == j and kind == "skip" and len(true) > 1:
            continue
        if i == j and kind == "operand":
            b = perturb(b, rng, low=1)
        if i == j and kind == "op":
            op = rng.choice([o for o in "+-*" if o != op and (o != "*" or b <= 9)])
        r = apply(v, op, b)
        if i == j and kind in ("slip", "skip"):
            r = perturb(r, rng)
        steps.append((v, op, b, r))
        v = r
    final = steps[-1][3]
    if final == problem.answer:  # the mistake cancelled out: force a visible one at the end
        a, op, b, r = steps[-1]
        final = perturb(r, rng)
        steps[-1] = (a, op, b, final)
    if rng.random() < 0.05:
        cut = rng.randint(1, len(steps))
        return format_steps(problem.start, steps[:cut], None), None
    return format_steps(problem.start, steps, final, result_line), final


def perturb(x: int, rng: random.Random, low: int = 0) -> int:
    for _ in range(20):
        how = rng.random()
        if how < 0.45:
            y = x + rng.choice([-2, -1, 1, 2])
        elif how < 0.75:
            y = x + rng.choice([-20, -10, 10, 20])
        elif how < 0.85:
            y = x + rng.choice([-100, 100])
        else:  # swap two digits, or replace the last one
            s = list(str(x))
            if len(s) > 1 and rng.random() < 0.5:
                i = rng.randrange(len(s) - 1)
                s[i], s[i + 1] = s[i + 1], s[i]
            else:
                s[-1] = str(rng.randrange(10))
            y = int("".join(s))
        if y != x and low <= y <= MAX_VALUE:
            return y
    return x + 1 if x + 1 <= MAX_VALUE else x - 1
