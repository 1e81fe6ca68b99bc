"""How people write an everyday arithmetic question (``zaya.tasks.everyday.Calc``), and a parser
that reads one back.

A wording is a template in one of four families:

* ``symbols``: an expression with ``+ - * x ×``, spaced or not, bracketed where precedence needs it
  (``What is 12 + 30?``, ``(7+5)*3=?``);
* ``words``: an expression with ``plus minus times`` / ``multiplied by`` (``what's 2 plus 3 times 4``);
* ``nouns``: ``the sum / difference / product of ...`` (one operation);
* ``verbs``: instructions (``Subtract 6 from 15.``; two operations run in the order written:
  ``Add 7 and 5, then multiply by 3.``).

Expression families sit in a frame (``What is {e}?``, ``Compute {e}.``, ``{e}=?``, ...); verbs sit
in a wrapper (``Please {v}.``). Any wording may then be lower-cased, upper-cased or title-cased.

Some frames, wrappers and verb phrasings are **held out**: they never appear in training data, and
``zaya eval --builtin`` measures accuracy on them (on held-out numbers too), i.e. how well the
model reads a phrasing it has never seen. ``parse`` is written independently of the templates (by
rules a reader would apply), so the tests can check that every wording states the problem it was
rendered from.
"""

from __future__ import annotations

import ast
import random
import re
from dataclasses import dataclass

from zaya.tasks.arithmetic import split_of
from zaya.tasks.everyday import OPS, Calc, random_calc

# ------------------------------------------------------------------------------------ frames
# (template, held out, fits a noun phrase). A frame wraps an expression {e}.
FRAMES: tuple[tuple[str, bool, bool], ...] = (
    ("What is {e}?", False, True), ("What's {e}?", False, True), ("whats {e}", False, True),
    ("{e}?", False, False), ("{e} = ?", False, False), ("{e}=?", False, False), ("{e} =", False, False),
    ("{e}", False, False), ("Compute {e}.", False, True), ("Calculate {e}.", False, True),
    ("Evaluate {e}", False, False), ("Solve {e}.", False, False), ("Find {e}.", False, True),
    ("Please calculate {e}.", False, True), ("Can you compute {e}?", False, True),
    ("What does {e} equal?", False, False), ("Tell me {e}.", False, True),
    ("Quick question: what is {e}?", False, True), ("Hey, what's {e}?", False, True),
    ("I need {e}.", False, True), ("Do you know what {e} is?", False, True),
    ("Hi! What is {e}?", False, True), ("what is {e} ?", False, True),
    ("Can you tell me what {e} is?", False, True), ("What is {e} equal to?", False, False),
    ("What do you get for {e}?", False, False), ("Result of {e}?", False, False),
    ("{e}, please.", False, False), ("Answer this: {e}", False, False),
    ("So what is {e}?", False, True), ("Ok, {e}?", False, False),
    # held out
    ("How much is {e}?", True, True), ("Work out {e}.", True, True),
    ("What is the value of {e}?", True, False), ("{e} equals what?", True, False),
    ("Could you please compute {e}?", True, True), ("Give me the answer to {e}.", True, False),
    ("Hello! Quickly, what's {e}?", True, True), ("Figure out {e}", True, True),
    ("Do the math: {e}", True, False), ("what would {e} be?", True, True),
)

# (template, held out). A wrapper holds a verb phrase: {V} capitalised, {v} as is.
WRAPPERS: tuple[tuple[str, bool], ...] = (
    ("{V}.", False), ("{V}", False), ("Please {v}.", False), ("Can you {v}?", False),
    ("{V}, please.", False), ("Hey, {v}.", False), ("What do you get if you {v}?", False),
    ("Quick: {v}.", False), ("Hi! {V}.", False), ("I need you to {v}.", False),
    # held out
    ("Could you {v} for me?", True), ("I'd like you to {v}.", True), ("Try to {v}.", True),
    ("Right now, {v}!", True),
)

# One operation as a verb phrase: op -> [(template, held out)]; {a} op {b} is the problem.
VERBS: dict[str, tuple[tuple[str, bool], ...]] = {
    "+": (("add {a} and {b}", False), ("add {b} to {a}", False), ("sum {a} and {b}", False),
          ("add together {a} and {b}", True)),
    "-": (("subtract {b} from {a}", False), ("take {b} away from {a}", False),
          ("take away {b} from {a}", False), ("from {a}, subtract {b}", True)),
    "*": (("multiply {a} by {b}", False), ("multiply {a} and {b}", False),
          ("multiply together {a} and {b}", True)),
}
# Continuing with the running value: op -> templates of {c}.
NEXT: dict[str, tuple[str, ...]] = {
    "+": ("add {c}", "add {c} to it", "add {c} to the result"),
    "-": ("subtract {c}", "take away {c}", "subtract {c} from it"),
    "*": ("multiply by {c}", "multiply the result by {c}", "multiply it by {c}"),
}
# How two steps are joined: (template with {v1} {c2}, held out).
JOINS: tuple[tuple[str, bool], ...] = (
    ("{v1}, then {c2}", False), ("{v1} then {c2}", False), ("{v1} and then {c2}", False),
    ("{v1}, and then {c2}", False), ("start with {a}, {n1}, then {c2}", False),
    ("first {v1}, then {c2}", True), ("{v1}. After that, {c2}", True),
)
NOUNS: dict[str, str] = {"+": "the sum of {a} and {b}", "-": "the difference between {a} and {b}",
                         "*": "the product of {a} and {b}"}
