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


def fused_attention(h, norm_w, eps, qkv, qkv_meta, conv_k0, conv_b0, conv_k1, conv_b1, temp, cos, sin, conv, vdelay,
                    state, state0, kv, write, write0, read, read0, L, mask, num_heads, num_kv_heads, head_dim, S, keep):
    B, C, Hv = h.shape[0] // S if keep else 0, conv.shape[1], vdelay.shape[1]
    return (h.new_empty((h.shape[0], num_heads * head_dim), dtype=norm_w.dtype),
            h.new_empty((B, C, conv.shape[2] + S), dtype=norm_w.dtype), h.new_empty((B, S, Hv), dtype=norm_w.dtype))


def fused_moe(o, h, router_state, mats, meta, vecs, eps_post, eps_router, num_experts):
    # meta holds four integers per matrix (format, n, group, act_int8); the second matrix is the router's down_proj
    return h.new_empty(h.shape), o.new_empty((h.shape[0], meta[5])), h.new_empty((h.shape[0],), dtype=torch.int64)


def register() -> None:
    for fn in (mv_bf16, mv_int8, mv_4bit, mv_fp8, read_all, fused_attention, fused_moe):
        torch.library.register_fake(f"zaya::{fn.__name__}")(fn)
