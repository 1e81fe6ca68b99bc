"""``zaya eval``: accuracy of a model on a problem set, with and without test-time compute.

    zaya eval --builtin --limit 200 --samples 4                          # single-sample mean@4
    zaya eval --builtin --rsa cpu-small --n 8 --k 4 --rounds 2 --majority --out r.json --plot r.png
    zaya eval --model Zyphra/ZAYA1-8B --data aime25.jsonl --rsa deployment --majority

Three ways to spend decode tokens on each problem, all scored the same way (last ``\\boxed{}``,
normalised with ``zaya.rsa.answers.normalize_answer``; ``math-verify`` decides LaTeX answers that
differ as strings, when it is installed):

* **single**: independent samples; accuracy is their mean (mean@k, the report's Pass@1).
* **majority**: a vote over m independent samples, for m = 1, 2, 4, ... up to the pool size. With
  ``--rsa`` the pool holds N*(T+1) samples, as many generations as RSA makes, so the last vote is
  at (about) equal decode tokens.
* **Markovian RSA** (``zaya.rsa.solve``): per round, the mean accuracy of the population and the
  accuracy of its vote; the final answer is the last round's majority vote.

Data: JSONL with ``problem`` (or ``question`` / ``prompt``) and ``answer`` (or a ``solution``
holding a ``\\boxed{}``), e.g. AIME'25; or ``--builtin``, the held-out arithmetic set of the
built-in model (``zaya.tasks``). The JSON report has the settings, every metric, decode tokens and
wall time per method, and one record per problem; the PNG plots accuracy against mean decode
tokens per problem.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import zaya
from zaya.engine import compiled
from zaya.rsa import LocalBackend, RSARun, run_batched, sample_pool
from zaya.rsa.answers import boxed_answer, extract_boxed, majority_vote, normalize_answer
from zaya.rsa.backends import derive_seed
from zaya.rsa.config import PROFILES, make_config
from zaya.rsa.drivers import progress_bar
from zaya.tasks import builtin_test_set, problem_records

# ------------------------------------------------------------------------------------- data
# Sequences decoded together: the independent samples in chunks of this many, RSA with as many
# problems in lockstep as fill it (the engine's default state slots), so both batch alike.
MAX_BATCH = 256
_PROBLEM_KEYS = ("problem", "question", "prompt", "Problem", "Question")
_ANSWER_KEYS = ("answer", "final_answer", "Answer", "expected_answer")


def load_problems(path: str | Path | None = None, *, limit: int | None = None) -> list[dict]:
    """Records ``{"id", "problem", "answer"}`` from a JSONL file, or the built-in held-out set."""
    if path is None:
        return problem_records(builtin_test_set(limit or 200))
    out = []
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        rec = json.loads(line)
        problem = next((rec[k] for k in _PROBLEM_KEYS if isinstance(rec.get(k), str)), None)
        answer = next((rec[k] for k in _ANSWER_KEYS if rec.get(k) is not None), None)
        if answer is None and isinstance(rec.get("solution"), str):
            answer = extract_boxed(rec["solution"])
        if problem is None or answer is None:
            raise ValueError(f"{path}:{lineno}: a record needs a problem ({'/'.join(_PROBLEM_KEYS[:3])}) "
                             "and an answer (answer, or a solution with \\boxed{})")
        out.append({"id": rec.get("id", rec.get("ID", f"{Path(path).stem}-{lineno}")),
                    "problem": problem, "answer": str(answer)})
        if limit and len(out) >= limit:
            break
    return out


# ---------------------------------------------------------------------------------- scoring
def is_correct(predicted: str | None, gold: str) -> bool:
    """Exact match after normalisation; math-verify's symbolic check when installed."""
    if predicted is None:
        return False
    a, b = normalize_answer(predicted), normalize_answer(gold)
    if a is not None and a == b:
        return True
    try:
        from math_verify import parse, verify
    except ImportError:
        return False
    try:
        return bool(verify(parse(f"${gold}$"), parse(f"${predicted}$")))
    except Exception:  # math-verify raises on unparsable LaTeX; treat as a mismatch
        return False


def candidate_answer(c) -> str | None:
    return boxed_answer(c.content) or boxed_answer(c.text)