SYMBOLS = {"+": ("+",), "-": ("-",), "*": ("*", "x", "×")}
WORDS = {"+": ("plus",), "-": ("minus",), "*": ("times", "multiplied by")}
FAMILIES = ("symbols", "words", "nouns", "verbs")


@dataclass(frozen=True)
class Wording:
    """One phrasing of a Calc: ``text`` is what the user types, ``name`` which template made it."""

    text: str
    calc: Calc
    family: str
    name: str
    held_out: bool


def _expression(calc: Calc, family: str, rng: random.Random) -> str:
    a, *rest = calc.nums
    if family == "nouns":
        return NOUNS[calc.ops[0]].format(a=a, b=rest[0])
    pick = SYMBOLS if family == "symbols" else WORDS
    spelled = {op: rng.choice(pick[op]) for op in OPS}  # one spelling per operator in a question
    sym = [spelled[op] for op in calc.ops]
    if family == "symbols" and rng.random() < 0.4:
        join = lambda x, s, y: f"{x}{s}{y}"  # noqa: E731
    else:
        join = lambda x, s, y: f"{x} {s} {y}"  # noqa: E731
    if len(calc.ops) == 1:
        return join(a, sym[0], rest[0])
    b, c = rest
    brackets = not calc.natural or (family == "symbols" and rng.random() < 0.15)
    if calc.first == "left":
        head = join(a, sym[0], b)
        return join(f"({head})" if brackets else head, sym[1], c)
    tail = join(b, sym[1], c)
    return join(a, sym[0], f"({tail})" if brackets else tail)


def _verb_phrase(calc: Calc, rng: random.Random, held_out: bool) -> tuple[str, str, bool]:
    """(phrase, template name, whether the phrasing is a held-out one)."""
    a, b, *c = calc.nums
    options = [(t, h) for t, h in VERBS[calc.ops[0]] if held_out or not h]
    verb, verb_held = rng.choice(options)
    if len(calc.ops) == 1:
        return verb.format(a=a, b=b), verb, verb_held
    nxt = rng.choice(NEXT[calc.ops[1]]).format(c=c[0])
    joins = [(t, h) for t, h in JOINS if held_out or not h]
    join, join_held = rng.choice(joins)
    if "{n1}" in join:  # the first step continues from a start value; no verb phrase
        text = join.format(a=a, n1=rng.choice(NEXT[calc.ops[0]]).format(c=b), c2=nxt)
        return text, join, join_held
    return join.format(v1=verb.format(a=a, b=b), c2=nxt), f"{verb} | {join}", verb_held or join_held


def _case(text: str, rng: random.Random) -> str:
    r = rng.random()
    if r < 0.5:
        return text
    if r < 0.78:
        return text.lower()
    if r < 0.92:
        return text.upper()
    return " ".join(w[:1].upper() + w[1:] for w in text.split(" "))


def render(calc: Calc, rng: random.Random, family: str, held_out: bool) -> Wording:
    """A random wording of ``calc`` in ``family``. With ``held_out`` the template is one of the held
    out ones (frame, wrapper or verb phrasing); otherwise only training templates are used."""
    if family == "verbs":
        if held_out:  # a held-out wrapper, or a training wrapper around a held-out phrasing
            for _ in range(100):
                wrap, wrap_held = rng.choice(WRAPPERS)
                phrase, pname, phrase_held = _verb_phrase(calc, rng, True)
                if wrap_held or phrase_held:
                    break
        else:
            wrap, _ = rng.choice([w for w in WRAPPERS if not w[1]])
            phrase, pname, _ = _verb_phrase(calc, rng, False)
        text = wrap.format(v=phrase, V=phrase[:1].upper() + phrase[1:])
        return Wording(_case(text, rng), calc, family, f"verbs: {wrap} / {pname}", held_out)
    frames = [f for f, h, noun_ok in FRAMES if h == held_out and (noun_ok or family != "nouns")]
    frame = rng.choice(frames)
    text = frame.format(e=_expression(calc, family, rng))
    return Wording(_case(text, rng), calc, family, f"{family}: {frame}", held_out)


def fits(calc: Calc, family: str) -> bool:
    """Whether ``family`` can state ``calc`` (words need the natural order, nouns one operation,
    verbs run left to right)."""
    if family == "nouns":
        return len(calc.ops) == 1
    if family == "words":
        return calc.natural
    if family == "verbs":
        return calc.first == "left"
    return True


