"""zaya.kernels' decode matvecs against PyTorch's CPU paths, in GB/s of weight bytes.

Run through ``python benchmarks/kernels.py --zaya-kernels`` (see there). For each ZAYA1-8B shape
and row count M, every format is timed alternately with the PyTorch path zaya uses today for the
nearest format: oneDNN-prepacked bf16 (``zaya.packed``; the head in its 64 MB row blocks),
``_weight_int8pack_mm`` (int8, one scale per row) and ``_weight_int4pack_mm_for_cpu`` (int4,
groups of 64). Each call reads a different copy of the weights, cycling through at least 256 MB,
so every figure is a read from memory, as in a decode step, not from the 32 MB L3.

The first row of each shape is the memory read bandwidth, measured the same way in the same
rounds: ``torch.ops.zaya.read_all`` reads buffers as large as the bf16 weight once (an XOR of
every word, split across threads like the kernels; ``torch.sum``, whose reduction synchronises
its threads more, reads slower and suffers more on a loaded machine). A cell is the best call of
``--rounds`` alternated rounds and its share is against that row; on a shared machine the best
call is the closest to what an idle one does (the median is in the JSON line, which ends the
output with every figure).
"""

from __future__ import annotations

import json
import os
import statistics
import time

import torch

import zaya.kernels as zk
from zaya import packed
from zaya.kernels import convert
from zaya.quant import QuantWeight

SHAPES = {"attn": (2048, 2048), "gate_up": (4096, 2048), "down": (2048, 2048), "head": (262272, 2048)}
WORKING_SET = 256 << 20
READ = "memory read (read_all)"


def weight_bytes(w) -> int:
    """Bytes one product reads: the kernel's layout, or PyTorch's packed copy and its scales."""
    if isinstance(w, zk.KernelWeight):
        return w.nbytes
    if isinstance(w, QuantWeight):
        return w.packed.numel() * w.packed.element_size() + w.scale_zeros.numel() * w.scale_zeros.element_size()
    return sum(t.numel() * t.element_size() for t in w)  # oneDNN blocks, or (int8 values, scales)


