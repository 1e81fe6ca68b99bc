"""One zaya GEMV at a time, timed in CPU time: per-call figures that hold up on a shared machine.

    python benchmarks/gemv_cpu_time.py --formats bf16,int8,4bit --shapes 2048x1024 --mode l2 --rows 1
    python benchmarks/gemv_cpu_time.py --formats int8,4bit --shapes 2048x1024,262272x2048 --mode mem

One thread (the default) is timed with ``time.process_time``, so time the process spends
descheduled by other jobs does not count; it still counts stalls on memory, which other jobs'
traffic can lengthen. ``--mode l2`` multiplies one weight over and over (it stays in L2 / L3: the
loop's compute ceiling); ``--mode mem`` cycles through copies filling 96 MB, so every call reads
its weight from memory, as a decode step does. Weights: random bf16, zaya int8 (per-row scale)
and zaya int4 (groups of 64, bf16 scale and zero), bf16 activations, fp32 output; GB/s counts the
bytes of the layout (weights, scales, mins). Best of 7 rounds.
"""

import argparse
import os
import time

import torch

import zaya.kernels as zk
from zaya.kernels import layouts


def make(fmt: str, n: int, k: int, g: torch.Generator) -> zk.KernelWeight:
    if fmt == "4bit":
        nibbles = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8)
        scales = torch.rand(n, k // 64, generator=g).bfloat16()
        zeros = torch.rand(n, k // 64, generator=g).bfloat16()
        return layouts.pack_4bit(nibbles, k, scales, layouts.ZAYA_INT4, group=64, mins=zeros)
    if fmt == "int8":
        q = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
        return layouts.pack_int8(q, torch.rand(n, 1, generator=g).bfloat16())
    if fmt == "bf16":
        return layouts.pack_bf16(torch.randn(n, k, generator=g).bfloat16())
    raise SystemExit(f"unknown format {fmt!r} (bf16, int8, 4bit)")


def call(w: zk.KernelWeight, x: torch.Tensor, act_int8: bool = False) -> torch.Tensor:
    ops = torch.ops.zaya
    if w.fmt == "4bit":
        return ops.mv_4bit(x, w.data, w.scales, w.mins, w.lut, w.n, w.group, act_int8, None, torch.float32)
    if w.fmt == "int8":
        return ops.mv_int8(x, w.data, w.scales, w.mins, w.n, w.group, act_int8, None, torch.float32)
    return ops.mv_bf16(x, w.data, w.n, None, torch.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", default="bf16,int8,4bit")
    ap.add_argument("--shapes", default="2048x1024", help="NxK,... (output rows x input columns)")
    ap.add_argument("--mode", choices=("l2", "mem"), default="l2")
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="more than 1: wall time instead of CPU time")
    ap.add_argument("--act-int8", action="store_true", help="int8 activations (int8 and 4bit formats)")
    args = ap.parse_args()
    if not zk.available():
        raise SystemExit(f"zaya kernels unavailable: {zk.unavailable_reason()}")
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.threads == 1 else time.perf_counter
    g = torch.Generator().manual_seed(0)
    for fmt in args.formats.split(","):
        for shape in args.shapes.split(","):
            n, k = (int(v) for v in shape.split("x"))
            first = make(fmt, n, k, g)
            copies = 1 if args.mode == "l2" else max(1, (96 << 20) // first.nbytes)
            ws = [first] + [make(fmt, n, k, g) for _ in range(copies - 1)]
            x = torch.randn(args.rows, k, generator=g).bfloat16()
            for w in ws:
                call(w, x, args.act_int8)
            reps = max(1, int(3e8 / (first.nbytes * copies)))
            best = float("inf")
            for _ in range(7):
                start = clock()
                for _ in range(reps):
                    for w in ws:
                        call(w, x, args.act_int8)
                best = min(best, (clock() - start) / (reps * copies))
            print(f"{fmt:5s}{' act8' if args.act_int8 else ''} rows={args.rows} {args.mode:3s} {n:6d}x{k:<5d} {first.nbytes / 1e6:7.2f} MB "
                  f"{best * 1e6:9.1f} us {first.nbytes / best / 1e9:6.1f} GB/s", flush=True)
    print(f"load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
