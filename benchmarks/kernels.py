"""The matmul kernels zaya chooses between on CPU, timed side by side on one weight shape.

    python benchmarks/kernels.py                         # N=2048, K=1024 (a mini expert's gate_up)
    python benchmarks/kernels.py --n 32768 --k 1024      # the mini LM head
    python benchmarks/kernels.py --threads 1
    python benchmarks/kernels.py --attention             # decode attention against the cache length

For each number of rows M (1 = batch-1 decode, 8 = batch-8 decode, 512 = prefill) it prints the
median time of: bf16 ``F.linear`` (what eager PyTorch and transformers run), bf16 with the weight
prepacked once (``zaya.packed``), the int8 and int4 kernels, int8 and int4 dequantized to bf16
for the call, and the achieved GB/s of weight bytes for the bf16 paths. zaya's switch from the
kernels to a dequantized copy (``zaya.quant.DEQUANT_ROWS``) comes from here.

``--attention`` times one decode step's attention (8 query heads, 2 KV heads of 128, bf16 cache)
through PyTorch's SDPA and through ``zaya.cpu_attention.decode_attention`` for growing cache lengths
(``zaya.cpu_attention.DECODE_ATTENTION_MIN_KEYS`` comes from here).

``--zaya-kernels`` times the decode kernels of ``zaya.kernels`` for every weight format on the
ZAYA1-8B shapes against PyTorch's paths, alternated, in GB/s of weight bytes next to a memory
read bandwidth measured in the same run (``benchmarks/decode_kernels.py``; 2 threads unless
``--threads``):

    python benchmarks/kernels.py --zaya-kernels
    python benchmarks/kernels.py --zaya-kernels --shapes gate_up --rows 1,8 --rounds 5
    python benchmarks/kernels.py --zaya-kernels --compute   # per-core ceiling, weights in L3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def timed(fn, repeat: int) -> float:
    for _ in range(3):
        fn()
    runs = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t)
    return statistics.median(runs)


def main(argv=None) -> int:
    from zaya import packed
    from zaya.quant import QuantSpec, QuantWeight, dequantize, quantize_tensor

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--rows", default="1,2,4,8,16,64,512")
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--attention", action="store_true", help="time decode attention instead")
    ap.add_argument("--zaya-kernels", action="store_true", help="time zaya.kernels' formats instead")
    ap.add_argument("--shapes", default="attn,gate_up,down,head", help="with --zaya-kernels")
    ap.add_argument("--rounds", type=int, default=3, help="with --zaya-kernels: alternated rounds")
    ap.add_argument("--compute", action="store_true", help="with --zaya-kernels: compute ceiling, 1 thread")
    args = ap.parse_args(argv)
    if args.zaya_kernels:
        from decode_kernels import compute_ceiling, run

        torch.set_num_threads(args.threads or 2)
        rows = [int(r) for r in ("1,2,4,8" if args.rows == ap.get_default("rows") else args.rows).split(",")]
        if args.compute:
            return compute_ceiling(rows, args.repeat)
        return run(args.shapes.split(","), rows, args.rounds, args.repeat)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.attention:
        return attention(args.repeat)
    torch.manual_seed(0)
    w = torch.randn(args.n, args.k).mul_(0.02).bfloat16()
    pw = packed.pack(w) if packed.available(torch.bfloat16, "cpu") else None
    q8, s8 = quantize_tensor(w, QuantSpec(8), torch.bfloat16)
    s8 = s8.contiguous()
    q4 = quantize_tensor(w, QuantSpec(4, 64), torch.bfloat16)
    i4 = QuantWeight(*q4, torch.bfloat16)
    mb = args.n * args.k * 2 / 1e6
    print(f"weight {args.n}x{args.k} ({mb:.1f} MB in bf16), {torch.get_num_threads()} threads; median microseconds")
    cols = ["bf16 linear", "bf16 packed", "int8 kernel", "int8 dequant", "int4 kernel", "int4 dequant",
            "GB/s linear", "GB/s packed"]
    print(f"{'M':>5} " + " ".join(f"{c:>15}" for c in cols))
    for M in (int(r) for r in args.rows.split(",")):
        x = torch.randn(M, args.k).bfloat16()
        t = {
            "bf16 linear": timed(lambda: F.linear(x, w), args.repeat),
            "bf16 packed": timed(lambda: packed.matmul(x, pw), args.repeat) if pw is not None else float("nan"),
            "int8 kernel": timed(lambda: torch.ops.aten._weight_int8pack_mm(x, q8, s8), args.repeat),
            "int8 dequant": timed(lambda: F.linear(x, dequantize(q8, s8, None, torch.bfloat16)), args.repeat),
            "int4 kernel": timed(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(
                x, i4.packed, i4.group, i4.scale_zeros), args.repeat),
            "int4 dequant": timed(lambda: F.linear(x, dequantize(*q4, torch.bfloat16)), args.repeat),
        }
        t["GB/s linear"] = mb / 1e3 / t["bf16 linear"]
        t["GB/s packed"] = mb / 1e3 / t["bf16 packed"]
        print(f"{M:>5} " + " ".join(f"{(v if c.startswith('GB/s') else v * 1e6):>15.1f}" for c, v in t.items()))
    return 0


def attention(repeat: int) -> int:
    from zaya.cpu_attention import decode_attention

    print(f"decode attention, 8 query / 2 KV heads of 128, bf16, {torch.get_num_threads()} threads; median us")
    print(f"{'keys':>6} {'sdpa':>10} {'zaya':>10}")
    for L in (32, 64, 128, 256, 1024, 4096):
        q, k, v = (torch.randn(1, h, n, 128).bfloat16() for h, n in ((8, 1), (2, L), (2, L)))
        a = timed(lambda: F.scaled_dot_product_attention(q, k, v, scale=0.088, enable_gqa=True), repeat)
        b = timed(lambda: decode_attention(q, k, v, None, 0.088), repeat)
        print(f"{L:>6} {a * 1e6:>10.1f} {b * 1e6:>10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
