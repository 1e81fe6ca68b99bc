"""Answer extraction, normalisation and the majority vote.

The default extractor takes the *last* ``\\boxed{...}`` (or ``\\fbox{...}``) in a text with brace
matching, the convention of MATH-style graders (``last_boxed_only_string``) and of Zyphra's RSA
proxy. Normalisation is string-level, as in Zyphra's ``rsa/`` proxy (symbolic equivalence, e.g.
math-verify, is deliberately out of scope): it removes LaTeX spacing and sizing commands, ``$``,
``\\text{}`` wrappers, surrounding braces, trailing punctuation, thousands separators and leading
zeros of integers, so that ``" $042$ ."`` and ``"42"`` vote together.

Any callable ``text -> str | None`` can replace the extractor (``solve(..., extractor=f)``);
``None`` or ``""`` means "no answer", and such candidates do not vote.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

_BOX_COMMANDS = ("\\boxed", "\\fbox")


def extract_boxed(text: str) -> str | None:
    """The contents of the last balanced ``\\boxed{...}`` in ``text``, or None.

    An unbalanced last box (a candidate cut off by its budget) falls back to the previous
    balanced one. ``\\boxed 7`` (no braces) yields ``7``.
    """
    if not text:
        return None
    starts = sorted(
        (m.start(), cmd) for cmd in _BOX_COMMANDS for m in re.finditer(re.escape(cmd), text)
    )
    for start, cmd in reversed(starts):
        rest = text[start + len(cmd):]
        if rest.startswith(" ") and not rest.lstrip().startswith("{"):
            token = rest.strip().split(maxsplit=1)
            if token:
                return token[0].rstrip("$.,")
            continue
        inner = _braced(rest.lstrip())
        if inner is not None:
            return inner
    return None


def _braced(s: str) -> str | None:
    """``"{a{b}c} tail"`` -> ``"a{b}c"``; None when ``s`` does not open a balanced group."""
    if not s.startswith("{"):
        return None
    depth = 0
    for i, ch in enumerate(s):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return s[1:i]
    return None


_DROP = [r"\left", r"\right", r"\!", r"\,", r"\;", r"\:", r"\ ", r"\displaystyle", "$"]
_TEXT_WRAPPERS = re.compile(r"\\(?:text|textbf|mathrm|mathbf|operatorname)\{([^{}]*)\}")
_DEGREES = re.compile(r"\^\s*\{?\\circ\}?")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_INTEGER = re.compile(r"[+-]?\d+")


def normalize_answer(answer: str | None) -> str | None:
    """A canonical string for voting; None for a missing or empty answer."""
    if answer is None:
        return None
    s = answer.strip()
    for token in _DROP:
        s = s.replace(token, "")
    s = _TEXT_WRAPPERS.sub(r"\1", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _DEGREES.sub("", s)
    s = s.strip().rstrip(".").strip()
    while len(s) >= 2 and _braced(s) == s[1:-1]:  # "{42}" -> "42", but not "{a}{b}"
        s = s[1:-1].strip()
    s = _THOUSANDS.sub("", s)
    if _INTEGER.fullmatch(s):
        s = str(int(s))
    return s or None


def boxed_answer(text: str) -> str | None:
    """The default extractor: the normalised last ``\\boxed{}`` of ``text``."""
    return normalize_answer(extract_boxed(text))


@dataclass
class Vote:
    """The outcome of a majority vote over candidates' extracted answers."""

    winner: str | None          # the chosen answer, None when no candidate had one
    winner_index: int | None    # the candidate that represents the winner
    counts: dict[str, int]      # answer -> votes, most votes first
    no_answer: int              # candidates without an extractable answer
    tie: bool                   # whether several answers shared the top count


def majority_vote(answers: Sequence[str | None], finish_reasons: Sequence[str | None]) -> Vote:
    """Most frequent answer; ties go to an answer held by a candidate that finished with "stop".

    Among answers tied on votes, the one with more "stop"-finished candidates wins, then the one
    seen first. The representative candidate is the first "stop"-finished one holding the winner,
    else the first holding it. The result is deterministic in the input order.
    """
    counts = Counter(a for a in answers if a)
    if not counts:
        return Vote(None, None, {}, len(answers), False)
    stops = Counter(a for a, f in zip(answers, finish_reasons, strict=True) if a and f == "stop")
    first = {}
    for i, a in enumerate(answers):
        if a:
            first.setdefault(a, i)
    ranked = sorted(counts, key=lambda a: (-counts[a], -stops[a], first[a]))
    winner = ranked[0]
    holders = [i for i, a in enumerate(answers) if a == winner]
    index = next((i for i in holders if finish_reasons[i] == "stop"), holders[0])
    top = counts[winner]
    return Vote(
        winner=winner,
        winner_index=index,
        counts={a: counts[a] for a in ranked},
        no_answer=sum(1 for a in answers if not a),
        tie=sum(1 for a in counts if counts[a] == top) > 1,
    )
