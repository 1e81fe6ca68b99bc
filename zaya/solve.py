"""``zaya solve``: Markovian RSA from the command line.

    zaya solve "What is 12 + 30? Put the answer in \\boxed{}." --profile cpu-tiny
    zaya solve "$(cat problem.txt)" --profile deployment --n 8 --audit run.jsonl
    zaya solve "..." --backend-url http://gpu:8000 --api-key KEY --concurrency 32 --tokenizer DIR

Model flags (``--model``, ``--dtype``, ``--quantize``, ``--max-context``) are those of
``zaya generate``; with ``--backend-url`` only ``--model`` is read, to find a local tokenizer.

Prints the answer, the vote, each round's answers and the cost (tokens, requests, time); the last
line is one compact JSON object for scripts (answer, votes, decode tokens, seconds), or with
``--json`` the full summary (``RSAResult.to_dict()`` without texts: every candidate with its
parents and timings), which ``--audit`` also writes. On a local model the profile's budget and
tail shrink to fit the model's context; an explicit ``--budget`` or ``--tail`` that cannot fit is
an error. Exit code 0 when an answer was selected, 3 when no candidate produced an extractable
answer.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from zaya.commands import add_model_args, load_from_args, resolve_model_name
from zaya.rsa import OpenAIBackend, solve, tokenizer_from_file
from zaya.rsa.config import PROFILES, SELECTIONS, SPECULATIVE


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "solve", help="solve a problem with Markovian RSA (test-time compute)",
        description="Markovian RSA: N candidates, T rounds of K-tail aggregation, majority vote.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("problem", help="the problem text ('-' reads it from stdin)")
    add_model_args(p)
    p.add_argument("--profile", default="deployment", choices=list(PROFILES))
    g = p.add_argument_group("RSA parameters (override the profile)")
    g.add_argument("--n", type=int, help="population size N")
    g.add_argument("--k", type=int, help="candidates per aggregation prompt K")
    g.add_argument("--rounds", type=int, help="aggregation rounds T after round 0")
    g.add_argument("--budget", type=int, help="new tokens per candidate (beta)")
    g.add_argument("--tail", type=int, help="reasoning tokens carried per candidate (tau)")
    g.add_argument("--temperature", type=float)
    g.add_argument("--top-p", type=float)
    g.add_argument("--thinking-budget", type=int, help="reasoning tokens per candidate before </think> is forced")
    g.add_argument("--selection", choices=SELECTIONS)
    g.add_argument("--seed", type=int)
    g.add_argument("--batch-size", type=int, help="local: max sequences decoded together")
    g.add_argument("--speculative", choices=SPECULATIVE,
                   help="local: prompt-lookup speculative decoding in: off | aggregation rounds | all rounds")
    g.add_argument("--template", help="aggregation template name, or a string with "
                   "{question} and {candidates}")
    b = p.add_argument_group("remote backend (OpenAI-compatible)")
    b.add_argument("--backend-url", help="e.g. http://host:8000 (vLLM, SGLang, zaya serve)")
    b.add_argument("--api-key")
    b.add_argument("--served-model", help="model name on the server (default: its first)")
    b.add_argument("--concurrency", type=int, default=16, help="max requests in flight")
    b.add_argument("--tokenizer", help="tokenizer.json or model dir for token-exact tails "
                   "(default: --model's, else the server's /tokenize)")
    p.add_argument("--json", action="store_true",
                   help="end with the full JSON summary (every candidate, its parents and timings) "
                   "instead of the compact line")
    p.add_argument("--audit", metavar="PATH", help="write a JSONL audit trail (it holds the full summary too)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run)


def _remote_backend(args):
    model = resolve_model_name(args.model)
    local = model if model and os.path.exists(model) else None
    path = args.tokenizer or local
    tokenizer = tokenizer_from_file(path) if path else None
    return OpenAIBackend(args.backend_url, api_key=args.api_key, model=args.served_model,
                         tokenizer=tokenizer, max_concurrency=args.concurrency)


def run(args) -> int:
    problem = sys.stdin.read() if args.problem == "-" else args.problem
    options = dict(profile=args.profile, template=args.template, audit_path=args.audit,
                   progress=not args.no_progress, n=args.n, k=args.k, rounds=args.rounds,
                   budget=args.budget, tail=args.tail, temperature=args.temperature,
                   top_p=args.top_p, selection=args.selection, seed=args.seed,
                   batch_size=args.batch_size, thinking_budget=args.thinking_budget,
                   speculative=args.speculative)
    context = None
    if args.backend_url:
        backend = _remote_backend(args)
        try:
            result = solve(backend, problem, **options)
        finally:
            backend.close()
    else:
        llm = load_from_args(args)  # LLM.solve fits the profile's budget and tail to its context
        context = llm.max_context
        result = llm.solve(problem, **options)
    print_summary(result, PROFILES[args.profile], context)
    if args.audit:
        print(f"audit: {args.audit}")
    print(json.dumps(result.to_dict() if args.json else compact(result), ensure_ascii=False))
    return 0 if result.answer is not None or result.config.selection == "population" else 3


def _counts(counts: dict) -> str:
    return ", ".join(f"{answer} x{count}" for answer, count in counts.items()) or "no answers"


def print_summary(result, profile, context: int | None) -> None:
    """The answer, the vote, each round's answers and the cost, for people."""
    cfg = result.config
    print(f"answer: {result.answer if result.answer is not None else '(none)'}")
    print(f"vote: {_counts(result.vote.counts)} ({len(result.population)} candidates, "
          f"{result.vote.no_answer} without an answer)")
    for r in result.rounds:
        drafting = "" if r.get("draft_acceptance") is None else \
            f", drafts {r['draft_acceptance']:.0%} accepted, {r['tokens_per_forward']:.2f} tok/forward"
        print(f"  round {r['round']}: {_counts(r['answers'])} "
              f"({r['completion_tokens']} tokens, {r['seconds']:.1f}s{drafting})")
    rate = result.completion_tokens / result.seconds if result.seconds > 0 else 0.0
    fitted = (cfg.budget, cfg.tail) != (profile.budget, profile.tail) and context
    print(f"cost: {result.completion_tokens} decode + {result.prompt_tokens} prompt tokens, "
          f"{result.requests} sequences, {result.seconds:.1f}s ({rate:.1f} tok/s); "
          f"N={cfg.n} K={cfg.k} T={cfg.rounds} beta={cfg.budget} tau={cfg.tail}"
          + (f" (fitted to the {context}-token context)" if fitted else ""))


def compact(result) -> dict:
    """The machine-readable last line without --json: answer, votes, decode tokens, seconds."""
    return {"answer": result.answer, "votes": result.vote.counts,
            "completion_tokens": result.completion_tokens, "seconds": round(result.seconds, 3)}
