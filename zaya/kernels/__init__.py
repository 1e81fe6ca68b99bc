"""Matrix-vector kernels for decode: a few activation rows against bf16, int8, 4-bit or fp8 weights.

Weights are packed once at load into a ``KernelWeight`` (``pack_bf16``, ``pack_int8``,
``pack_4bit``, ``pack_fp8``, or a converter in ``zaya.kernels.convert``) and multiplied with
``matmul(x, w)``, which calls the compiled ``torch.ops.zaya.mv_*`` operators (C++, built on first
use; see ``build``) or, when they are unavailable, the PyTorch reference (``reference``).
Module classes multiply through a ``Matmul`` (``zaya.kernels.matrix``), the one rule for which
loop serves how many rows.

Results match dequantize-to-fp32-then-matmul up to fp32 summation order. ``act_int8=True`` (int8
and 4-bit weights) quantizes the activations to int8 per 32 columns, as llama.cpp does, and
multiplies in int32 (VNNI): faster at several rows, but it changes the numerics by the
activations' rounding.
"""

from __future__ import annotations

from zaya.kernels.layouts import (E2M1, IDENTITY, ZAYA_INT4, KernelWeight, pack_4bit, pack_bf16, pack_fp8,
                                  pack_int8, pack_nibbles, take_rows, unpack_nibbles)
from zaya.kernels.matrix import (Matmul, available, default_act_int8, matmul, pack_in_blocks, stack_experts,
                                 swiglu_experts, unavailable_reason)

__all__ = ["E2M1", "IDENTITY", "KernelWeight", "Matmul", "ZAYA_INT4", "available", "default_act_int8", "matmul",
           "pack_4bit", "pack_bf16", "pack_fp8", "pack_in_blocks", "pack_int8", "pack_nibbles", "stack_experts",
           "swiglu_experts", "take_rows", "unavailable_reason", "unpack_nibbles"]