def vote_of(answers, finishes) -> str | None:
    return majority_vote(answers, finishes).winner


# ---------------------------------------------------------------------------------- running
def evaluate(backend, problems: list[dict], *, samples: int = 4, majority: bool = False, rsa=None,
             max_tokens: int | None = None, temperature: float = 1.0, top_p: float = 1.0,
             seed: int | None = 0, suffix: str = "", progress: bool = True) -> dict:
    """Run the methods on ``problems`` and return the report (see the module docstring).

    ``rsa`` is an ``RSAConfig`` (or None to skip RSA). Its budget is also the budget of the
    independent samples, so token counts compare like with like.
    """
    budget = rsa.budget if rsa is not None else (max_tokens or 1024)
    pool_size = samples
    if majority:
        pool_size = max(samples, rsa.n * (rsa.rounds + 1) if rsa is not None else samples)
    report = {"problems": len(problems), "temperature": temperature, "top_p": top_p, "seed": seed,
              "budget": budget, "suffix": suffix}
    started = time.perf_counter()
    pool = sample_pool(backend, [p["problem"] + suffix for p in problems], samples=pool_size,
                       max_tokens=budget, temperature=temperature, top_p=top_p, seed=seed,
                       max_batch=MAX_BATCH, progress=progress)
    pool_seconds = time.perf_counter() - started
    records = []
    for p, cands in zip(problems, pool):
        answers = [candidate_answer(c) for c in cands]
        records.append({"id": p["id"], "answer": p["answer"], "samples": answers,
                        "sample_correct": [is_correct(a, p["answer"]) for a in answers],
                        "sample_tokens": [c.completion_tokens for c in cands],
                        "sample_finish": [c.finish_reason for c in cands]})
    n = max(1, len(records))
    tok_per_sample = sum(sum(r["sample_tokens"]) for r in records) / max(1, n * pool_size)
    report["single"] = {
        "samples": pool_size,
        "accuracy": sum(sum(r["sample_correct"]) / pool_size for r in records) / n,
        "decode_tokens_per_sample": tok_per_sample,
        "seconds": pool_seconds,
    }
    if majority:
        report["majority"] = _majority(records, pool_size)
    if rsa is not None:
        report["rsa"] = _run_rsa(backend, problems, records, rsa, suffix, seed, progress)
    report["seconds"] = time.perf_counter() - started
    report["per_problem"] = records
    return report


def _majority(records: list[dict], pool_size: int) -> list[dict]:
    """Accuracy of a vote over the first m samples, for m = 1, 2, 4, ... and the whole pool."""
    n = max(1, len(records))
    sizes = sorted({m for m in (1, 2, 4, 8, 16, 32, 64, 128) if m <= pool_size} | {pool_size})
    out = []
    for m in sizes:
        correct = 0
        for r in records:
            winner = vote_of(r["samples"][:m], r["sample_finish"][:m])
            correct += is_correct(winner, r["answer"])
            if m == pool_size:
                r["majority"] = winner
        out.append({"samples": m, "accuracy": correct / n,
                    "decode_tokens_per_problem": sum(sum(r["sample_tokens"][:m]) for r in records) / n})
    return out


