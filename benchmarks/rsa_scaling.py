"""Markovian RSA cost checks: memory does not grow with the number of rounds, and the population
decodes as one batch.

    python benchmarks/rsa_scaling.py [--model DIR] [--n 8] [--budget 128] [--tail 32]

1. Memory: runs `solve` with T=1 and with T=4 (same N, K, beta, tau) in separate processes and
   reports each run's peak resident memory and peak KV/CCA cache bytes. Markovian RSA carries only
   a tau-token tail of each candidate, so the T=4 peak should stay within 10% of T=1.
2. Batching: decode tokens/s of N samples from one prompt decoded together vs one sequence.

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

PROBLEM = "What is 17 + 25 - 8?"


def run_solve(args, rounds: int) -> dict:
    """Child process: one solve, reporting peak RSS and peak cache bytes."""
    import zaya
    from zaya.engine import Engine

    llm = zaya.load(args.model)
    peak_cache = 0
    step = Engine.step

    def tracking_step(self):
        nonlocal peak_cache
        peak_cache = max(peak_cache, self.cache.used_bytes())  # blocks and state slots held
        return step(self)

    Engine.step = tracking_step
    start = time.perf_counter()
    result = llm.solve(PROBLEM, profile="cpu-small", n=args.n, k=min(4, args.n), rounds=rounds,
                       budget=args.budget, tail=args.tail, seed=0, progress=False)
    return {"rounds": rounds, "seconds": time.perf_counter() - start,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_cache_mb": peak_cache / 2**20, "decode_tokens": result.completion_tokens,
            "max_context": result.to_dict().get("context")}


def batching(args) -> dict:
    import zaya

    llm = zaya.load(args.model)
    ids = llm.apply_chat_template([{"role": "user", "content": PROBLEM}])
    out = {}
    for n in (1, args.n, 1, args.n):  # alternate, keep the second (warm) measurement of each
        start = time.perf_counter()
        done = llm.generate([ids], n=n, max_new_tokens=args.budget, temperature=1.0, seed=0, ignore_eos=True)
        elapsed = time.perf_counter() - start
        out[n] = sum(len(c.token_ids) for c in done) / elapsed
    return {"single_tok_s": out[1], f"population_{args.n}_tok_s": out[args.n], "speedup": out[args.n] / out[1]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model directory (default: the built-in model)")
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--budget", type=int, default=128)
    p.add_argument("--tail", type=int, default=32)
    p.add_argument("--child-rounds", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_rounds is not None:
        print(json.dumps(run_solve(args, args.child_rounds)))
        return
    runs = {}
    for rounds in (1, 4):
        cmd = [sys.executable, __file__, "--n", str(args.n), "--budget", str(args.budget), "--tail", str(args.tail),
               "--child-rounds", str(rounds)] + (["--model", args.model] if args.model else [])
        runs[rounds] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        print(f"T={rounds}: peak RSS {runs[rounds]['peak_rss_mb']:.1f} MB, peak cache {runs[rounds]['peak_cache_mb']:.2f} MB, "
              f"{runs[rounds]['decode_tokens']} decode tokens in {runs[rounds]['seconds']:.1f}s")
    speed = batching(args)
    print(f"decode: 1 sequence {speed['single_tok_s']:.1f} tok/s, N={args.n} population "
          f"{speed[f'population_{args.n}_tok_s']:.1f} tok/s ({speed['speedup']:.2f}x)")
    summary = {"t1": runs[1], "t4": runs[4], "rss_ratio_t4_t1": runs[4]["peak_rss_mb"] / runs[1]["peak_rss_mb"],
               "cache_ratio_t4_t1": runs[4]["peak_cache_mb"] / max(runs[1]["peak_cache_mb"], 1e-9), **speed}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
