"""Aggregation prompts: how a question and K candidate tails become one user message.

A template is any callable ``(question, tails) -> str``. The default, ``ZYPHRA``, reproduces the
wording of Zyphra's published Markovian RSA proxy (``Zyphra/vllm``
``examples/markovian_rsa/rsa_proxy_server.py``, the prompt ZAYA1-8B was trained to aggregate with,
arXiv 2605.05365 §IV-A/§VI-A): one instruction, a ``[[ Problem ]]`` section, the candidates as
``---- Solution i ----`` blocks and a closing request for a ``\\boxed{}`` answer; with one candidate
(K=1, Delethink-style refinement) it switches to the proxy's single-candidate wording. Parts are
joined with newlines, as in the proxy. The question is cut at ``"Let's think"`` as the proxy does,
so a round-0 instruction such as "Let's think step by step ..." is not repeated in the
aggregation prompt.

``FormatTemplate`` turns a user string with ``{question}`` and ``{candidates}`` placeholders into a
template; ``resolve_template`` accepts a name from ``TEMPLATES``, a callable, or such a string.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from zaya.rsa.config import RSAError

Template = Callable[[str, Sequence[str]], str]


@dataclass(frozen=True)
class ZyphraTemplate:
    """Zyphra's published aggregation prompt (K>1) and refinement prompt (K=1)."""

    multi_instruction: str = (
        "You are given a math problem and several candidate solutions. Some candidates may be "
        "incorrect or contain errors. Aggregate the useful ideas and produce a single, "
        "high-quality solution. Reason carefully; if candidates disagree, choose the correct "
        "path. If all are incorrect, then attempt a different strategy. Do not restate the "
        "problem or the candidate solutions."
    )
    multi_closing: str = (
        "Now write a single improved solution. Provide clear reasoning and end with the final "
        "answer in \\boxed{}."
    )
    single_instruction: str = (
        "You are given a math problem and a candidate solution. The candidate may be incomplete "
        "or contain errors. Refine this trajectory and produce an improved, higher-quality "
        "solution. If it is entirely wrong, attempt a new strategy. End with the final result in "
        "\\boxed{}.\n"
    )
    single_closing: str = (
        "Now, based on the original problem and the reference response above, please provide "
        "your own comprehensive solution."
    )
    question_cut: str | None = "Let's think"

    def __call__(self, question: str, tails: Sequence[str]) -> str:
        if self.question_cut and self.question_cut in question:
            question = question.split(self.question_cut)[0]
        parts = [self.single_instruction if len(tails) == 1 else self.multi_instruction]
        parts += ["[[ Problem ]]:\n", question.strip() + "\n"]
        if len(tails) == 1:
            parts += [
                "[[ Candidate solutions (may contain mistakes) ]]\n",
                f"---- Candidate ----\n{tails[0].strip()}\n",
                self.single_closing,
            ]
        else:
            parts.append("[[ Candidate solutions (may contain mistakes) ]]:\n")
            parts += [f"---- Solution {i} ----\n{t.strip()}\n" for i, t in enumerate(tails, 1)]
            parts.append(self.multi_closing)
        return "\n".join(parts)


@dataclass(frozen=True)
class FormatTemplate:
    """A user template: ``text.format(question=..., candidates=...)``.

    ``candidates`` is the tails rendered with ``block`` (placeholders ``{i}`` and ``{tail}``) and
    joined with ``sep``.
    """

    text: str
    block: str = "---- Solution {i} ----\n{tail}\n"
    sep: str = "\n"

    def __call__(self, question: str, tails: Sequence[str]) -> str:
        blocks = self.sep.join(
            self.block.format(i=i, tail=t.strip()) for i, t in enumerate(tails, 1)
        )
        return self.text.format(question=question.strip(), candidates=blocks)


ZYPHRA = ZyphraTemplate()
TEMPLATES: dict[str, Template] = {"zyphra": ZYPHRA}


def resolve_template(template: str | Template | None) -> Template:
    """A template from a registered name, a callable, or a ``{question}``/``{candidates}`` string."""
    if template is None:
        return ZYPHRA
    if callable(template):
        return template
    if template in TEMPLATES:
        return TEMPLATES[template]
    if "{question}" in template and "{candidates}" in template:
        return FormatTemplate(template)
    raise RSAError(
        f"unknown aggregation template {template!r}: use one of {sorted(TEMPLATES)}, a callable, "
        "or a string with {question} and {candidates} placeholders"
    )
