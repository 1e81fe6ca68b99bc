"""Matrix-vector kernels for decode: a few activation rows against bf16, int8, 4-bit or fp8 weights.

Weights are packed once at load into a ``KernelWeight`` (``pack_bf16``, ``pack_int8``,
``pack_4bit``, ``pack_fp8``, or a converter in ``zaya.kernels.convert``) and multiplied with
``matmul(x, w)``, which calls the compiled ``torch.ops.zaya.mv_*`` operators (C++, built on first
use; see ``build``) or, when they are unavailable, the PyTorch reference (``reference``).

Results match dequantize-to-fp32-then-matmul up to fp32 summation order. ``act_int8=True`` (int8
and 4-bit weights) quantizes the activations to int8 per 32 columns, as llama.cpp does, and
multiplies in int32 (VNNI): faster at several rows, but it changes the numerics by the
activations' rounding. Rows beyond ~16 (prefill) belong to a GEMM on a dequantized copy.
"""

from __future__ import annotations

import torch

from zaya.kernels import build, reference
from zaya.kernels.layouts import (E2M1, IDENTITY, ZAYA_INT4, KernelWeight, pack_4bit, pack_bf16, pack_fp8,
                                  pack_int8, pack_nibbles, take_rows, unpack_nibbles)

__all__ = ["E2M1", "IDENTITY", "KernelWeight", "ZAYA_INT4", "available", "matmul", "pack_4bit", "pack_bf16",
           "pack_fp8", "pack_int8", "pack_nibbles", "take_rows", "unavailable_reason", "unpack_nibbles"]

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
