"""Which matmul path a model should use by default: zaya's kernels against PyTorch's CPU paths,
the whole model, in one process.

    python benchmarks/kernel_defaults.py benchmarks/.checkpoints/mini-int8 --rounds 5 --threads 2

The checkpoint is loaded twice: once as zaya loads it (``zaya.kernels.Matmul`` for bf16 linears
and experts, zaya int8 / int4) and once as it loads where the kernels cannot be built (oneDNN-packed
bf16, ``_weight_int8pack_mm`` / ``_weight_int4pack_mm_for_cpu``, dequantized GEMMs for many rows).
Each round times every workload (``zaya_side.WORKLOADS``: decode at batch 1 and 8, prefill of 512)
on both models in turn, so load from other jobs hits both alike; the medians and the ratio
kernels / PyTorch are printed, then one JSON line. Two copies of the weights are in memory.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from zaya_side import ZayaRunner, set_threads  # noqa: E402


def load_both(path: Path) -> dict:
    """{"kernels": runner, "torch": runner}: the second loaded as if the kernels were unavailable."""
    import zaya.kernels as zk
    from zaya.kernels import matrix

    runners = {"kernels": ZayaRunner(path)}
    saved = zk.available, matrix.available
    zk.available = matrix.available = lambda: False
    try:
        runners["torch"] = ZayaRunner(path)
    finally:
        zk.available, matrix.available = saved
    return runners


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", type=Path)
    ap.add_argument("--workloads", default="decode_b1,decode_b8,prefill_512")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    set_threads(args.threads)
    runners = load_both(args.path)
    for r in runners.values():
        r.warm_up()
    workloads = args.workloads.split(",")
    times: dict = {(n, w): [] for n in runners for w in workloads}
    for i in range(args.rounds):
        for w in workloads:
            for name, r in runners.items():
                times[name, w].append(r.run(w, args.new_tokens, seed=i))
    result = {}
    print(f"{args.path.name}: tok/s, median of {args.rounds} alternated rounds")
    for w in workloads:
        k, t = statistics.median(times["kernels", w]), statistics.median(times["torch", w])
        result[w] = {"kernels": k, "torch": t, "ratio": k / t}
        print(f"  {w:12s} kernels {k:8.2f}  torch {t:8.2f}  ratio {k / t:5.2f}")
    print(json.dumps({"checkpoint": str(args.path), "rounds": args.rounds, "tok_s": result}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
