"""``Matmul``: one weight in a kernel layout and the one rule for multiplying by it.

Every module class that keeps a weight in the kernels' layout (bf16 linears and experts, zaya
int8 / int4, and any format a converter maps onto a ``KernelWeight``) multiplies through a
``Matmul``, so which loop serves how many rows is decided here and nowhere else:

* bf16 weights, and int8 / 4-bit weights with int8 activations, run the kernels at every row
  count: their row loop reuses each 16-row block of the weight from cache for up to 8 rows at a
  time, which at 32 rows and more is within 0-20% of oneDNN's prepacked GEMM (``vdpbf16ps`` /
  ``vpdpbusd``, benchmarks/kernels.py), so one copy of the weight serves decode and prefill;
* 4-bit weights with exact (float) activations run the kernels at every row count too: their
  table lookup makes a dequantized copy slow (2048 x 1024 at 512 rows, one thread, loaded
  machine: kernel 28-44 ms, dequantized GEMM 74-134);
* int8 weights with exact activations run the kernels for stacked experts (rows are spread over
  the experts, a few dozen each at a 512-token prefill) and for a single matrix up to
  ``EXACT_ROWS`` rows; beyond that their fp32 loop is compute-bound and a GEMM on a bf16 copy
  dequantized for the call, a row block at a time, is faster (2048 x 1024, kernel 1.4 / 13.5 /
  86 ms at 32 / 128 / 512 rows, the dequantized GEMM 17 / 24 / 58).

``act_int8`` (quantized weights only) rounds the activations to int8 per 32 columns, as llama.cpp
does for its quantized types: 2-4x the throughput at several rows, 0.5% relative error on a
matmul's output. It is chosen once per weight (``ZAYA_ACT_INT8=1``; off by default, so quantized
weights give the reference path's numbers up to summation order), never per batch size, so a
sequence's numbers do not depend on what it is batched with.
"""

from __future__ import annotations

import os
from typing import Callable

import torch
import torch.nn.functional as F

from zaya.kernels import build, reference
from zaya.kernels.layouts import LANES, ROW_BLOCK, KernelWeight, dequantize_bf16, row_slice

EXACT_ROWS = 256


def available() -> bool:
    """Whether the compiled kernels are loaded (building them on the first call)."""
    ok = build._state.get("ok")
    return build.load() if ok is None else ok


def unavailable_reason() -> str | None:
    return build.unavailable_reason()


