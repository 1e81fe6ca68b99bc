"""What the built-in model does with what people type: greedy accuracy per wording family, on
held-out wordings and as raw text, and how often an off-topic prompt gets the pointer reply.

``zaya eval --builtin`` runs this next to the chain task. Every question is on held-out numbers
(``split_of``); "seen" rows use training wordings, "held-out" rows templates that never appear in
training data (``zaya.tasks.wordings``, ``zaya.tasks.offtopic``). The sets are fixed (seeded), and
decoding is greedy, so a model's figures do not move between runs.
"""

from __future__ import annotations

import random
import time

from zaya.rsa.answers import boxed_answer, normalize_answer
from zaya.tasks.offtopic import KINDS, POINTER, offtopic_prompt
from zaya.tasks.wordings import FAMILIES, draw_wording

SEED = 0
ANSWER_TOKENS = 64     # a two-step chain and its boxed answer take about 30
POINTER_TOKENS = 240   # the pointer reply takes about 200


def wording_items(per_family: int = 100, held_out: int = 400, offtopic: int = 200, raw: int = 100,
                  seed: int = SEED) -> list[dict]:
    """The evaluation prompts: ``{"prompt", "answer" (None off topic), "groups", "raw"}``."""
    rng = random.Random(f"breakdown:{seed}")
    items, seen = [], set()

    def add(prompt, answer, groups, is_raw=False):
        if (prompt, is_raw) not in seen:
            seen.add((prompt, is_raw))
            items.append({"prompt": prompt, "answer": answer, "groups": groups, "raw": is_raw})

    for family in FAMILIES:
        for _ in range(per_family):
            w = draw_wording(rng, "test", False, family=family)
            add(w.text, str(w.calc.answer), [f"seen wording: {family}"])
    for i in range(held_out):
        w = draw_wording(rng, "test", True, family=FAMILIES[i % len(FAMILIES)])
        ops = "1 op" if len(w.calc.ops) == 1 else "2 ops"
        add(w.text, str(w.calc.answer), ["held-out wordings", f"held-out wording: {w.family}",
                                         f"held-out wording: {ops}"])
        if i < raw:
            add(w.text, str(w.calc.answer), ["raw text, held-out wordings"], True)
    for i in range(offtopic):
        text, kind = offtopic_prompt(rng, True, KINDS[i % len(KINDS)])
        add(text, None, ["off-topic (held-out templates)", f"off-topic: {kind}"])
        if i < raw // 2:
            add(text, None, ["raw text, off-topic"], True)
    return items


def score(item: dict, text: str) -> dict:
    """Right answer (on topic) or pointer reply (off topic) for a reply ``text`` that starts inside
    the reasoning (chat) or before ``<think>`` (raw)."""
    content = text.split("</think>", 1)[1].strip() if "</think>" in text else ""
    if item["answer"] is None:
        pointer = "\\boxed" not in text and "Zyphra/ZAYA1-8B" in content
        return {"reply": text, "correct": pointer, "exact": content == POINTER}
    got = normalize_answer(boxed_answer(content) or "")
    return {"reply": text, "correct": got == normalize_answer(item["answer"])}


def run_items(llm, items: list[dict], batch: int = 128) -> list[dict]:
    """Greedy replies to every item (chat prompts through the model's template), scored."""
    out = []
    for tokens in (ANSWER_TOKENS, POINTER_TOKENS):
        todo = [it for it in items if (it["answer"] is None) == (tokens == POINTER_TOKENS)]
        for start in range(0, len(todo), batch):
            chunk = todo[start:start + batch]
            prompts = [it["prompt"] if it["raw"] else
                       llm.apply_chat_template([{"role": "user", "content": it["prompt"]}]) for it in chunk]
            for it, c in zip(chunk, llm.generate(prompts, temperature=0.0, max_new_tokens=tokens)):
                text = c.text if it["raw"] else "<think>\n" + c.text
                out.append({**it, **score(it, text)})
    return out


def summarize(results: list[dict]) -> dict:
    groups: dict[str, list[int]] = {}
    for r in results:
        for g in r["groups"]:
            tally = groups.setdefault(g, [0, 0])
            tally[0] += r["correct"]
            tally[1] += 1
    return {g: {"correct": c, "of": n, "accuracy": c / n} for g, (c, n) in groups.items()}


def evaluate_wordings(llm, per_family: int = 100, seed: int = SEED) -> dict:
    """The breakdown report: groups with their accuracy, the settings, and every reply."""
    started = time.perf_counter()
    items = wording_items(per_family, held_out=4 * per_family, offtopic=2 * per_family, raw=per_family,
                          seed=seed)
    results = run_items(llm, items)
    return {"per_family": per_family, "seed": seed, "decoding": "greedy", "groups": summarize(results),
            "seconds": time.perf_counter() - started, "items": results}


def breakdown_lines(report: dict) -> list[str]:
    lines = ["everyday questions (held-out numbers, greedy) and off-topic prompts:"]
    for name, g in report["groups"].items():
        what = "pointer replies" if name.startswith(("off-topic", "raw text, off")) else "right"
        lines.append(f"  {name:38s} {100 * g['accuracy']:5.1f}% {what}  ({g['correct']}/{g['of']})")
    return lines
