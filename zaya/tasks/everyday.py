"""Everyday arithmetic: one or two operations on whole numbers 0-99, as people type them.

    What is 40 plus 2?        Compute 45 - 17.        12+30=?        Subtract 6 from 15.
    what's 2 + 3 * 4          Add 7 and 5, then multiply by 3.

A question is a ``Calc``: two or three numbers, one or two operators (+, -, *) and, with two,
which operation comes first. Every operand, intermediate value and result is in 0..99. Written
as an expression, the usual precedence holds (``2 + 3 * 4`` is 14); written as a sequence of
instructions ("Add 7 and 5, then multiply by 3"), the steps run in the order given. The worked
solution is the chain format of ``zaya.tasks.arithmetic`` in evaluation order, with a large
addend or subtrahend taken in two lines (``lines``)::

    <think>                      <think>
    3*4=12                       44+20=64
    2+12=14                      64+5=69
    result 14                    result 69
    </think>                     </think>

    \\boxed{14}                   \\boxed{69}

Division, decimals, negative numbers and numbers above 99 are outside the task: the model answers
them, like any other prompt that is not such a question, with ``zaya.tasks.offtopic.POINTER``.

The held-out split uses the chain task's hash (``zaya.tasks.arithmetic.split_of``) on a canonical
key, and a left-to-right ``Calc`` has exactly the key of the equivalent chain, so a held-out
question is never a training problem in either wording. Wordings are held out separately
(``zaya.tasks.wordings``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from zaya.tasks.arithmetic import MAX_VALUE, apply, format_steps, split_of

OPS = ("+", "-", "*")


@dataclass(frozen=True)
class Calc:
    nums: tuple[int, ...]             # (a, b) or (a, b, c), in the order they are written
    ops: tuple[str, ...]              # (op1,) or (op1, op2)
    first: str = "left"               # with two ops: "left" is (a op1 b) op2 c, "right" a op1 (b op2 c)

    def __post_init__(self):
        if len(self.nums) != len(self.ops) + 1 or len(self.ops) not in (1, 2):
            raise ValueError(f"a Calc has 1 or 2 operations and one more number, got {self.nums} {self.ops}")
        if any(op not in OPS for op in self.ops) or self.first not in ("left", "right"):
            raise ValueError(f"unknown operator or order in {self.ops} / {self.first!r}")
        if len(self.ops) == 1 and self.first != "left":
            raise ValueError("a one-operation Calc has no order to choose")

    @property
    def key(self) -> str:
        """Canonical form for the split hash; a left-to-right Calc has the key of its chain."""
        a, *rest = self.nums
        if self.first == "left":
            return f"{a}|" + ",".join(f"{op}{b}" for op, b in zip(self.ops, rest))
        b, c = rest
        return f"{a}{self.ops[0]}({b}{self.ops[1]}{c})"

    def steps(self) -> list[tuple[int, str, int, int]]:
        """(x, op, y, result) per operation, in evaluation order."""
        if len(self.ops) == 1 or self.first == "left":
            out, v = [], self.nums[0]
            for op, b in zip(self.ops, self.nums[1:]):
                out.append((v, op, b, apply(v, op, b)))
                v = out[-1][3]
            return out
        a, b, c = self.nums
        inner = apply(b, self.ops[1], c)
        return [(b, self.ops[1], c, inner), (a, self.ops[0], inner, apply(a, self.ops[0], inner))]

    @property
    def answer(self) -> int:
        return self.steps()[-1][3]

    @property
    def valid(self) -> bool:
        """Every operand, intermediate value and result in 0..MAX_VALUE."""
        return all(0 <= v <= MAX_VALUE for s in self.steps() for v in (s[0], s[2], s[3]))

    @property
    def natural(self) -> bool:
        """Whether the usual precedence gives this order, so it can be written without brackets."""
        if len(self.ops) == 1:
            return True
        second_binds_tighter = self.ops[1] == "*" and self.ops[0] != "*"
        return (self.first == "right") == second_binds_tighter


def lines(steps) -> list[tuple[int, str, int, int]]:
    """Worked lines for (x, op, y, result) steps: adding or subtracting a y of 20 or more that is not
    a multiple of ten takes two lines, tens first (``44+25`` is ``44+20=64``, ``64+5=69``). The
    chain task taught the model to add and subtract up to 19 in one line; splitting the rest into
    a multiple of ten and a digit reuses that instead of learning every pair of two-digit numbers.
    The last line keeps the step's result as given (a corrupted chain passes a wrong one)."""
    out = []
    for x, op, y, r in steps:
        if op in "+-" and y >= 20 and y % 10:
            tens = y - y % 10
            mid = apply(x, op, tens)
            out += [(x, op, tens, mid), (mid, op, y % 10, r)]
        else:
            out.append((x, op, y, r))
    return out


