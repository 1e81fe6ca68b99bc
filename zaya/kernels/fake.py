"""Shape functions of the ``torch.ops.zaya`` operators, so ``torch.compile`` can trace a step
that calls them (the output is [rows of x, n] in ``out_dtype``, default x's dtype, for every format)."""

from __future__ import annotations

import torch


def _out(x: torch.Tensor, n: int, out_dtype) -> torch.Tensor:
    torch._check(x.dim() == 2, lambda: f"zaya kernels take 2-D activations, got {x.dim()}-D")
    return x.new_empty((x.shape[0], n), dtype=out_dtype or x.dtype)


def mv_bf16(x, w, n, expert=None, out_dtype=None):
    return _out(x, n, out_dtype)


def mv_int8(x, w, scales, mins, n, group, act_int8=False, expert=None, out_dtype=None):
    return _out(x, n, out_dtype)


def mv_4bit(x, w, scales, mins, lut, n, group, act_int8=False, expert=None, out_dtype=None):
    return _out(x, n, out_dtype)


def mv_fp8(x, w, scales, n, group, expert=None, out_dtype=None):
    return _out(x, n, out_dtype)


def read_all(t):
    return t.new_empty((1,), dtype=torch.int64)


def register() -> None:
    for fn in (mv_bf16, mv_int8, mv_4bit, mv_fp8, read_all):
        torch.library.register_fake(f"zaya::{fn.__name__}")(fn)