def matmul(x: torch.Tensor, w: KernelWeight, *, act_int8: bool = False, expert: torch.Tensor | None = None,
           out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [..., K] @ w.T -> [..., N] in ``out_dtype`` (default x's dtype; float32 keeps the fp32 sums).

    ``expert`` (int64 [rows of x], only for stacked weights) picks each row's expert; a negative
    index gives a zero row (a top-1 router's skip class)."""
    if x.shape[-1] != w.k:
        raise ValueError(f"x has {x.shape[-1]} columns, the weight {w.k}")
    if (expert is None) != (w.experts is None):
        raise ValueError("expert indices go with stacked expert weights, and only with them")
    if act_int8 and w.fmt not in ("int8", "4bit"):  # the 4-bit table is checked where it is used
        raise ValueError(f"act_int8 applies to int8 and 4-bit weights, not {w.fmt}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, w.k)
    if x2.dtype not in (torch.float32, torch.bfloat16):
        x2 = x2.float()
    if expert is not None:
        expert = expert.reshape(-1)
    out_dtype = out_dtype or x.dtype
    kernel_dtype = out_dtype if out_dtype in (torch.float32, torch.bfloat16) else torch.float32
    if available():
        y = _compiled(x2, w, act_int8, expert, kernel_dtype)
    else:
        y = reference.matmul(x2, w, act_int8=act_int8, expert=expert, out_dtype=kernel_dtype)
    return y.to(out_dtype).reshape(*lead, w.n)


def _compiled(x, w: KernelWeight, act_int8: bool, expert, out_dtype):
    ops = torch.ops.zaya
    if w.fmt == "bf16":
        return ops.mv_bf16(x, w.data, w.n, expert, out_dtype)
    if w.fmt == "int8":
        return ops.mv_int8(x, w.data, w.scales, w.mins, w.n, w.group, act_int8, expert, out_dtype)
    if w.fmt == "4bit":
        return ops.mv_4bit(x, w.data, w.scales, w.mins, w.lut, w.n, w.group, act_int8, expert, out_dtype)
    return ops.mv_fp8(x, w.data, w.scales, w.n, w.group, expert, out_dtype)


def default_act_int8() -> bool:
    """Whether quantized weights take int8 activations (``ZAYA_ACT_INT8=1``; exact ones by default)."""
    return os.environ.get("ZAYA_ACT_INT8", "0") == "1"


class Matmul:
    """``x @ w.T (+ bias)`` for a ``KernelWeight`` (a matrix, or a stack of experts chosen per row)."""

    def __init__(self, w: KernelWeight, bias: torch.Tensor | None = None, *, act_int8: bool | None = None):
        if act_int8 is None:
            act_int8 = w.supports_act_int8 and default_act_int8()
        if act_int8 and not w.supports_act_int8:
            raise ValueError(f"int8 activations do not apply to {w.fmt} weights with table {w.lut}")
        self.w, self.act_int8 = w, act_int8
        self.bias = None if bias is None else bias.detach().float()

    @property
    def n(self) -> int:
        return self.w.n

    def __call__(self, x: torch.Tensor, expert: torch.Tensor | None = None, *,
                 out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """x [..., K] -> [..., N] in ``out_dtype`` (default x's dtype). With a stacked weight,
        ``expert`` (int64, one per row of x) picks each row's expert; negative gives a zero row."""
        out_dtype = out_dtype or x.dtype
        rows = x.numel() // max(1, x.shape[-1])
        kernel_dtype = torch.float32 if self.bias is not None else out_dtype
        if (self.w.fmt in ("bf16", "4bit") or self.act_int8 or expert is not None or rows <= EXACT_ROWS
                or not available()):
            y = matmul(x, self.w, act_int8=self.act_int8, expert=expert, out_dtype=kernel_dtype)
        else:
            y = self._dequantized(x, kernel_dtype)
        if self.bias is not None:
            y = (y + self.bias).to(out_dtype)
        return y

    def _dequantized(self, x: torch.Tensor, out_dtype) -> torch.Tensor:
        """Many rows of an exactly-multiplied quantized matrix: a bf16 GEMM per row block, so the
        dequantized copy never exceeds a block."""
        lead, x2 = x.shape[:-1], x.reshape(-1, self.w.k).to(torch.bfloat16)
        return _gemm_blocks(x2, self.w).to(out_dtype).reshape(*lead, self.w.n)


def _gemm_blocks(x: torch.Tensor, w: KernelWeight) -> torch.Tensor:
    step = ROW_BLOCK // LANES
    nb = w.data.shape[-4]
    parts = [F.linear(x, dequantize_bf16(row_slice(w, b, min(nb, b + step)))).float()
             for b in range(0, nb, step)]
    return torch.cat(parts, -1)


def swiglu_experts(gate_up: Matmul, down: Matmul, x: torch.Tensor, index: torch.Tensor, weight: torch.Tensor,
                   num_experts: int) -> torch.Tensor:
    """Top-1 SwiGLU experts on stacked weights: x (N, H), index (N,) in [0, E] where E is the skip
    class, gate weight (N,). Each row's expert is chosen inside the kernels (rows grouped by expert,
    each chosen expert's weights read once per call, no host synchronisation); a skip row is zero.
    The arithmetic is ``ZayaExperts.forward``'s: silu(gate) * up, down, times the gate weight."""
    expert = torch.where(index < num_experts, index, -1)
    gate, up = gate_up(x, expert).chunk(2, dim=-1)
    return (down(F.silu(gate) * up, expert) * weight[:, None]).to(x.dtype)


# ------------------------------------------------------------------------------- building
def pack_in_blocks(pack: Callable[[slice], KernelWeight], n: int, rows: int = ROW_BLOCK) -> KernelWeight:
    """One KernelWeight of ``n`` rows packed ``rows`` at a time (``pack(rows)`` packs that slice
    of the source, read on demand): packing a 1 GB head holds one block of the source, not all."""
    if rows % LANES:
        raise ValueError(f"row blocks must be a multiple of {LANES} rows, got {rows}")
    out = None
    for r0 in range(0, n, rows):
        part = pack(slice(r0, min(n, r0 + rows)))
        if out is None:
            out = _allocate(part, -(-n // LANES), n, lead=())
        _copy_into(out, part, (slice(r0 // LANES, r0 // LANES + part.data.shape[0]),))
    return out


def stack_experts(pack: Callable[[int], KernelWeight], experts: int) -> KernelWeight:
    """A stacked KernelWeight ``[experts, ...]`` packed one expert at a time (``pack(e)``)."""
    out = None
    for e in range(experts):
        part = pack(e)
        if out is None:
            out = _allocate(part, part.data.shape[0], part.n, lead=(experts,))
        _copy_into(out, part, (e,))
    return out


def _allocate(part: KernelWeight, nb: int, n: int, lead: tuple[int, ...]) -> KernelWeight:
    def empty(t):
        return None if t is None else t.new_empty((*lead, nb, *t.shape[1:]))

    return KernelWeight(part.fmt, empty(part.data), n, part.k, part.group, empty(part.scales), empty(part.mins),
                        part.lut, lead[0] if lead else None)


def _copy_into(out: KernelWeight, part: KernelWeight, index: tuple) -> None:
    for dst, src in ((out.data, part.data), (out.scales, part.scales), (out.mins, part.mins)):
        if dst is not None:
            dst[index] = src