def reasoning(calc: Calc) -> str:
    return format_steps(calc.nums[0], lines(calc.steps()), calc.answer)


# --------------------------------------------------------------------------------- sampling
def _operand(rng: random.Random, op: str, left: int) -> int | None:
    """A right operand b for ``left op b`` with the result in range (None when there is none
    worth asking: multiplying a number over 49 by anything but 0 or 1)."""
    if op == "+":
        return rng.randint(0, MAX_VALUE - left)
    if op == "-":
        return rng.randint(0, left)
    if rng.random() < 0.08 or left < 2:  # by 0 or 1 now and then; most products are real tables
        return rng.choice((0, 1)) if left >= 2 else rng.randint(0, MAX_VALUE)
    top = MAX_VALUE // left
    return rng.randint(2, top) if top >= 2 else None


def _left_operand(rng: random.Random, op: str, right: int) -> int | None:
    """A left operand a for ``a op right`` with the result in range."""
    if op == "+":
        return rng.randint(0, MAX_VALUE - right)
    if op == "-":
        return rng.randint(right, MAX_VALUE)
    if right < 2:
        return rng.randint(0, MAX_VALUE)
    top = MAX_VALUE // right
    return rng.randint(2, top) if top >= 2 else None


def _first_number(rng: random.Random, op: str) -> int:
    # Multiplication tables start small; sums and differences use the whole range.
    return rng.randint(2, 33) if op == "*" and rng.random() < 0.92 else rng.randint(0, MAX_VALUE)


def random_calc(rng: random.Random, n_ops: int, first: str | None = None,
                natural: bool | None = None) -> Calc:
    """A random valid Calc of ``n_ops`` operations; ``first`` and ``natural`` constrain the order."""
    while True:
        ops = tuple(rng.choice(OPS) for _ in range(n_ops))
        order = first or (rng.choice(("left", "right")) if n_ops == 2 else "left")
        calc = _numbers(rng, ops, order)
        if calc is not None and calc.valid and (natural is None or calc.natural == natural):
            return calc


def _numbers(rng: random.Random, ops: tuple[str, ...], order: str) -> Calc | None:
    if order == "left" or len(ops) == 1:
        nums = [_first_number(rng, ops[0])]
        for op in ops:
            b = _operand(rng, op, nums[-1] if len(nums) == 1 else apply(nums[0], ops[0], nums[1]))
            if b is None:
                return None
            nums.append(b)
        return Calc(tuple(nums), ops, "left")
    b = _first_number(rng, ops[1])
    c = _operand(rng, ops[1], b)
    if c is None:
        return None
    a = _left_operand(rng, ops[0], apply(b, ops[1], c))
    return None if a is None else Calc((a, b, c), ops, "right")


def sample_calcs(count: int, split: str, seed, *, two_ops: float = 0.5, first: str | None = None,
                 natural: bool | None = None) -> list[Calc]:
    """``count`` distinct Calcs of ``split`` ('train' or 'test'); a share ``two_ops`` has two."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rng = random.Random(f"everyday:{split}:{seed}")
    seen, out = set(), []
    while len(out) < count:
        c = random_calc(rng, 2 if rng.random() < two_ops else 1, first, natural)
        if split_of(c) == split and c.key not in seen:
            seen.add(c.key)
            out.append(c)
    return out
