"""Checkpoint formats -> kernel layouts, exactly (``KernelWeight.dequantize`` equals the format's
reference dequantization bit for bit: zaya's own, gguf-py's for the GGUF block types,
compressed-tensors' for MXFP4 / FP8).

Each function takes one matrix ``[N, ...]`` or, with ``experts=True``, a stack ``[E, N, ...]``.

=============  ==========  ====================================================================
source         kernel      mapping
=============  ==========  ====================================================================
zaya int8      int8        q, per-row scale (group = K)
zaya int4      4bit        lut ``q - 8``, scale, min = zero (its groups)
GGUF Q8_0      int8        q, fp16 scale per 32
GGUF Q6_K      int8        ``q - 32``, scale ``d * sc`` (fp32) per 16
GGUF Q5_K      int8        q (0..31), scale ``d * sc``, min ``-dmin * m`` (fp32) per 32
GGUF Q4_K      4bit        identity lut, scale ``d * sc``, min ``-dmin * m`` (fp32) per 32
GGUF Q4_0      4bit        lut ``q - 8``, fp16 scale per 32
MXFP4          4bit        e2m1 lut, scale ``2^(e - 127)`` (bf16, exact) per 32
FP8 e4m3       fp8         ``pack_fp8`` directly (per tensor, row or block scales)
=============  ==========  ====================================================================

GGUF rows are the raw bytes of a tensor's row (``K / 256`` super-blocks, or ``K / 32`` blocks);
the formats are those of ggml (ggml-org/llama.cpp ``ggml/src/ggml-common.h``).
"""

from __future__ import annotations

import torch

from zaya.kernels.layouts import E2M1, IDENTITY, ZAYA_INT4, KernelWeight, pack_4bit, pack_int8, pack_nibbles

QK_K = 256
GGUF_BLOCK = {"Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_K": (QK_K, 144), "Q5_K": (QK_K, 176), "Q6_K": (QK_K, 210)}


def from_zaya_int8(qweight: torch.Tensor, scales: torch.Tensor, *, experts: bool = False) -> KernelWeight:
    """zaya's int8: w = q * scale[row]."""
    return pack_int8(qweight, scales[..., None], experts=experts)