def _run_rsa(backend, problems, records, cfg, suffix, seed, progress, max_batch: int = MAX_BATCH) -> dict:
    """Markovian RSA on every problem; as many problems as fill ``max_batch`` sequences (the
    independent samples' batch) run in lockstep so that their rounds decode as one batch
    (``run_batched``), which is what makes hundreds of problems feasible on a CPU."""
    group = max(1, max_batch // cfg.n)
    rounds = [Counter() for _ in range(cfg.rounds + 1)]
    final_correct, tokens, started = 0, 0, time.perf_counter()
    bar = progress_bar(len(problems), "rsa", progress)
    for start in range(0, len(problems), group):
        idx = list(range(start, min(len(problems), start + group)))
        runs = [RSARun(backend, problems[i]["problem"] + suffix, profile=cfg,
                       seed=derive_seed(seed, 7, i)) for i in idx]
        run_batched(backend, runs)
        for i, run in zip(idx, runs):
            final_correct += _score_rsa(problems[i], records[i], run.result, rounds)
            tokens += run.result.completion_tokens
        if bar:
            bar.update(len(idx))
            bar.set_postfix_str(f"acc {final_correct / (idx[-1] + 1):.3f}", refresh=False)
    if bar:
        bar.close()
    n = max(1, len(problems))
    return {
        "config": cfg.to_dict(),
        "rounds": [{"round": t, "population_accuracy": s["population"] / n, "vote_accuracy": s["vote"] / n,
                    "cumulative_decode_tokens_per_problem": s["tokens"] / n} for t, s in enumerate(rounds)],
        "final_accuracy": final_correct / n,
        "decode_tokens_per_problem": tokens / n,
        "seconds": time.perf_counter() - started,
        "lockstep_group": group,
    }


def _score_rsa(problem: dict, rec: dict, result, rounds: list[Counter]) -> bool:
    """Per-round population and vote accuracy of one run into ``rounds`` and ``rec``; returns
    whether its final answer is right."""
    cum = 0
    rec["rsa_rounds"] = []
    for t, population in enumerate(result.candidates):
        right = [is_correct(m.answer, problem["answer"]) for m in population]
        winner = vote_of([m.answer for m in population],
                         [m.candidate.finish_reason for m in population])
        cum += sum(m.candidate.completion_tokens for m in population)
        stats = rounds[t]
        stats["population"] += sum(right) / len(right)
        stats["vote"] += is_correct(winner, problem["answer"])
        stats["tokens"] += cum
        rec["rsa_rounds"].append({"round": t, "correct": sum(right), "of": len(right),
                                  "vote": winner})
    rec["rsa_answer"] = result.answer
    rec["rsa_correct"] = is_correct(result.answer, problem["answer"])
    return rec["rsa_correct"]


# ---------------------------------------------------------------------------------- reporting
def summary_lines(report: dict) -> list[str]:
    s = report["single"]
    lines = [f"problems: {report['problems']}  (temperature {report['temperature']}, budget {report['budget']})",
             f"single sample   mean@{s['samples']:<3} {100 * s['accuracy']:5.1f}%  "
             f"{s['decode_tokens_per_sample']:8.1f} decode tok/problem  ({s['seconds']:.0f}s for the pool)"]
    for m in report.get("majority", []):
        lines.append(f"majority vote   @{m['samples']:<7} {100 * m['accuracy']:5.1f}%  "
                     f"{m['decode_tokens_per_problem']:8.1f} decode tok/problem")
    if "rsa" in report:
        r, c = report["rsa"], report["rsa"]["config"]
        name = f"N={c['n']} K={c['k']} T={c['rounds']} beta={c['budget']} tau={c['tail']}"
        for t in r["rounds"]:
            lines.append(f"RSA round {t['round']}     population {100 * t['population_accuracy']:5.1f}%  "
                         f"vote {100 * t['vote_accuracy']:5.1f}%  "
                         f"{t['cumulative_decode_tokens_per_problem']:8.1f} decode tok/problem")
        lines.append(f"RSA final vote  {name}: {100 * r['final_accuracy']:5.1f}%  "
                     f"{r['decode_tokens_per_problem']:8.1f} decode tok/problem  ({r['seconds']:.0f}s)")
    return lines


def plot(report: dict, path: str | Path, title: str | None = None) -> Path:
    """Accuracy against mean decode tokens per problem, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    s = report["single"]
    ax.scatter([s["decode_tokens_per_sample"]], [100 * s["accuracy"]], color="black", zorder=3,
               label=f"single sample (mean@{s['samples']})")
    if report.get("majority"):
        m = report["majority"]
        ax.plot([x["decode_tokens_per_problem"] for x in m], [100 * x["accuracy"] for x in m], "o-",
                color="tab:blue", label="majority vote of m samples")
        for x in m:
            ax.annotate(f"m={x['samples']}", (x["decode_tokens_per_problem"], 100 * x["accuracy"]),
                        textcoords="offset points", xytext=(3, -10), fontsize=7, color="tab:blue")
    if "rsa" in report:
        r = report["rsa"]
        xs = [t["cumulative_decode_tokens_per_problem"] for t in r["rounds"]]
        ax.plot(xs, [100 * t["population_accuracy"] for t in r["rounds"]], "s--", color="tab:orange",
                label="Markovian RSA: population mean per round")
        ax.plot(xs, [100 * t["vote_accuracy"] for t in r["rounds"]], "^-", color="tab:red",
                label="Markovian RSA: vote per round")
    ax.set_xscale("log")
    ax.set_xlabel("decode tokens per problem (mean)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.set_title(title or f"{report.get('model', 'model')} on {report.get('data', 'data')} "
                 f"({report['problems']} problems)", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


# ---------------------------------------------------------------------------------------- CLI
def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="accuracy on a problem set: single sample, majority vote, Markovian RSA",
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", "-m", help="model directory or hub repo (default: the built-in model)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="weight dtype (default: checkpoint's)")
    p.add_argument("--compile", choices=compiled.MODES, help=compiled.MODES_HELP)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", help="JSONL with problem and answer fields (e.g. AIME'25)")
    src.add_argument("--builtin", action="store_true", help="the built-in held-out arithmetic set (default)")
    p.add_argument("--limit", type=int, help="evaluate the first N problems (built-in: 200)")
    p.add_argument("--samples", type=int, default=4, help="independent samples per problem (mean@k)")
    p.add_argument("--majority", action="store_true",
                   help="also vote over independent samples, up to RSA's N*(T+1) (equal decode tokens)")
    p.add_argument("--max-tokens", type=int, help="decode budget per sample without --rsa (default 1024)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--suffix", default="", help="appended to every problem (e.g. an instruction to "
                   "put the answer in \\boxed{})")
    g = p.add_argument_group("Markovian RSA (enabled by --rsa or any of these)")
    g.add_argument("--rsa", metavar="PROFILE", choices=list(PROFILES), help="RSA profile")
    g.add_argument("--n", type=int, help="population N")
    g.add_argument("--k", type=int, help="candidates per aggregation prompt K")
    g.add_argument("--rounds", type=int, help="aggregation rounds T")
    g.add_argument("--budget", type=int, help="new tokens per candidate (beta)")
    g.add_argument("--tail", type=int, help="tokens carried per candidate (tau)")
    g.add_argument("--batch-size", type=int, help="max sequences decoded together")
    p.add_argument("--wordings", type=int, default=100, metavar="N",
                   help="built-in set: also N everyday questions per wording family, 4N in held-out wordings "
                        "and 2N off-topic prompts, greedy (zaya.tasks.breakdown); 0 skips them")
    p.add_argument("--out", help="write the JSON report here")
    p.add_argument("--plot", help="write a PNG of accuracy against decode tokens here")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    problems = load_problems(args.data, limit=args.limit)
    rsa = None
    rsa_flags = dict(n=args.n, k=args.k, rounds=args.rounds, budget=args.budget, tail=args.tail,
                     temperature=args.temperature, top_p=args.top_p, batch_size=args.batch_size)
    if args.rsa or any(v is not None for k, v in rsa_flags.items() if k not in ("temperature", "top_p")):
        rsa = make_config(args.rsa or "cpu-small", **rsa_flags)
    llm = zaya.load(args.model, dtype=args.dtype, compile=args.compile)
    report = {"model": str(args.model or "built-in"), "data": args.data or "built-in held-out set"}
    report.update(evaluate(LocalBackend(llm, batch_size=args.batch_size), problems, samples=args.samples,
                           majority=args.majority, rsa=rsa, max_tokens=args.max_tokens,
                           temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                           suffix=args.suffix, progress=not args.no_progress))
    report["command"] = "zaya " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("zaya") else None
    for line in summary_lines(report):
        print(line)
    if args.data is None and args.wordings > 0:
        # start-up time: the per-wording breakdown loads only when it is asked for
        from zaya.tasks.breakdown import breakdown_lines, evaluate_wordings

        report["wordings"] = evaluate_wordings(llm, per_family=args.wordings)
        print("\n".join(breakdown_lines(report["wordings"])))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1, ensure_ascii=False), encoding="utf-8")
        print(f"report: {args.out}")
    if args.plot:
        plot(report, args.plot)
        print(f"plot: {args.plot}")
    return 0

