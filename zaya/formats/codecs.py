"""How a stored weight matrix becomes a kernel layout: one ``Codec`` per tensor of a GGUF or
compressed-tensors checkpoint that stays compressed in memory.

A codec knows the stored tensors' shapes and dtypes (so the module that will hold them can be
built on the meta device before anything is read) and turns the stored bytes of one matrix into a
``zaya.kernels.KernelWeight`` whose ``dequantize()`` equals the format's reference
dequantization bit for bit:

==========  ===========================================  ======================================
kind        stored (per matrix; experts add a leading E)  kernel layout (``zaya.kernels``)
==========  ===========================================  ======================================
GGUF type   uint8 rows ``[N, K / block * block_bytes]``   Q8_0 / Q6_K / Q5_K / Q5_0 -> int8,
                                                          Q4_K / Q4_0 -> 4-bit table
``fp8``     float8_e4m3fn ``[N, K]`` + a scale: per        fp8 with the same scales
            tensor, per row ``[N, 1]`` or per block
            ``[ceil(N / bn), ceil(K / bk)]``
``mxfp4``   uint8 ``[N, K / 2]`` (e2m1, low nibble first)  4-bit e2m1 table, scale 2^(e - 127)
            + uint8 e8m0 exponents ``[N, K / 32]``
==========  ===========================================  ======================================

Q5_0 (``d * (q - 16)``, q five bits) has no converter in ``zaya.kernels``; it maps onto the int8
layout here, exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from zaya.kernels import KernelWeight, pack_fp8, pack_int8
from zaya.kernels.convert import GGUF_BLOCK, from_gguf, from_mxfp4

Q5_0_BLOCK = (32, 22)  # fp16 d, 4 bytes of fifth bits, 16 bytes of low nibbles
GGUF_KEPT = dict(GGUF_BLOCK, Q5_0=Q5_0_BLOCK)
ROW_BLOCK = 8192  # rows of a large matrix converted at a time (a multiple of the layouts' 16)  # the GGUF types kept compressed, (values, bytes) per block


@dataclass(frozen=True)
class Codec:
    """One stored matrix (or stack of ``experts`` matrices) of logical shape [N, K]."""

    kind: str                                  # a GGUF type name ("Q4_K", ...), "fp8" or "mxfp4"
    n: int
    k: int
    experts: int | None = None
    scale_shape: tuple[int, ...] | None = None  # per matrix (fp8: as stored; mxfp4: [N, K / 32])
    scale_dtype: torch.dtype | None = None
    block: tuple[int, int] | None = None        # fp8 block scales: (rows, columns) per scale

    @property
    def lead(self) -> tuple[int, ...]:
        return () if self.experts is None else (self.experts,)

    @property
    def data_shape(self) -> tuple[int, ...]:
        if self.kind == "fp8":
            return (*self.lead, self.n, self.k)
        if self.kind == "mxfp4":
            return (*self.lead, self.n, self.k // 2)
        per, size = GGUF_KEPT[self.kind]
        return (*self.lead, self.n, self.k // per * size)

    @property
    def data_dtype(self) -> torch.dtype:
        return torch.float8_e4m3fn if self.kind == "fp8" else torch.uint8

    @property
    def full_scale_shape(self) -> tuple[int, ...] | None:
        return None if self.scale_shape is None else (*self.lead, *self.scale_shape)

    def kernel(self, data: torch.Tensor, scale: torch.Tensor | None = None) -> KernelWeight:
        """The kernel layout of one matrix from its stored tensors (without the expert dimension)."""
        if self.kind == "fp8":
            return pack_fp8(data, scale if scale.dim() else scale.reshape(1), block=self.block)
        if self.kind == "mxfp4":
            return from_mxfp4(data, scale)
        if self.kind == "Q5_0":
            return _q5_0(data, self.k)
        return from_gguf(data, self.kind, self.k)

    def kernel_in_blocks(self, read, rows: int = ROW_BLOCK) -> KernelWeight:
        """The layout of one matrix without scales (GGUF) converted ``rows`` rows at a time:
        ``read(slice)`` gives those rows' stored bytes, so converting a large table never holds
        more than a block beyond the result."""
        out = None
        nb = -(-self.n // 16)
        for r0 in range(0, self.n, rows):
            part = self.kernel(read(slice(r0, min(self.n, r0 + rows))))
            out = _copy_rows(out, part, r0 // 16, nb, self.n)
        return out


def _copy_rows(out: KernelWeight | None, part: KernelWeight, b0: int, nb: int, n: int) -> KernelWeight:
    """Put ``part`` (a row block's layout) at n-block ``b0`` of ``out`` (allocated on first use)."""
    if out is None:
        def empty(t):
            return None if t is None else t.new_empty((nb, *t.shape[1:]))

        out = KernelWeight(part.fmt, empty(part.data), n, part.k, part.group, empty(part.scales), empty(part.mins),
                           part.lut)
    b1 = b0 + part.data.shape[0]
    for dst, src in ((out.data, part.data), (out.scales, part.scales), (out.mins, part.mins)):
        if src is not None:
            dst[b0:b1] = src
    return out


def _q5_0(raw: torch.Tensor, k: int) -> KernelWeight:
    """GGUF Q5_0 rows -> int8 ``q - 16`` with the block's fp16 scale per 32 (ggml-common.h:
    ``d``, then ``qh`` whose bit j is the fifth bit of value j, then 16 bytes whose low nibbles
    are values 0-15 and high nibbles values 16-31)."""
    per, size = Q5_0_BLOCK
    blocks = raw.reshape(*raw.shape[:-1], k // per, size)
    d = blocks[..., 0:2].contiguous().view(torch.float16)[..., 0]
    qh = blocks[..., 2:6].contiguous().view(torch.int32)[..., 0]
    qs = blocks[..., 6:22]
    low = torch.cat([qs & 0xF, qs >> 4], -1).to(torch.int32)
    high = (qh[..., None] >> torch.arange(32, dtype=torch.int32)) & 1
    q = (low | (high << 4)) - 16
    return pack_int8(q.to(torch.int8).flatten(-2), d, group=per)
