"""The kernels' arithmetic in plain PyTorch: the fallback when no compiled library is available,
and the oracle the tests hold the kernels to.

Weights are dequantized exactly to fp32 (``KernelWeight.dequantize``) a row block at a time and
multiplied in fp32; with ``act_int8`` the activations are first rounded as the kernels round them
(blocks of 32 along K, scale ``absmax / 127``, round half to even, clamp to +-127), and, as in
the kernels, only the scaled values meet the rounded activations: per-group offsets multiply the
exact row sums of x.
"""

from __future__ import annotations

import torch

from zaya.kernels.layouts import (K_ALIGN, LANES, KernelWeight, dequantize, group_offsets, padded_k, row_slice,
                                  select_expert)

ROWS_PER_CHUNK = 1024  # fp32 rows dequantized at a time (8 MB at K = 2048)


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """fp32 [M, K] -> the fp32 values the int8-activation kernels multiply by (q * d per block of 32)."""
    m, k = x.shape
    kp = padded_k(k)
    xp = torch.cat([x, x.new_zeros(m, kp - k)], 1) if kp != k else x
    blocks = xp.reshape(m, kp // K_ALIGN, K_ALIGN)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d != 0, 1 / d, torch.zeros_like(d))
    q = torch.round(blocks * inv).clamp_(-127, 127)
    return (q * d).reshape(m, kp)[:, :k]


def _dense(x: torch.Tensor, w: KernelWeight, act_int8: bool) -> torch.Tensor:
    step = ROWS_PER_CHUNK // LANES
    nb = w.data.shape[-4]
    xq = quantize_activations(x) if act_int8 else x
    out = []
    for b in range(0, nb, step):
        part = row_slice(w, b, min(nb, b + step))
        if act_int8 and part.mins is not None:
            out.append(xq @ dequantize(part, mins=False).T + x @ group_offsets(part).T)
        else:
            out.append(xq @ dequantize(part).T)
    return torch.cat(out, -1)


def matmul(x: torch.Tensor, w: KernelWeight, *, act_int8: bool = False, expert: torch.Tensor | None = None,
           out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [M, K] -> [M, N] in ``out_dtype`` (default x's); ``expert`` [M] picks each row's expert
    (negative: a zero row)."""
    out_dtype = out_dtype or x.dtype
    if act_int8 and not w.supports_act_int8:
        table = "" if w.lut is None else f" with table {w.lut.tolist()}"
        raise ValueError(f"int8 activations need int8 weights or a 4-bit table of integers spanning at most 255 "
                         f"after a power-of-two scale; got {w.fmt}{table}")
    xf = x.float()
    if expert is None:
        return _dense(xf, w, act_int8).to(out_dtype)
    rows = []
    for m in range(x.shape[0]):  # a top-1 decode step has a handful of rows; one expert each
        e = expert[m]
        y = _dense(xf[m:m + 1], select_expert(w, e.clamp(min=0)), act_int8)
        rows.append(y * (e >= 0))
    return torch.cat(rows, 0).to(out_dtype)
