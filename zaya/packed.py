"""Prepacked bf16 weights for CPU matmuls, as module swaps.

PyTorch runs a bf16 ``F.linear`` on CPU through oneDNN, and oneDNN first reorders the weight into
its blocked layout, on every call. At decode (one row per sequence) that reorder reads and writes
the whole matrix again, so a bf16 GEMV moves about three times the bytes it needs to. oneDNN can
keep the weight in its own layout instead: ``torch.ops.mkldnn._reorder_linear_weight`` packs it
once and ``torch.ops.mkldnn._linear_pointwise`` multiplies by the packed copy (the pair PyTorch's
own compiler uses when it freezes a CPU model). The results are bit-identical to ``F.linear``;
the time of a decode step's matmuls drops by about half (``benchmarks/compare_transformers.py``).

``swap_modules`` gives the float linears, CCA projections and experts of a bf16 CPU model their
packed classes (``PackedLinear``, ``PackedCCAProjection`` with q, k and both value halves in one
matrix, ``PackedExperts``); each module's ``prepare`` then builds its packed copy once the
weights are real. ``pack_model`` does both for a model already in memory.

* the packed copy lives beside the parameter, never in ``state_dict``, so saving a packed model
  writes the ordinary weights; a forward that needs gradients uses the parameter (``F.linear``);
* ``prepare`` takes a ``reader`` whose ``tensor(name, index)`` returns the module's weight read
  from the checkpoint file into fresh memory, so the memory-mapped original is never paged in: resident
  memory holds one copy of each matrix, not two (the tied embedding table is still read row by
  row for lookups);
* ``ZAYA_CPU_PACKED=0`` turns packing off (for comparison and debugging).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from zaya.model import ZayaCCAProjection, ZayaExperts, replace_modules

_OPS = hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and hasattr(torch.ops.mkldnn, "_linear_pointwise")

QKV_NAMES = ("q_proj", "k_proj", "v_proj_current", "v_proj_delayed")

# A matrix larger than this (a 262k-token LM head is 1 GB) is packed in row blocks: loading then
# holds one block beyond the packed copies, and the blocks' products are concatenated.
PACK_BLOCK_BYTES = 64 << 20


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


def _packable(weight: torch.Tensor) -> bool:
    return weight.dtype == torch.bfloat16 and weight.device.type == "cpu"


def _read(reader, name: str, param: torch.Tensor, index: int | slice | None = None) -> torch.Tensor:
    """The module's weight ``name`` (``[index]`` of it) from the reader's fresh memory, else the parameter."""
    t = reader.tensor(name, index) if reader is not None else None
    if t is None:
        return param if index is None else param[index]
    return t.to(torch.bfloat16)


# ------------------------------------------------------------------------------------ modules
class PackedLinear(nn.Linear):
    """An ``nn.Linear`` (same parameters, same state_dict) that multiplies by packed row blocks."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device, dtype)
        self.packed: list[tuple[torch.Tensor, torch.Tensor | None]] | None = None  # (block, its bias rows)

    @torch.no_grad()
    def prepare(self, dtype=None, reader=None) -> None:
        if not _packable(self.weight):
            return
        N, K = self.weight.shape
        rows = max(16, PACK_BLOCK_BYTES // (2 * K) // 16 * 16)
        blocks = [slice(i, min(i + rows, N)) for i in range(0, N, rows)]
        self.packed = [(pack(_read(reader, "weight", self.weight, b if len(blocks) > 1 else None)),
                        None if self.bias is None else self.bias.detach()[b])
                       for b in blocks]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and usable(x, self.weight):
            if len(self.packed) == 1:
                return matmul(x, *self.packed[0])
            return torch.cat([matmul(x, w, b) for w, b in self.packed], dim=-1)
        return F.linear(x, self.weight, self.bias)


class PackedCCAProjection(ZayaCCAProjection):
    """q, k and both value halves read the same input: one packed matrix, one call."""

    def __init__(self, config):
        super().__init__(config)
        self.packed_qkv: tuple[torch.Tensor, torch.Tensor | None] | None = None

    @torch.no_grad()
    def prepare(self, dtype=None, reader=None) -> None:
        parts = [getattr(self, n) for n in QKV_NAMES]
        if not _packable(parts[0].weight):
            return
        weight = torch.cat([_read(reader, f"{n}.weight", p.weight) for n, p in zip(QKV_NAMES, parts)])
        bias = None if parts[0].bias is None else torch.cat([p.bias.detach() for p in parts])
        self.packed_qkv = (pack(weight), bias)

    def project(self, x: torch.Tensor):
        if self.packed_qkv is None or not usable(x, self.q_proj.weight):
            return super().project(x)
        qkv = matmul(x, *self.packed_qkv)  # [q | k | v current | v delayed]
        n = self.q_proj.out_features + self.k_proj.out_features
        v_cur, v_del = qkv[..., n:].chunk(2, dim=-1)
        return qkv[..., :n], v_cur, v_del


class PackedExperts(ZayaExperts):
    """Stacked experts with a packed (gate_up, down) pair per expert, read one expert at a time so
    loading never holds more than one expert's matrix beyond the packed copies."""

    def __init__(self, config):
        super().__init__(config)
        self.packed: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    @torch.no_grad()
    def prepare(self, dtype=None, reader=None) -> None:
        if not _packable(self.gate_up_proj):
            return
        self.packed = [(pack(_read(reader, "gate_up_proj", self.gate_up_proj, e)),
                        pack(_read(reader, "down_proj", self.down_proj, e)))
                       for e in range(self.num_experts)]

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None or not usable(x, self.gate_up_proj):
            return super().expert(e, x)
        gate_up, down = self.packed[e]
        gate, up = matmul(x, gate_up).chunk(2, dim=-1)
        return matmul(F.silu(gate) * up, down)


PACKED = (PackedLinear, PackedCCAProjection, PackedExperts)


# ------------------------------------------------------------------------------------- swaps
def _rebuilt(make, old: nn.Module) -> nn.Module:
    """A new module built on the meta device that takes over ``old``'s very tensors (so tied
    weights stay tied and gradients reach the same parameters)."""
    with torch.device("meta"):
        new = make()
    for prefix, part in old.named_modules():
        target = new.get_submodule(prefix)
        for name, p in part.named_parameters(recurse=False):
            setattr(target, name, p)
        for name, b in part.named_buffers(recurse=False):
            target.register_buffer(name, b)
    return new


def swap_modules(model: nn.Module) -> nn.Module:
    """Give the float linears, CCA projections and experts of ``model`` their packed classes.

    Quantized modules are left alone (in a quantized model only the router's linears are float).
    The packed copies are built by each module's ``prepare`` once the weights are real."""
    config = getattr(model, "config", None)

    def make(name: str, m: nn.Module):
        if type(m) is ZayaCCAProjection and all(type(getattr(m, n)) is nn.Linear for n in QKV_NAMES):
            return _rebuilt(lambda: PackedCCAProjection(config), m)
        if type(m) is ZayaExperts:
            return _rebuilt(lambda: PackedExperts(config), m)
        if type(m) is nn.Linear:
            return _rebuilt(lambda: PackedLinear(m.in_features, m.out_features, m.bias is not None), m)
        return None

    replace_modules(model, make)
    return model


def pack_model(model: nn.Module, reader=None) -> nn.Module:
    """Swap and pack a model whose weights are already in memory (``reader``: a checkpoint's
    ``PlainReader`` to pack from the file, or None to pack from the parameters)."""
    swap_modules(model)
    for name, m in model.named_modules():
        if isinstance(m, PACKED):
            m.prepare(torch.bfloat16, reader.at(name) if reader is not None else None)
    return model
