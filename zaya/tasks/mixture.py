"""The built-in model's last training stage: everyday questions, off-topic prompts, and enough of
the chain task to keep what the earlier stages taught.

``build_mixture`` writes one shuffled JSONL of chat records (and some raw-text ones):

* everyday questions in training wordings (``zaya.tasks.wordings``), on training-split numbers;
* off-topic prompts from training templates, answered with ``POINTER``;
* chain problems (the earlier stages' task, unchanged wording) and aggregation prompts over chain
  candidates, as in stage 4, so Markovian RSA keeps working;
* aggregation prompts over everyday questions, so ``zaya solve "What is 17 + 25 - 8?"`` works too;
* a share of the above as raw text (``prompt<think>...``), so a plain ``llm.generate(prompt)``
  answers the way a chat does, and some two-turn conversations, as ``zaya chat`` sends them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from zaya.rsa.prompts import ZYPHRA
from zaya.tasks.aggregation import Tails, aggregation_example, plain_example
from zaya.tasks.arithmetic import answer_text, apply, format_steps, perturb, sample_problems
from zaya.tasks.everyday import Calc, lines, reasoning
from zaya.tasks.offtopic import POINTER, offtopic_prompt, pointer_message
from zaya.tasks.wordings import Wording, draw_wording

# Suffixes people add to a question for a reasoning model; RSA's template cuts at "Let's think".
SUFFIXES = (" Put the answer in \\boxed{}.", " Let's think step by step.", " Show your work.")


@dataclass
class MixtureSpec:
    everyday: int = 80000            # everyday questions
    offtopic: int = 6000             # off-topic prompts
    chains: int = 12000              # chain problems (levels weighted as stage 4)
    aggregation: int = 4000          # aggregation prompts over chain candidates
    everyday_aggregation: int = 1000  # aggregation prompts over everyday candidates
    two_ops: float = 0.5             # share of everyday questions with two operations
    raw: float = 0.12                # share of single-turn examples written as raw text
    two_turn: float = 0.08           # share of everyday / off-topic examples with an earlier turn
    suffix: float = 0.04             # share of everyday questions with a SUFFIXES instruction
    level_weights: tuple = (1, 1, 3, 3, 3, 2)
    k: int = 4
    tail: int = 64
    candidate_accuracy: tuple = (0.15, 1.0)


def solution(calc: Calc) -> dict:
    return {"role": "assistant", "reasoning_content": reasoning(calc), "content": answer_text(calc.answer)}


def as_raw(prompt: str, reply: dict, rng: random.Random) -> dict:
    """A raw-text record: the prompt as typed (tokenized alone, as ``llm.generate(prompt)`` does),
    then the reply as the chat template writes it, as the target."""
    sep = rng.choice(("", "", "", "\n", " "))
    return {"prompt": prompt + sep, "completion": f"<think>\n{reply['reasoning_content']}\n</think>\n\n"
            f"{reply['content']}", "raw": True, "kind": "raw"}


def corrupted(calc: Calc, rng: random.Random) -> str:
    """A wrong worked solution: one slip (or wrong operation) carried through the later step."""
    steps = calc.steps()
    j = rng.randrange(len(steps))
    out, prev = [], None
    for i, (x, op, y, _) in enumerate(steps):
        if i > 0:  # the later step uses the earlier result on the side the order puts it
            x, y = (prev, y) if calc.first == "left" else (x, prev)
        if i == j and rng.random() < 0.25:  # a wrong operation, when its result is a number in range
            op = rng.choice([o for o in "+-*" if o == op or 0 <= apply(x, o, y) <= 99])
        r = apply(x, op, y)
        if i == j:
            r = perturb(r, rng)
        out.append((x, op, y, r))
        prev = r
    if prev == calc.answer:  # the mistake cancelled out (a later *0, say): make the last step wrong
        x, op, y, r = out[-1]
        out[-1] = (x, op, y, perturb(r, rng))
    return format_steps(calc.nums[0], lines(out), out[-1][3])


def everyday_aggregation(wording: Wording, rng: random.Random, tails: Tails, spec: MixtureSpec) -> dict:
    q = rng.uniform(*spec.candidate_accuracy)
    k = spec.k if rng.random() < 0.8 else rng.randint(2, spec.k)
    right = reasoning(wording.calc)
    cands = [right if rng.random() < q else corrupted(wording.calc, rng) for _ in range(k)]
    prompt = ZYPHRA(wording.text, [tails.tail(c, spec.tail) for c in cands])
    return {"messages": [{"role": "user", "content": prompt}, solution(wording.calc)],
            "kind": "everyday-aggregation"}


def _single(prompt: str, reply: dict, kind: str, rng: random.Random, spec: MixtureSpec, history) -> dict:
    if rng.random() < spec.raw:
        return as_raw(prompt, reply, rng)
    msgs = [{"role": "user", "content": prompt}, reply]
    if rng.random() < spec.two_turn:
        earlier_prompt, earlier_reply = history(rng)
        msgs = [{"role": "user", "content": earlier_prompt},
                {"role": "assistant", "content": earlier_reply}] + msgs
    return {"messages": msgs, "kind": kind}


def build_mixture(spec: MixtureSpec, tokenizer, seed: int) -> list[dict]:
    """The shuffled records of the stage (``tokenizer`` cuts aggregation tails, as RSA does)."""
    rng = random.Random(f"mixture:{seed}")
    tails = Tails(tokenizer)

    def history(r):  # an earlier turn of a conversation: its reply without the reasoning
        if r.random() < 0.7:
            w = draw_wording(r, "train", False, spec.two_ops)
            return w.text, answer_text(w.calc.answer)
        return offtopic_prompt(r, False)[0], POINTER

    records = []
    for _ in range(spec.everyday):
        w = draw_wording(rng, "train", False, spec.two_ops)
        text = w.text + (rng.choice(SUFFIXES) if rng.random() < spec.suffix else "")
        records.append(_single(text, solution(w.calc), "everyday", rng, spec, history))
    for _ in range(spec.offtopic):
        records.append(_single(offtopic_prompt(rng, False)[0], pointer_message(), "offtopic", rng, spec, history))
    levels = list(range(1, len(spec.level_weights) + 1))
    chains = sample_problems(spec.chains + spec.aggregation, "train", levels, f"mixture:{seed}",
                             list(spec.level_weights))
    for p in chains[:spec.chains]:
        rec = plain_example(p)
        records.append(as_raw(p.text, rec["messages"][1], rng) if rng.random() < spec.raw / 2 else rec)
    for p in chains[spec.chains:]:
        k = spec.k if rng.random() < 0.8 else rng.randint(2, spec.k)
        records.append(aggregation_example(p, rng, tails, k=k, tail=spec.tail, q_range=spec.candidate_accuracy))
    for _ in range(spec.everyday_aggregation):
        records.append(everyday_aggregation(draw_wording(rng, "train", False, spec.two_ops), rng, tails, spec))
    rng.shuffle(records)
    return records
