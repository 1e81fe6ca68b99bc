"""Decode attention for reduced-precision models on the CPU, as a module swap.

PyTorch's CPU flash-attention kernel in bf16 costs about 1 us per cached key and head group at
decode (one query row); above ``DECODE_ATTENTION_MIN_KEYS`` keys two fp32 matmuls and a softmax
are faster and at least as precise (``benchmarks/kernels.py --attention``). fp32 models keep
SDPA, so the fp32 parity tests run the reference's ops.
"""

from __future__ import annotations

import torch
from torch import nn

from zaya.model import ScaledDotProductAttention, replace_modules

DECODE_ATTENTION_MIN_KEYS = 128
DECODE_ATTENTION_MAX_QUERIES = 17  # a speculative verify (a draft of up to 16 tokens) takes this path too,
                                   # so its positions are computed as the decode steps they replace


def available(dtype: torch.dtype, device) -> bool:
    """Whether the swap applies: bf16/fp16 weights on the CPU."""
    return dtype != torch.float32 and torch.device(device or "cpu").type == "cpu"


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                     scale: float) -> torch.Tensor:
    """A few query rows per sequence: q (B, Hq, S, D), k/v (B, Hkv, L, D), mask None or bool
    (B, 1, S, L). Computed in fp32, returned in q's dtype."""
    B, Hq, S, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scores = torch.matmul(q.float().view(B, Hkv, G * S, D), k.float().transpose(-1, -2)).mul_(scale)
    if mask is not None:
        scores.view(B, Hkv, G, S, L).masked_fill_(~mask.view(B, 1, 1, S, L), float("-inf"))
    out = torch.matmul(scores.softmax(-1), v.float())                 # (B, Hkv, G*S, D)
    return out.view(B, Hq, S, D).to(q.dtype)


class CPUDecodeAttention(ScaledDotProductAttention):
    """SDPA, except for a few reduced-precision CPU query rows over a long cache (``decode_attention``)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> torch.Tensor:
        if q.shape[2] <= DECODE_ATTENTION_MAX_QUERIES and k.shape[2] > DECODE_ATTENTION_MIN_KEYS \
                and q.dtype != torch.float32 and q.device.type == "cpu" and not isinstance(mask, str):
            return decode_attention(q, k, v, mask, self.scale)
        return super().forward(q, k, v, mask)


def swap_modules(model: nn.Module) -> nn.Module:
    """Put ``CPUDecodeAttention`` in place of every plain attention kernel of ``model``."""
    replace_modules(model, lambda name, m: CPUDecodeAttention(m.head_dim)
                    if type(m) is ScaledDotProductAttention else None)
    return model
