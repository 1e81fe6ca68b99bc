"""Compiled decode steps (``--compile on``, zaya.engine.compiled) against eager, alternated in one process.

    python benchmarks/compiled_decode.py benchmarks/.checkpoints/mini --rounds 3 --threads 1

Loads the checkpoint once, wraps its layers with ``zaya.engine.compiled.compile_decode``, and
times the first compiled steps (compile, or load from Inductor's cache: pass ``--cache DIR`` with
an empty DIR for a cold compile). Then, per round, decodes each batch size eager (the wrapper
told to skip every batch, ``ZAYA_COMPILE_MAX_BATCH=0``) and compiled, one after the other on the
same model and cache pool, and prints tok/s and the ratio compiled / eager. The last line is one
JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from zaya_side import ZayaRunner, set_threads  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", type=Path)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--options", type=json.loads, default=None,
                    help='Inductor options as JSON, e.g. \'{"cpp_wrapper": true}\'')
    ap.add_argument("--cache", type=Path, help="Inductor cache directory (default: zaya's)")
    args = ap.parse_args(argv)
    if args.cache:
        os.environ["ZAYA_COMPILE_CACHE"] = str(args.cache)
    from zaya.engine import compiled

    set_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    runner = ZayaRunner(args.path)
    runner.warm_up()
    compiled.compile_decode(runner.llm.model, options=args.options)
    os.environ["ZAYA_COMPILE_MAX_BATCH"] = str(max(batches))
    compile_s = {}
    for b in batches:
        t = time.perf_counter()
        runner.decode(b, 8, 2, 99)
        compile_s[b] = time.perf_counter() - t
    rates = {(mode, b): [] for mode in ("eager", "compiled") for b in batches}
    for r in range(args.rounds):
        for mode in ("eager", "compiled"):
            os.environ["ZAYA_COMPILE_MAX_BATCH"] = "0" if mode == "eager" else str(max(batches))
            for b in batches:
                rates[mode, b].append(runner.decode(b, 32, args.new_tokens, r))
    failures = compiled.compile_failures(runner.llm.model)
    out = {"checkpoint": str(args.path), "threads": args.threads, "load": os.getloadavg()[0],
           "options": args.options, "first_compiled_step_s": compile_s, "failures": failures}
    for b in batches:
        e, c = statistics.median(rates["eager", b]), statistics.median(rates["compiled", b])
        print(f"decode b{b}: eager {e:.1f} tok/s, compiled {c:.1f} tok/s ({c / e:.2f}x); "
              f"first compiled step {compile_s[b]:.1f} s")
        out[f"decode_b{b}"] = {"eager": rates["eager", b], "compiled": rates["compiled", b], "ratio": c / e}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