def candidates(n: int, k: int):
    """(label, build() -> weights, fn(x, weights)) for every format and PyTorch path. Values are
    random: the speed of a matvec does not depend on them."""
    g = torch.Generator().manual_seed(0)
    u8 = lambda *s: torch.randint(0, 256, s, generator=g, dtype=torch.uint8)  # noqa: E731
    bf16 = lambda *s: torch.rand(*s, generator=g).sub_(0.5).bfloat16()  # noqa: E731

    def onednn():
        w = bf16(n, k)
        rows = max(1, packed.PACK_BLOCK_BYTES // (2 * k))
        return [packed.pack(w[i:i + rows]) for i in range(0, n, rows)]

    def int8_rows():
        return u8(n, k).view(torch.int8), torch.rand(n, generator=g).bfloat16()

    def int4_g64():
        return u8(n, k // 2), torch.rand(n, k // 64, generator=g).bfloat16(), torch.rand(n, k // 64).bfloat16()

    def q8_0():
        return zk.pack_int8(u8(n, k).view(torch.int8), torch.rand(n, k // 32, generator=g).half(), group=32)

    def q4_k():
        s, m = torch.rand(n, k // 32, generator=g), -torch.rand(n, k // 32, generator=g)
        return zk.pack_4bit(u8(n, k // 2), k, s, zk.IDENTITY, group=32, mins=m)

    def mxfp4():
        return convert.from_mxfp4(u8(n, k // 2), u8(n, k // 32) % 8 + 120)

    def fp8():
        return zk.pack_fp8((u8(n, k) & 0x77).view(torch.float8_e4m3fn), torch.rand(n, generator=g))

    kern = lambda act: lambda x, w: zk.matmul(x, w, act_int8=act)  # noqa: E731
    read = (lambda x, w: torch.ops.zaya.read_all(w[0])) if zk.available() else (lambda x, w: w[0].sum())
    return [
        (READ, lambda: [u8(n * k * 2)], read),
        ("torch bf16 oneDNN packed", onednn, lambda x, w: torch.cat([packed.matmul(x, b) for b in w], -1)),
        ("zaya bf16", lambda: zk.pack_bf16(bf16(n, k)), kern(False)),
        ("torch int8 _weight_int8pack_mm", lambda: (lambda q, s: (q, s.contiguous()))(*int8_rows()),
         lambda x, w: torch.ops.aten._weight_int8pack_mm(x, *w)),
        ("zaya int8 per-row exact", lambda: convert.from_zaya_int8(*int8_rows()), kern(False)),
        ("zaya int8 per-row act8", lambda: convert.from_zaya_int8(*int8_rows()), kern(True)),
        ("zaya Q8_0 exact", q8_0, kern(False)),
        ("zaya Q8_0 act8", q8_0, kern(True)),
        ("torch int4 _weight_int4pack_mm", lambda: QuantWeight(*int4_g64(), torch.bfloat16),
         lambda x, w: torch.ops.aten._weight_int4pack_mm_for_cpu(x, w.packed, w.group, w.scale_zeros)),
        ("zaya int4 g64 exact", lambda: convert.from_zaya_int4(*int4_g64()), kern(False)),
        ("zaya int4 g64 act8", lambda: convert.from_zaya_int4(*int4_g64()), kern(True)),
        ("zaya Q4_K exact", q4_k, kern(False)),
        ("zaya Q4_K act8", q4_k, kern(True)),
        ("zaya MXFP4 exact", mxfp4, kern(False)),
        ("zaya MXFP4 act8", mxfp4, kern(True)),
        ("zaya fp8 per-row", fp8, kern(False)),
    ]


def time_calls(fn, copies, x, repeat: int) -> list[float]:
    for w in copies:
        fn(x, w)
    runs = []
    for i in range(repeat):
        t = time.perf_counter()
        fn(x, copies[i % len(copies)])
        runs.append(time.perf_counter() - t)
    return runs


def measure_shape(name: str, rows: list[int], rounds: int, repeat: int) -> dict:
    n, k = SHAPES[name]
    results = {}
    for label, build, fn in candidates(n, k):
        first = build()
        size = weight_bytes(first)
        copies = [first] + [build() for _ in range(max(1, -(-WORKING_SET // size)) - 1)]
        runs = {m: [] for m in rows}
        for _ in range(rounds):  # the rounds alternate the row counts, and the formats share the minutes
            for m in rows:
                x = torch.randn(m, k).bfloat16()
                runs[m] += time_calls(fn, copies, x, repeat)
        results[label] = {"bytes": size, "best_gb_s": {m: size / min(r) / 1e9 for m, r in runs.items()},
                          "median_gb_s": {m: size / statistics.median(r) / 1e9 for m, r in runs.items()}}
        del copies, first
    return results


def activation_error(n: int = 4096, k: int = 2048, rows: int = 8) -> dict:
    """Relative error (Frobenius) of int8 activations against the exact kernel, for Gaussian rows
    and for rows with outlier channels (1% of columns 20x larger, as after an LLM's norms)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(rows, k, generator=g)
    spiky = x.clone()
    spiky[:, torch.randperm(k, generator=g)[: k // 100]] *= 20
    out = {}
    for label, build, fn in candidates(n, k):
        if not label.endswith("act8"):
            continue
        w = build()
        for name, xs in (("gaussian", x), ("outliers", spiky)):
            xb = xs.bfloat16()
            exact = zk.matmul(xb, w, out_dtype=torch.float32)
            err = (zk.matmul(xb, w, act_int8=True, out_dtype=torch.float32) - exact).norm() / exact.norm()
            out.setdefault(label, {})[name] = err.item()
    return out


def compute_ceiling(rows: list[int], repeat: int, k: int = 2048) -> int:
    """Each kernel's throughput when memory is not the limit: the marginal GB/s between 1024 and
    4096 output rows with the weights resident in L3 (one thread; fixed per-call costs cancel)."""
    torch.set_num_threads(1)
    print(f"compute ceiling: marginal GB/s between N=1024 and 4096, K={k}, L3-resident, 1 thread, "
          f"load {os.getloadavg()[0]:.1f}")
    print(f"{'path':32} " + " ".join(f"{'M=' + str(m):>7}" for m in rows))
    out = {}
    for (label, build_a, fn), (_, build_b, _) in zip(candidates(1024, k), candidates(4096, k)):
        if not label.startswith("zaya"):
            continue
        a, b = build_a(), build_b()
        cells = {}
        for m in rows:
            x = torch.randn(m, k).bfloat16()
            ta, tb = (min(time_calls(fn, [w], x, repeat * 10)) for w in (a, b))
            cells[m] = (weight_bytes(b) - weight_bytes(a)) / max(tb - ta, 1e-9) / 1e9
        out[label] = cells
        print(f"{label:32} " + " ".join(f"{cells[m]:7.1f}" for m in rows), flush=True)
    print(json.dumps({"compute_ceiling_gb_s": out}))
    return 0


def run(shapes: list[str], rows: list[int], rounds: int, repeat: int) -> int:
    if not zk.available():
        print(f"zaya.kernels unavailable ({zk.unavailable_reason()}): the figures below are the PyTorch reference")
    report = {"threads": torch.get_num_threads(), "load_before": os.getloadavg()[0], "shapes": {}}
    for name in shapes:
        report["shapes"][name] = measure_shape(name, rows, rounds, max(8, repeat // 2))
    report["load_after"] = os.getloadavg()[0]
    report["act8_rel_error"] = activation_error()
    print("int8 activations, relative error against the exact kernel (4096x2048, 8 rows):")
    for label, e in report["act8_rel_error"].items():
        print(f"  {label:32} gaussian {e['gaussian']:.2e}   with outlier channels {e['outliers']:.2e}")
    print(f"{torch.get_num_threads()} threads; load average {report['load_before']:.1f} -> {report['load_after']:.1f}; "
          f"best of {rounds} alternated rounds")
    for name, res in report["shapes"].items():
        n, k = SHAPES[name]
        read = res[READ]["best_gb_s"]
        print(f"\n{name} {n}x{k}: GB/s of weight bytes (share of the read bandwidth){' ' * 18}t(M=8)/t(M=1)")
        print(f"{'path':32} {'MB':>7} " + " ".join(f"{'M=' + str(m):>13}" for m in rows))
        for label, r in res.items():
            cells = " ".join(f"{r['best_gb_s'][m]:6.1f} ({r['best_gb_s'][m] / read[m]:4.0%})" for m in rows)
            slow = (f"{r['best_gb_s'][1] / r['best_gb_s'][8]:8.2f}" if 1 in rows and 8 in rows else "")
            print(f"{label:32} {r['bytes'] / 1e6:7.1f} {cells} {slow}")
    print(json.dumps(report))
    return 0
