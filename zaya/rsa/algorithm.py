"""Markovian Recursive Self-Aggregation (ZAYA1-8B report, arXiv 2605.05365 §VI-A).

    round 0      N candidates sampled from the question (one prompt, n=N: one shared prefill)
    round t>=1   for i in 1..N: draw K distinct candidates of round t-1 (seeded ``random.sample``,
                 listed in population order so that prompts share prefixes: ``RSARun._choose``),
                 carry the last tau tokens of each one's reasoning (the text before </think>, or
                 the whole text when there is none), render the aggregation prompt, generate with
                 budget beta; the N prompts decode as one batch
    selection    majority  - vote over extracted, normalised answers of round T; ties go to an
                             answer held by a candidate that finished with "stop"
                 final_agg - one more aggregation of K candidates of round T at the final sampling
                             settings (Zyphra's proxy); its extracted answer is the answer
                 population - no selection: the caller reads ``result.population``

Only round t-1 feeds round t, and only through tails, so every aggregation prompt holds at most
|question| + K*tau + template tokens and every sequence at most that plus the chat wrapper plus beta,
whatever T is: the context, and with it the KV cache, does not grow with the number of rounds. The
bound is checked for every prompt before anything is generated (``RSAError`` if a tail or template
breaks it) and the measured maxima are reported in ``RSAResult.context``.

``audit_path`` writes one JSON line per event: ``start`` (config), ``prompt`` (messages, parents,
counted tokens and bound), ``candidate`` (text, tail, answer, token counts, finish reason, seconds),
``round`` (answer distribution, tokens, time) and ``final`` (the vote and the summary).

The algorithm is a step machine (``RSARun``): it yields "generate these prompts with these
settings" (``GenerateRequest``) and is fed the candidates, so it holds no backend loop, thread or
timer of its own. The drivers (``zaya.rsa.drivers.solve`` for one run, ``run_batched`` for many
runs whose rounds decode as one batch, ``zaya.server.rsa`` on the server's scheduler) are short
loops around ``next_request()`` and ``feed()``.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field

from zaya.rsa.answers import Vote, boxed_answer, majority_vote
from zaya.rsa.backends import Candidate, derive_seed
from zaya.rsa.config import RSAConfig, RSAError, make_config
from zaya.rsa.prompts import resolve_template


@dataclass
class Member:
    """One candidate of the population, with its place in the run."""

    id: str                 # "r{round}.c{index}", or "final" for the final aggregation
    round: int
    parents: list[str]      # ids of the candidates whose tails its prompt carried
    candidate: Candidate
    answer: str | None
    tail: str | None = None  # what it passes on, when a later aggregation needs it

    def to_dict(self, include_text: bool = False) -> dict:
        c = self.candidate
        d = {"id": self.id, "round": self.round, "parents": self.parents, "answer": self.answer,
             "finish_reason": c.finish_reason, "prompt_tokens": c.prompt_tokens,
             "completion_tokens": c.completion_tokens, "cached_tokens": c.cached_tokens,
             "seconds": round(c.seconds, 3)}
        if include_text:
            d.update(text=c.text, reasoning=c.reasoning, content=c.content, tail=self.tail)
        return d


@dataclass
class RSAResult:
    answer: str | None           # the selected answer (None: nothing extractable, or "population")
    text: str | None             # the content of the selected candidate / final aggregation
    selection: str
    vote: Vote                   # majority vote over the last round (always computed)
    rounds: list[dict]           # per round: answer distribution, tokens, seconds
    candidates: list[list[Member]]  # every round's population, round 0 first
    final: Member | None         # the final aggregation (selection="final_agg")
    prompt_tokens: int
    completion_tokens: int       # total decode tokens, all rounds and the final aggregation
    requests: int                # sequences generated
    seconds: float
    context: dict                # measured prompt/sequence maxima next to their bounds
    config: RSAConfig = field(repr=False)

    @property
    def population(self) -> list[Member]:
        return self.candidates[-1]

    def to_dict(self, include_text: bool = False) -> dict:
        return {
            "answer": self.answer,
            "selection": self.selection,
            "votes": self.vote.counts,
            "no_answer": self.vote.no_answer,
            "tie": self.vote.tie,
            "winner": None if self.vote.winner_index is None
            else self.population[self.vote.winner_index].id,
            "rounds": self.rounds,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "requests": self.requests,
            "seconds": round(self.seconds, 3),
            "context": self.context,
            "config": self.config.to_dict(),
            "text": self.text if include_text else None,
            "population": [m.to_dict(include_text) for m in self.population],
            "final": self.final.to_dict(include_text) if self.final else None,
        }


class Audit:
    """Appends one JSON object per line; a no-op without a path."""

    def __init__(self, path, start: float):
        self.file = open(path, "w", encoding="utf-8") if path else None
        self.start = start

    def __call__(self, event: str, **fields):
        if self.file:
            record = {"event": event, "t": round(time.perf_counter() - self.start, 4), **fields}
            self.file.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
            self.file.flush()

    def close(self):
        if self.file:
            self.file.close()


@dataclass(frozen=True)
class GenerateRequest:
    """What a run needs next: ``n`` candidates from each of ``prompts``, sampled with these
    settings. The keywords of ``sampling()`` are those of ``Backend.generate``."""

    round: int                       # 0..T; T+1 for the final aggregation
    final: bool
    prompts: list[list[dict]]        # chat messages, one list per prompt
    n: int
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    enable_thinking: bool | None
    batch_size: int | None
    thinking_budget: int | None = None
    speculative: bool | None = None  # prompt-lookup drafting, for backends that take it

    @property
    def label(self) -> str:
        return "final" if self.final else f"round {self.round}"

    @property
    def sequences(self) -> int:
        return len(self.prompts) * self.n

    def sampling(self) -> dict:
        """(``thinking_budget`` and ``speculative`` only when set, so backends written before
        them keep working.)"""
        out = dict(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                   top_k=self.top_k, seed=self.seed, enable_thinking=self.enable_thinking,
                   batch_size=self.batch_size)
        if self.thinking_budget is not None:
            out["thinking_budget"] = self.thinking_budget
        if self.speculative is not None:
            out["speculative"] = self.speculative
        return out


class RSARun:
    """Markovian RSA on one problem as a step machine: it never generates, it asks.

        run = RSARun(backend, problem, profile="cpu-small", seed=0)
        while (request := run.next_request()) is not None:
            run.feed(backend.generate(request.prompts, n=request.n, **request.sampling()))
        run.result                                  # RSAResult

    ``backend`` only counts tokens and cuts tails (``count_tokens``, ``tail``, ``name``); the
    driver decides how candidates are generated, so one run, many runs in lockstep
    (``zaya.rsa.drivers``) and the server's scheduler (``zaya.server.rsa``) share this code.
    Each round is one request holding all of its prompts, so a driver can prefill them together.
    ``feed`` takes one list of candidates per prompt, ``n`` each, in prompt order.
    """

    def __init__(self, backend, problem, *, profile=None, template=None, extractor=None,
                 audit_path=None, **overrides):
        self.backend, self.cfg = backend, make_config(profile, **overrides)
        self.template, self.extract = resolve_template(template), extractor or boxed_answer
        self.start = time.perf_counter()
        self.rng = random.Random(derive_seed(self.cfg.seed, -1))
        self.rounds: list[dict] = []
        self.candidates: list[list[Member]] = []
        self.tokens = Counter()
        self.context = {"max_prompt_tokens": 0, "max_completion_tokens": 0,
                        "max_sequence_tokens": 0, "aggregation_prompts": 0}
        self._overheads: dict[int, int] = {}
        self.result: RSAResult | None = None
        self.audit = Audit(audit_path, self.start)
        self._steps = self._run(problem)
        self._request: GenerateRequest | None = None
        self._advance(None)

    def next_request(self) -> GenerateRequest | None:
        """The generation this run waits for; None once ``result`` is set."""
        return self._request

    def feed(self, outputs: list[list[Candidate]]) -> None:
        """Hand the run the candidates of ``next_request()``; it prepares its next request."""
        request = self._request
        if request is None:
            raise RSAError("this RSA run is finished: there is nothing to feed")
        if len(outputs) != len(request.prompts) or any(len(o) != request.n for o in outputs):
            raise RSAError(f"{request.label}: expected {request.n} candidates for each of "
                           f"{len(request.prompts)} prompts, got {[len(o) for o in outputs]}")
        self._advance(outputs)

    def close(self) -> None:
        """Stop early (a driver gave up); the audit file is closed."""
        self._steps.close()
        self.audit.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _advance(self, outputs) -> None:
        try:
            self._request = self._steps.send(outputs)
        except StopIteration as stop:
            self._request, self.result = None, stop.value
            self.audit.close()
        except BaseException:
            self._request = None
            self.audit.close()
            raise

    def _run(self, problem):
        """The algorithm, as a generator: yields requests, receives their candidates."""
        cfg = self.cfg
        messages, self.question, self.system = _split_problem(problem)
        self.audit("start", problem=problem, config=cfg.to_dict(), backend=self.backend.name,
                   template=getattr(self.template, "__name__", type(self.template).__name__))
        self.q_tokens = q_tokens = self.backend.count_tokens(self.question)
        k = min(cfg.k, cfg.n)
        self.context.update(question_tokens=q_tokens, tail_tokens=cfg.tail_limit,
                            template_overhead=self._overhead(k),
                            prompt_bound=q_tokens + k * cfg.tail_limit + self._overhead(k))
        population = yield from self._round(0, [messages], [[]], [{}], n=cfg.n)
        self.candidates.append(population)
        for t in range(1, cfg.rounds + 1):
            prompts, parents, stats = [], [], []
            for _ in range(cfg.n):
                chosen = self._choose(population, k)
                prompt, stat = self._aggregation_prompt(t, chosen)
                prompts.append(prompt)
                parents.append([m.id for m in chosen])
                stats.append(stat)
            population = yield from self._round(t, prompts, parents, stats, n=1)
            self.candidates.append(population)
        final = None
        if cfg.selection == "final_agg":
            final = yield from self._final_aggregation(population, k)
        return self._result(population, final)

    def _result(self, population: list[Member], final: Member | None) -> RSAResult:
        cfg = self.cfg
        vote = majority_vote([m.answer for m in population],
                             [m.candidate.finish_reason for m in population])
        answer = text = None
        if cfg.selection == "majority" and vote.winner is not None:
            answer = vote.winner
            winner = population[vote.winner_index].candidate
            text = winner.content or winner.text
        elif final is not None:
            answer, text = final.answer, final.candidate.content or final.candidate.text
        result = RSAResult(
            answer=answer, text=text, selection=cfg.selection, vote=vote, rounds=self.rounds,
            candidates=self.candidates, final=final, prompt_tokens=self.tokens["prompt"],
            completion_tokens=self.tokens["completion"], requests=self.tokens["requests"],
            seconds=time.perf_counter() - self.start, context=self.context, config=cfg)
        self.audit("final", answer=answer, votes=vote.counts, no_answer=vote.no_answer,
                   tie=vote.tie, summary=result.to_dict())
        return result

    def _request_for(self, t: int, prompts, n: int, final: bool) -> GenerateRequest:
        cfg = self.cfg
        if final:
            sampling = (cfg.final_budget or cfg.budget, cfg.final_temperature, cfg.final_top_p,
                        cfg.final_top_k)
        else:
            sampling = (cfg.budget, cfg.temperature, cfg.top_p, cfg.top_k)
        speculative = None
        if getattr(self.backend, "drafts", False):  # a backend with prompt-lookup speculative decoding
            speculative = cfg.speculative == "all" or (cfg.speculative == "aggregation" and t >= 1)
        return GenerateRequest(t, final, prompts, n, *sampling, seed=derive_seed(cfg.seed, t),
                               enable_thinking=cfg.enable_thinking, batch_size=cfg.batch_size,
                               thinking_budget=cfg.thinking_budget, speculative=speculative)

    def _round(self, t: int, prompts, parents, stats, *, n: int, final: bool = False):
        """One generation (a generator: yields its request); returns the new members."""
        cfg = self.cfg
        for i, (messages, ps, stat) in enumerate(zip(prompts, parents, stats, strict=True)):
            self.audit("prompt", round=t, index=i, n=n, parents=ps, messages=messages, **stat)
        stats = getattr(self.backend, "spec_stats", None)
        before = stats.as_dict() if stats is not None else None
        started = time.perf_counter()
        outputs = yield self._request_for(t, prompts, n, final)
        seconds = time.perf_counter() - started
        decode = _decode_stats(before, stats)
        pass_on = not final and (t < cfg.rounds or cfg.selection == "final_agg")
        members = []
        for i, cands in enumerate(outputs):
            for c in cands:
                index = len(members)
                member = Member("final" if final else f"r{t}.c{index}", t, parents[i], c,
                                self.extract(c.content) or self.extract(c.text))
                if pass_on:
                    member.tail = self.backend.tail(c.reasoning or c.text, cfg.tail_limit)
                members.append(member)
                self._account(c)
                self.audit("candidate", **member.to_dict(include_text=True),
                           tail_tokens=None if member.tail is None
                           else self.backend.count_tokens(member.tail))
        if not final:
            self._summarize_round(t, members, seconds, decode)
        return members

    def _summarize_round(self, t: int, members: list[Member], seconds: float, decode: dict) -> None:
        answers = Counter(m.answer for m in members if m.answer)
        summary = {"round": t, "answers": dict(answers.most_common()),
                   "no_answer": sum(1 for m in members if not m.answer),
                   "finish_reasons": dict(Counter(m.candidate.finish_reason for m in members)),
                   "prompt_tokens": sum(m.candidate.prompt_tokens for m in members),
                   "completion_tokens": sum(m.candidate.completion_tokens for m in members),
                   **_cached_stats(members),
                   "seconds": round(seconds, 3), **decode}
        self.rounds.append(summary)
        self.audit("round", **summary)

    def _choose(self, population: list[Member], k: int) -> list[Member]:
        """K distinct members drawn uniformly (seeded ``random.sample``), in population order.

        The order lets a round's prompts share more than the template and question: prompts whose
        subsets have the same lowest index open with the same tail, and the engine's prefix cache
        computes that prefix (its whole blocks) once. It keeps each prompt's distribution: the
        subset is the same uniform draw, and a round's members are exchangeable (conditionally
        i.i.d. given the round before, numbered in generation order: round 0's samples of one
        prompt, round t's member i from prompt i, whose subset does not depend on i), so listing a
        subset in index order shows its tails in a uniformly random order, as a shuffle would. What
        changes is only that the prompts of one round share that order: two prompts holding the
        same two candidates list them the same way round, where independent shuffles would agree
        half of the time."""
        return [population[i] for i in sorted(self.rng.sample(range(len(population)), k))]

    def _aggregation_prompt(self, t: int, chosen: list[Member]) -> tuple[list[dict], dict]:
        """Render one aggregation prompt and check it against |q| + K*tau + template."""
        content = self.template(self.question, [m.tail or "" for m in chosen])
        k = len(chosen)
        tokens = self.backend.count_tokens(content)
        bound = self.q_tokens + k * self.cfg.tail_limit + self._overhead(k)
        if tokens > bound:
            raise RSAError(f"round {t}: aggregation prompt has {tokens} tokens, over the bound "
                           f"|q| + K*tau + template = {bound}; the template or tails are too long")
        self.context["max_prompt_tokens"] = max(self.context["max_prompt_tokens"], tokens)
        self.context["aggregation_prompts"] += 1
        messages = [*self.system, {"role": "user", "content": content}]
        return messages, {"prompt_tokens_counted": tokens, "prompt_bound": bound}

    def _overhead(self, k: int) -> int:
        """Template tokens beyond the question for k tails, plus two per tail: a tail tokenized
        inside the template can take one token more than alone at each of its two boundaries,
        where its first and last characters merge differently with the text around them."""
        if k not in self._overheads:
            empty = self.backend.count_tokens(self.template(self.question, [""] * k))
            self._overheads[k] = empty - self.backend.count_tokens(self.question) + 2 * k
        return self._overheads[k]

    def _final_aggregation(self, population: list[Member], k: int):
        t = self.cfg.rounds + 1
        chosen = self._choose(population, k)
        prompt, stat = self._aggregation_prompt(t, chosen)
        members = yield from self._round(t, [prompt], [[m.id for m in chosen]], [stat], n=1,
                                         final=True)
        return members[0]

    def _account(self, c: Candidate):
        self.tokens.update(prompt=c.prompt_tokens, completion=c.completion_tokens, requests=1)
        ctx = self.context
        ctx["max_completion_tokens"] = max(ctx["max_completion_tokens"], c.completion_tokens)
        ctx["max_sequence_tokens"] = max(ctx["max_sequence_tokens"],
                                         c.prompt_tokens + c.completion_tokens)


def _split_problem(problem) -> tuple[list[dict], str, list[dict]]:
    """(round-0 messages, question text, system messages kept for aggregation prompts)."""
    if isinstance(problem, str):
        return [{"role": "user", "content": problem}], problem, []
    messages = [dict(m) for m in problem]
    users = [m for m in messages if m.get("role") == "user"]
    if not users or not isinstance(users[-1].get("content"), str):
        raise RSAError("problem must be a string or a message list with a text user message")
    return messages, users[-1]["content"], [m for m in messages if m.get("role") == "system"]


def _cached_stats(members: list[Member]) -> dict:
    """The prompt tokens a round took from the backend's prefix cache, when it reports them (the
    local engine does); like ``prompt_tokens``, a prompt counts once per sample."""
    cached = [m.candidate.cached_tokens for m in members]
    if any(c is None for c in cached):
        return {}
    return {"cached_prompt_tokens": sum(cached)}


def _decode_stats(before: dict | None, stats) -> dict:
    """A round's speculative-decoding figures from a backend's cumulative `SpecStats`. Runs that a
    driver decodes together (``run_batched``) share their backend calls, so each one's figures
    cover the whole batch it decoded with."""
    if before is None:
        return {}
    now = stats.as_dict()
    d = {k: now[k] - before[k] for k in ("row_forwards", "tokens", "drafted", "accepted")}
    return {"draft_acceptance": round(d["accepted"] / d["drafted"], 3) if d["drafted"] else None,
            "tokens_per_forward": round(d["tokens"] / d["row_forwards"], 3) if d["row_forwards"] else None}