def draw_wording(rng: random.Random, split: str, held_out: bool, two_ops: float = 0.5,
                 family: str | None = None) -> Wording:
    """A random question on ``split`` numbers, in a training or a held-out wording."""
    family = family or rng.choice(FAMILIES)
    n_ops = 1 if family == "nouns" else (2 if rng.random() < two_ops else 1)
    while True:
        calc = random_calc(rng, n_ops, first="left" if family == "verbs" else None,
                           natural=True if family == "words" else None)
        if fits(calc, family) and split_of(calc) == split:
            return render(calc, rng, family, held_out)


def held_out_patterns() -> list[re.Pattern]:
    """One case-insensitive regex per held-out template (placeholders match anything): no
    training prompt, on topic or off, may match one. Frames and wrappers are whole prompts;
    verb phrasings and joins can sit anywhere in one."""
    whole = [f for f, h, _ in FRAMES if h] + [w for w, h in WRAPPERS if h]
    parts = [t for v in VERBS.values() for t, h in v if h] + [t for t, h in JOINS if h]

    def regex(template: str) -> str:
        return ".+".join(re.escape(p) for p in re.split(r"\{\w+\}", template))

    return [re.compile(f"^{regex(t)}$", re.I | re.S) for t in whole] + \
        [re.compile(regex(t), re.I | re.S) for t in parts]


# ------------------------------------------------------------------------------------ parsing
_N = r"(\d+)"
_NEXT = r"(add|subtract|take away|multiply)(?: it| the result)?(?: by)? (\d+)(?: to it| from it| to the result)?"
_CLAUSES = (  # a phrase stating one operation -> the same as a bracketed expression
    (rf"\badd (?:together )?{_N} and {_N}", r"(\1 + \2)"), (rf"\badd {_N} to {_N}", r"(\2 + \1)"),
    (rf"\bsum {_N} and {_N}", r"(\1 + \2)"), (rf"\bsubtract {_N} from {_N}", r"(\2 - \1)"),
    (rf"\btake(?: away)? {_N}(?: away)? from {_N}", r"(\2 - \1)"), (rf"\bfrom {_N}, subtract {_N}", r"(\1 - \2)"),
    (rf"\bmultiply (?:together )?{_N} (?:by|and) {_N}", r"(\1 * \2)"),
    (rf"\bthe sum of {_N} and {_N}", r"(\1 + \2)"), (rf"\bthe difference between {_N} and {_N}", r"(\1 - \2)"),
    (rf"\bthe product of {_N} and {_N}", r"(\1 * \2)"),
)
_SIGN = {"add": "+", "subtract": "-", "take away": "-", "multiply": "*"}
_AST_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*"}


def parse(text: str) -> Calc | None:
    """The Calc a question states, or None when it states none (or one outside the task: other
    operators, decimals, negative numbers, numbers over 99, more than two operations)."""
    t = " ".join(text.casefold().split())
    t = re.sub(r"^first ", "", t)
    t = re.sub(rf"\bstart with {_N}, {_NEXT}", lambda m: f"({m[1]} {_SIGN[m[2]]} {m[3]})", t)
    for pattern, repl in _CLAUSES:
        t = re.sub(pattern, repl, t)
    t = re.sub(rf"\)(?:,? and then|,? then|\. after that,) {_NEXT}", lambda m: f") {_SIGN[m[1]]} {m[2]}", t)
    for word, sym in (("multiplied by", "*"), ("times", "*"), ("plus", "+"), ("minus", "-")):
        t = re.sub(rf"(?<=[\d)]) {word} (?=[\d(])", f" {sym} ", t)
    t = re.sub(r"(?<=[\d)]) ?[x×] ?(?=[\d(])", " * ", t)
    spans = list(re.finditer(r"[\d(][\d\s()+*-]*[\d)]|\d", t))
    if len(spans) != 1 or re.search(r"[-.\d]\s*$", t[:spans[0].start()]):
        return None  # numbers outside the expression, or a sign/decimal point before it
    try:
        return _calc(ast.parse(spans[0].group(), mode="eval").body)
    except (SyntaxError, ValueError):
        return None


def _calc(node) -> Calc | None:
    def leaf(n):
        return n.value if isinstance(n, ast.Constant) and isinstance(n.value, int) else None

    if not isinstance(node, ast.BinOp) or type(node.op) not in _AST_OPS:
        return None
    op = _AST_OPS[type(node.op)]
    left, right = leaf(node.left), leaf(node.right)
    if left is not None and right is not None:
        calc = Calc((left, right), (op,))
    elif right is not None and isinstance(node.left, ast.BinOp):
        inner = _calc(node.left)
        calc = inner and len(inner.ops) == 1 and Calc(inner.nums + (right,), inner.ops + (op,), "left")
    elif left is not None and isinstance(node.right, ast.BinOp):
        inner = _calc(node.right)
        calc = inner and len(inner.ops) == 1 and Calc((left,) + inner.nums, (op,) + inner.ops, "right")
    else:
        return None
    return calc if calc and calc.valid else None
