"""Where `zaya eval`'s Markovian RSA spends its time: prefill tokens, forwards and seconds per round.

    python benchmarks/rsa_prefill.py --limit 32               # population order (the default)
    python benchmarks/rsa_prefill.py --limit 32 --shuffled    # candidates in the order of the draw

Runs the first ``--limit`` problems of the built-in held-out set as ``zaya eval --rsa cpu-small
--n 8 --k 4 --rounds 2 --budget 96 --tail 64 --seed 0`` does (lockstep groups of ``--group``,
the same per-problem seeds) and prints, per round, the prompt tokens (each prompt once), the
tokens the engine computed (``Engine.prompt_tokens_computed``; the rest came from the prefix
cache), its prefill forwards, and the seconds spent in the engine's decode, prefill and sampling
(its ``_decode``, ``_prefill`` and ``_sample_rows``, timed by wrapping them). ``--shuffled`` lists
each prompt's candidates in the order of the draw instead of population order (the subsets stay
the same), for the comparison in docs/speculative.md. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's zaya


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=32)
    ap.add_argument("--group", type=int, default=16, help="problems run in lockstep (zaya eval: 16)")
    ap.add_argument("--shuffled", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import zaya
    import zaya.engine.engine as engine_module
    from zaya.evaluate import load_problems
    from zaya.rsa import LocalBackend, RSARun, run_batched
    from zaya.rsa.backends import derive_seed
    from zaya.rsa.config import make_config

    if args.shuffled:
        RSARun._choose = lambda self, population, k: self.rng.sample(population, k)
    engines, seconds = [], {}
    make_engine = zaya.LLM.engine

    def engine(self, **kw):
        e = make_engine(self, **kw)
        engines.append(e)
        return e

    zaya.LLM.engine = engine
    for name in ("_decode", "_prefill", "_sample_rows"):
        def timed(self, *a, _f=getattr(engine_module.Engine, name), _name=name, **kw):
            t = time.perf_counter()
            try:
                return _f(self, *a, **kw)
            finally:
                d = seconds.setdefault(id(self), {})
                d[_name] = d.get(_name, 0.0) + time.perf_counter() - t
        setattr(engine_module.Engine, name, timed)

    problems = load_problems(None, limit=args.limit)
    cfg = make_config("cpu-small", n=8, k=4, rounds=2, budget=96, tail=64)
    backend = LocalBackend(zaya.load())
    rounds: dict[int, dict] = {}
    started = time.perf_counter()
    for start in range(0, len(problems), args.group):
        idx = range(start, min(len(problems), start + args.group))
        runs = [RSARun(backend, problems[i]["problem"], profile=cfg, seed=derive_seed(0, 7, i))
                for i in idx]
        first = len(engines)
        run_batched(backend, runs)
        for t, e in enumerate(engines[first:]):
            r = rounds.setdefault(t, {"prompt_tokens": 0, "computed": 0, "forwards": 0})
            r["computed"] += e.prompt_tokens_computed
            r["forwards"] += e.prefill_forwards
            for name, s in seconds.get(id(e), {}).items():
                r[name.strip("_")] = round(r.get(name.strip("_"), 0.0) + s, 3)
        for run in runs:
            for t, summary in enumerate(run.result.rounds):
                rounds[t]["prompt_tokens"] += summary["prompt_tokens"] // (cfg.n if t == 0 else 1)
    total = time.perf_counter() - started
    for t, r in rounds.items():
        print(f"round {t}: {r['prompt_tokens']} prompt tokens, {r['computed']} computed, "
              f"{r['forwards']} prefill forwards; decode {r.get('decode', 0):.2f} s, prefill "
              f"{r.get('prefill', 0):.2f} s, sampling {r.get('sample_rows', 0):.2f} s")
    print(f"{total:.1f} s in all; load {os.getloadavg()[0]:.2f}")
    print(json.dumps({"order": "shuffled" if args.shuffled else "population", "limit": args.limit,
                      "group": args.group, "rounds": rounds, "seconds": round(total, 2),
                      "load": round(os.getloadavg()[0], 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