def from_zaya_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, *,
                   experts: bool = False) -> KernelWeight:
    """zaya's int4 (nibbles packed low first): w = (q - 8) * scale + zero per group."""
    k = qweight.shape[-1] * 2
    return pack_4bit(qweight, k, scales, ZAYA_INT4, group=k // scales.shape[-1], mins=zeros, experts=experts)


def from_mxfp4(packed: torch.Tensor, scales_e8m0: torch.Tensor, *, experts: bool = False) -> KernelWeight:
    """MXFP4 as compressed-tensors stores it: e2m1 codes two per byte (low nibble first), one
    e8m0 exponent byte per 32 values: w = e2m1(q) * 2^(e - 127)."""
    return pack_4bit(packed, packed.shape[-1] * 2, e8m0_to_bf16(scales_e8m0), E2M1, group=32, experts=experts)


def e8m0_to_bf16(e: torch.Tensor) -> torch.Tensor:
    """2^(e - 127) exactly (bf16 shares fp32's exponent range; e = 0 is the subnormal 2^-127, 255 NaN)."""
    bits = e.to(torch.int32) << 7
    bits = torch.where(e == 0, torch.full_like(bits, 0x40), bits)
    bits = torch.where(e == 255, torch.full_like(bits, 0x7FC0), bits)
    return bits.to(torch.int16).view(torch.bfloat16)


def from_gguf(raw: torch.Tensor, type_name: str, k: int, *, experts: bool = False) -> KernelWeight:
    """A GGUF tensor's raw bytes [E?, N, bytes per row] of type Q8_0 / Q6_K / Q5_K / Q4_K / Q4_0."""
    if type_name not in GGUF_BLOCK:
        raise ValueError(f"GGUF type {type_name} has no kernel mapping; supported: {sorted(GGUF_BLOCK)}")
    per, size = GGUF_BLOCK[type_name]
    if k % per or raw.dtype != torch.uint8 or raw.shape[-1] != k // per * size:
        raise ValueError(f"{type_name} rows of K={k} are {k // per * size} uint8 bytes in blocks of {per}; got "
                         f"{raw.dtype} {tuple(raw.shape)}")
    blocks = raw.reshape(*raw.shape[:-1], k // per, size)
    return _DECODERS[type_name](blocks, k, experts)


def _f16(b: torch.Tensor) -> torch.Tensor:
    """[..., 2] bytes -> [...] float16."""
    return b.contiguous().view(torch.float16)[..., 0]


def _q8_0(blocks, k, experts):
    d, qs = _f16(blocks[..., :2]), blocks[..., 2:].contiguous().view(torch.int8)
    return pack_int8(qs.flatten(-2), d, group=32, experts=experts)


def _q4_0(blocks, k, experts):
    d, qs = _f16(blocks[..., :2]), blocks[..., 2:]
    codes = torch.cat([qs & 0xF, qs >> 4], -1)  # element j < 16: low nibble of byte j; then the high nibbles
    return pack_4bit(pack_nibbles(codes.flatten(-2)), k, d, ZAYA_INT4, group=32, experts=experts)


def _k_scales(blocks) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K: fp32 (d * sc, -(dmin * m)) per 32, [..., K / 32]."""
    d, dmin = _f16(blocks[..., 0:2]).float(), _f16(blocks[..., 2:4]).float()
    s = blocks[..., 4:16].to(torch.int32)
    lo, hi, mix = s[..., 0:4], s[..., 4:8], s[..., 8:12]  # six-bit scale and min of 8 sub-blocks
    sc = torch.cat([lo & 0x3F, (mix & 0xF) | ((lo >> 2) & 0x30)], -1)
    m = torch.cat([hi & 0x3F, (mix >> 4) | ((hi >> 2) & 0x30)], -1)
    return (d[..., None] * sc.float()).flatten(-2), (-(dmin[..., None] * m.float())).flatten(-2)


def _low_high(qs: torch.Tensor, chunk: int) -> torch.Tensor:
    """Each run of ``chunk`` bytes gives ``chunk`` low nibbles then ``chunk`` high nibbles."""
    q = qs.reshape(*qs.shape[:-1], -1, 1, chunk)
    return torch.cat([q & 0xF, q >> 4], -2).flatten(-3)


def _q4_k(blocks, k, experts):
    scale, mins = _k_scales(blocks)
    codes = _low_high(blocks[..., 16:144], 32).flatten(-2)
    return pack_4bit(pack_nibbles(codes), k, scale, IDENTITY, group=32, mins=mins, experts=experts)


def _q5_k(blocks, k, experts):
    scale, mins = _k_scales(blocks)
    qh = blocks[..., 16:48]
    high = torch.stack([(qh >> b) & 1 for b in range(8)], -2).flatten(-2)  # bit b of byte j: element 32b + j
    q = _low_high(blocks[..., 48:176], 32) | (high << 4)
    return pack_int8(q.flatten(-2).to(torch.int8), scale, group=32, mins=mins, experts=experts)


def _q6_k(blocks, k, experts):
    ql, qh = blocks[..., 0:128], blocks[..., 128:192]
    sc = blocks[..., 192:208].contiguous().view(torch.int8).float()
    d = _f16(blocks[..., 208:210]).float()
    low = _low_high(ql, 64)  # per half of 128: 64 low nibbles, 64 high nibbles
    h = qh.reshape(*qh.shape[:-1], 2, 1, 32)
    high = torch.cat([(h >> s) & 3 for s in (0, 2, 4, 6)], -2).flatten(-3)
    q = ((low | (high << 4)).to(torch.int16) - 32).to(torch.int8)
    return pack_int8(q.flatten(-2), (d[..., None] * sc).flatten(-2), group=16, experts=experts)


_DECODERS = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}
