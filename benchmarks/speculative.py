"""Prompt-lookup speculative decoding against plain decoding, alternated in one process.

    python benchmarks/speculative.py                          # every figure (mini shape, bf16)
    python benchmarks/speculative.py --only copy --batches 1 --rounds 3

    copy    greedy decode whose output copies a known text (an edit or repeat request), batch 1 and
            batch 8: tokens/s with speculation on over off (targets >= 2x at batch 1, >= 1.5x at
            batch 8), the acceptance rate and tokens per row-forward
    random  random prompts (nothing to copy): the same ratio (target >= 0.97, at most 3% slower)
    rsa     Markovian RSA with the built-in model (profile cpu-small, two problems): the seconds of
            the aggregation rounds with drafting (RSAConfig.speculative="aggregation") over without,
            the draft acceptance and tokens per row-forward of those rounds, and the accuracy of both

The mini shape (compare_transformers.py) is built once under ``--dir`` with random weights. A
random model does not follow a request to repeat its prompt, so the copy workload gives the
drafter the text the output will copy instead, as a draft source (`Drafter.add_source`, what a
caller editing a document does). A random model's bf16 logits nearly tie at a few percent of
positions, and a forward of k + 1 positions may pick the other token there than a one-token step,
after which the output is new text with nothing to copy; so each row's source is the fixed point
of "draft from the source, take the output as the new source" (`fixed_sources`; the number of
runs it took and the share of rows that copy their source are printed). ``identical_rows`` reports
how many rows equal the non-speculative output. What is measured is then what a fully copying
output gains: the cost of verifying drafts against the tokens they save; acceptance and tokens per
row-forward count the timed runs only. Each round runs the same requests with speculation off
then on (the order alternates between rounds); the figure is the median ratio, printed with the
1-minute load average. Decode threads: ``--threads`` (default 1, the setting for shared cores;
see docs/performance.md). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prefix_cache import SHAPES, build  # noqa: E402 (a sibling script: the same random checkpoints)


def load_avg() -> float:
    return round(os.getloadavg()[0], 2)


def prompts(kind: str, batch: int, vocab: int, length: int) -> list[list[int]]:
    """``length`` random tokens per row (a different seed per kind and row)."""
    seed = 7919 if kind == "copy" else 0
    return [[2] + torch.randint(10, vocab, (length - 1,), generator=torch.Generator().manual_seed(seed + b)).tolist()
            for b in range(batch)]


def timed(engine, batch_prompts, new_tokens: int, sources=None) -> tuple[float, int, list]:
    from zaya.engine import Request
    from zaya.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
    requests = [Request(p, params, i) for i, p in enumerate(batch_prompts)]
    for i, r in enumerate(requests):
        for seq in engine.add(r):
            if sources and seq.drafter is not None:
                seq.drafter.add_source(sources[i])
    while engine.waiting:  # prefill (and the first token) outside the timed decode
        engine.step()
    start = time.perf_counter()
    tokens = 0
    while engine.active:
        tokens += sum(e.token_id is not None for e in engine.step())
    return time.perf_counter() - start, tokens, [r.sequences[0].token_ids for r in requests]


def compare(llm, kind: str, batch: int, args) -> dict:
    from zaya.engine import Engine
    from zaya.engine import speculative as spec

    engines = {"off": Engine(llm.model, cache=llm.cache, prefix_caching=False),
               "on": Engine(llm.model, cache=llm.cache, prefix_caching=False, speculative=args.k)}
    work = prompts(kind, batch, llm.config.vocab_size, args.prompt_tokens)
    timed(engines["off"], [p[:64] for p in work[:1]], 8)  # warm-up
    sources, source_runs, copying = None, 0, None
    if kind == "copy":  # the text each output copies: its greedy continuation
        sources, source_runs, copying = fixed_sources(engines, work, args.new_tokens, args.source_runs)
    stats = engines["on"].spec_stats
    before = spec.SpecStats(**{k: getattr(stats, k) for k in ("row_forwards", "tokens", "drafted", "accepted")})
    ratios, rates, loads, same = [], {"off": [], "on": []}, [], []
    for r in range(args.rounds):
        order = ("off", "on") if r % 2 == 0 else ("on", "off")
        speed, outputs = {}, {}
        for name in order:
            seconds, tokens, outputs[name] = timed(engines[name], work, args.new_tokens, sources)
            speed[name] = tokens / seconds
            rates[name].append(speed[name])
        same += [a == b for a, b in zip(outputs["on"], outputs["off"])]
        ratios.append(speed["on"] / speed["off"])
        loads.append(load_avg())
    timed_stats = spec.SpecStats(**{k: getattr(stats, k) - getattr(before, k)
                                    for k in ("row_forwards", "tokens", "drafted", "accepted")})
    out = {"ratio": round(statistics.median(ratios), 3), "off_tok_s": round(statistics.median(rates["off"]), 2),
           "on_tok_s": round(statistics.median(rates["on"]), 2), "acceptance": _round(timed_stats.acceptance),
           "tokens_per_forward": _round(timed_stats.tokens_per_forward),
           "identical_rows": round(sum(same) / len(same), 3), "load": max(loads)}
    if kind == "copy":
        out.update(source_runs=source_runs, rows_copying=copying)
    print(f"{kind} batch {batch}: {out['off_tok_s']} -> {out['on_tok_s']} tok/s, ratio {out['ratio']} "
          f"(acceptance {out['acceptance']}, {out['tokens_per_forward']} tokens per row-forward, greedy rows "
          f"identical to off: {out['identical_rows']}"
          + (f"; rows copying their source: {copying} after {source_runs} runs" if kind == "copy" else "")
          + f"; load {out['load']})", flush=True)
    return out


def fixed_sources(engines, work, new_tokens: int, limit: int) -> tuple[list[list[int]], int, float]:
    """Each row's copy source: the text the speculative engine produces when it drafts from that
    same text. Start from the plain greedy continuation and rerun with the last output as the
    source until nothing changes (at most ``limit`` runs). Needed because a random model's bf16
    logits nearly tie at a few percent of positions, where a forward of k + 1 positions can pick
    another token than a one-token step; from there on the output is new random text with nothing
    to copy. A run keeps every token before its first change (the same drafts give the same
    forwards), so each run extends the stable prefix. Returns the sources, the runs made and the
    share of rows whose output equals their source."""
    sources = [seq.token_ids for seq in _greedy(engines["off"], work, new_tokens)]
    for runs in range(1, limit + 1):
        out = timed(engines["on"], work, new_tokens, sources)[2]
        if out == sources:
            break
        sources = out
    copying = sum(a == b for a, b in zip(timed(engines["on"], work, new_tokens, sources)[2], sources))
    return sources, runs, round(copying / len(work), 3)


def compare_rsa(args) -> dict:
    import zaya
    from zaya.rsa import LocalBackend, solve

    llm = zaya.load()
    problems = [("Start with 10, then apply -5, +8, *4, -3 in order. What is the result?", "49"),
                ("Start with 22, then apply *2, -2, +6, *2, +2, -3 in order. What is the result?", "95")]
    seconds = {"off": [], "aggregation": []}
    right = {"off": 0, "aggregation": 0}
    figures = []
    for r in range(args.rounds):
        for mode in (("off", "aggregation") if r % 2 == 0 else ("aggregation", "off")):
            for question, answer in problems:
                result = solve(LocalBackend(llm), question, profile="cpu-small", seed=r, progress=False,
                               speculative=mode)
                seconds[mode].append(sum(x["seconds"] for x in result.rounds[1:]))
                right[mode] += result.answer == answer
                if mode == "aggregation":
                    figures += [(x["draft_acceptance"], x["tokens_per_forward"]) for x in result.rounds[1:]]
    acc = [a for a, _ in figures if a is not None]
    out = {"aggregation_seconds_ratio": round(sum(seconds["aggregation"]) / sum(seconds["off"]), 3),
           "draft_acceptance": round(statistics.mean(acc), 3) if acc else None,
           "tokens_per_forward": round(statistics.mean(t for _, t in figures), 3),
           "correct_off": right["off"], "correct_on": right["aggregation"], "runs": len(seconds["off"]),
           "load": load_avg()}
    print(f"rsa cpu-small: aggregation rounds {out['aggregation_seconds_ratio']}x the time without drafting "
          f"(acceptance {out['draft_acceptance']}, {out['tokens_per_forward']} tokens per row-forward; correct "
          f"{out['correct_on']} vs {out['correct_off']} of {out['runs']}; load {out['load']})", flush=True)
    return out


def _greedy(engine, batch_prompts, new_tokens: int):
    from zaya.engine import Request
    from zaya.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
    requests = [Request(p, params, i) for i, p in enumerate(batch_prompts)]
    for _ in engine.run(requests):
        pass
    return [r.sequences[0] for r in requests]


def _round(x):
    return None if x is None else round(x, 3)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "zaya-spec-bench")
    ap.add_argument("--shape", default="mini", choices=list(SHAPES))
    ap.add_argument("--only", default="copy,random,rsa")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--k", type=int, default=8, help="longest draft (default 8)")
    ap.add_argument("--prompt-tokens", type=int, default=192)
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--source-runs", type=int, default=12,
                    help="most speculative runs to settle the copy sources (see fixed_sources)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import zaya

    kinds = args.only.split(",")
    result = {"shape": args.shape, "threads": args.threads, "load_at_start": load_avg(), "figures": {}}
    if "rsa" in kinds:
        result["figures"]["rsa"] = compare_rsa(args)
    llm = zaya.load(build(args.shape, args.dir))
    for kind in (k for k in kinds if k != "rsa"):
        for batch in map(int, args.batches.split(",")):
            result["figures"][f"{kind}_b{batch}"] = compare(llm, kind, batch, args)
    result["load_at_end"] = load_avg()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
