"""Prepacked bf16 weights for CPU matmuls.

PyTorch runs a bf16 ``F.linear`` on CPU through oneDNN, and oneDNN first reorders the weight into
its blocked layout, on every call. At decode (one row per sequence) that reorder reads and writes
the whole matrix again, so a bf16 GEMV moves about three times the bytes it needs to. oneDNN can
keep the weight in its own layout instead: ``torch.ops.mkldnn._reorder_linear_weight`` packs it
once and ``torch.ops.mkldnn._linear_pointwise`` multiplies by the packed copy (the pair PyTorch's
own compiler uses when it freezes a CPU model). The results are bit-identical to ``F.linear``;
the time of a decode step's matmuls drops by about half (``benchmarks/compare_transformers.py``).

``pack_model`` packs every ``nn.Linear`` and every expert of a bf16 model on the CPU, for inference:

* the packed copy lives beside the parameter, never in ``state_dict``, so saving a packed model
  writes the ordinary weights; a forward that needs gradients uses the parameter (``F.linear``);
* the packed copy is built from the checkpoint file read with plain I/O when the caller passes
  ``fetch``, so the memory-mapped original is never paged in: resident memory holds one copy of
  each matrix, not two (the tied embedding table is still read row by row for lookups);
* ``ZAYA_CPU_PACKED=0`` turns packing off (for comparison and debugging).
"""

from __future__ import annotations

import functools
import os
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

_OPS = hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def available(dtype: torch.dtype, device) -> bool:
    """Whether packing applies: bf16 weights on the CPU with oneDNN, and not switched off."""
    return (_OPS and dtype == torch.bfloat16 and torch.device(device or "cpu").type == "cpu"
            and torch.backends.mkldnn.is_available() and os.environ.get("ZAYA_CPU_PACKED", "1") != "0")


def pack(weight: torch.Tensor) -> torch.Tensor:
    """(N, K) bf16 -> oneDNN's blocked layout (an opaque tensor for ``matmul`` only)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 1)


def matmul(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) @ packed^T (+ bias): the same numbers as ``F.linear(x, weight, bias)``."""
    if x.dtype != torch.bfloat16:
        x = x.to(torch.bfloat16)
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Packed weights serve bf16 CPU inputs when no gradient is needed for the weight."""
    return x.dtype == torch.bfloat16 and x.device.type == "cpu" and weight.device.type == "cpu" and not (
        torch.is_grad_enabled() and weight.requires_grad)


QKV_NAMES = ("q_proj", "k_proj", "v_proj_current", "v_proj_delayed")

# A matrix larger than this (a 262k-token LM head is 1 GB) is packed in row blocks: loading then
# holds one block beyond the packed copies, and the blocks' products are concatenated.
PACK_BLOCK_BYTES = 64 << 20


class PackedLinear(nn.Linear):
    """An ``nn.Linear`` (same parameters, same state_dict) that multiplies by packed row blocks."""

    packed: list[tuple[torch.Tensor, torch.Tensor | None]] | None = None  # (block, its bias rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and usable(x, self.weight):
            if len(self.packed) == 1:
                return matmul(x, *self.packed[0])
            return torch.cat([matmul(x, w, b) for w, b in self.packed], dim=-1)
        return F.linear(x, self.weight, self.bias)


@torch.no_grad()
def pack_model(model: nn.Module, fetch: Callable[..., torch.Tensor | None] | None = None) -> int:
    """Pack the bf16 linears and experts of ``model`` in place; returns the bytes packed.

    ``fetch(name, index=None)`` may return the named parameter's values (``[index]`` of it when
    given) read into fresh memory, or None. Experts are read one at a time, so loading never holds
    more than one expert's matrix beyond the packed copies."""
    from zaya.model import ZayaCCAProjection, ZayaExperts

    def source(name: str, param: torch.Tensor, index: int | slice | None = None) -> torch.Tensor:
        t = fetch(name, index) if fetch is not None else None
        if t is None:
            return param if index is None else param[index]
        return t.to(torch.bfloat16)

    total, fused = 0, set()
    for name, module in model.named_modules():
        if isinstance(module, ZayaCCAProjection) and type(module.q_proj) is nn.Linear \
                and module.q_proj.weight.dtype == torch.bfloat16 and module.q_proj.weight.device.type == "cpu":
            # q, k and both value halves read the same input: one packed matrix, one call
            parts = [module.q_proj, module.k_proj, module.v_proj_current, module.v_proj_delayed]
            weight = torch.cat([source(f"{name}.{n}.weight", p.weight)
                                for n, p in zip(QKV_NAMES, parts)])
            bias = None if parts[0].bias is None else torch.cat([p.bias.detach() for p in parts])
            module.packed_qkv = (pack(weight), bias)
            fused.update(id(p) for p in parts)
            total += weight.numel() * 2
        elif type(module) is nn.Linear and id(module) not in fused and module.weight.dtype == torch.bfloat16 \
                and module.weight.device.type == "cpu":
            N, K = module.weight.shape
            rows = max(16, PACK_BLOCK_BYTES // (2 * K) // 16 * 16)
            module.__class__ = PackedLinear
            blocks = [slice(i, min(i + rows, N)) for i in range(0, N, rows)]
            module.packed = [(pack(source(f"{name}.weight", module.weight, b if len(blocks) > 1 else None)),
                              None if module.bias is None else module.bias.detach()[b])
                             for b in blocks]
            total += module.weight.numel() * 2
        elif isinstance(module, ZayaExperts) and isinstance(module.gate_up_proj, torch.Tensor) \
                and module.gate_up_proj.dtype == torch.bfloat16 and module.gate_up_proj.device.type == "cpu":
            module.packed = [(pack(source(f"{name}.gate_up_proj", module.gate_up_proj, e)),
                              pack(source(f"{name}.down_proj", module.down_proj, e)))
                             for e in range(module.num_experts)]
            total += (module.gate_up_proj.numel() + module.down_proj.numel()) * 2
            release_free_heap()
    release_free_heap()
    return total


def release_free_heap() -> None:
    """Hand the temporaries' freed heap pages back to the OS (glibc keeps them otherwise)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, looked up once (find_library runs ldconfig); None elsewhere."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
