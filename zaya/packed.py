"""Prepacked bf16 weights for CPU matmuls, as module swaps.

PyTorch runs a bf16 ``F.linear`` on CPU through oneDNN, and oneDNN first reorders the weight into
its blocked layout, on every call. At decode (one row per sequence) that reorder reads and writes
the whole matrix again, so a bf16 GEMV moves about three times the bytes it needs to. zaya keeps
every bf16 matrix in a layout made for its kernels once, at load:

* the ``zaya.kernels`` layout (``Matmul``), when the compiled kernels are available: one copy
  serves decode (the matvec kernels read it at close to the memory bandwidth) and prefill (the
  same loops reuse each block of the weight for many rows), and the experts of a layer are one
  stack multiplied with a per-row expert index, whatever the batch;
* otherwise oneDNN's own blocked layout (``torch.ops.mkldnn._reorder_linear_weight`` once, then
  ``_linear_pointwise``; the pair PyTorch's compiler uses when it freezes a CPU model), with
  results bit-identical to ``F.linear``.

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

from zaya import kernels
from zaya.model import ZayaCCAProjection, ZayaExperts, replace_modules

_OPS = hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and hasattr(torch.ops.mkldnn, "_linear_pointwise")

QKV_NAMES = ("q_proj", "k_proj", "v_proj_current", "v_proj_delayed")

# A matrix larger than this (a 262k-token LM head is 1 GB) is read and packed in row blocks, so
# loading holds one block beyond the packed copies.
PACK_BLOCK_BYTES = 64 << 20


def available(dtype: torch.dtype, device) -> bool:
    """Whether packing applies: bf16 weights on the CPU (zaya's kernels, or oneDNN), and not
    switched off."""
    cpu = dtype == torch.bfloat16 and torch.device(device or "cpu").type == "cpu"
    return cpu and os.environ.get("ZAYA_CPU_PACKED", "1") != "0" and (
        kernels.available() or (_OPS and torch.backends.mkldnn.is_available()))


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
        return param.detach() if index is None else param.detach()[index]
    return t.to(torch.bfloat16)


class OneDNNMatrix:
    """The fallback when zaya's kernels are unavailable: oneDNN-packed row blocks (bit-identical to
    ``F.linear``)."""

    def __init__(self, read, n: int, k: int, bias: torch.Tensor | None):
        rows = max(16, PACK_BLOCK_BYTES // (2 * k) // 16 * 16)
        blocks = [slice(i, min(i + rows, n)) for i in range(0, n, rows)]
        bias = None if bias is None else bias.detach()
        self.blocks = [(pack(read(b if len(blocks) > 1 else None)), None if bias is None else bias[b])
                       for b in blocks]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.blocks) == 1:
            return matmul(x, *self.blocks[0])
        return torch.cat([matmul(x, w, b) for w, b in self.blocks], dim=-1)


def pack_matrix(read, n: int, k: int, bias: torch.Tensor | None = None):
    """A bf16 (n, k) matrix, read a row block at a time by ``read(rows)`` (``rows`` a slice, or
    None for the whole), in the layout of the kernels that will multiply by it: a ``kernels.Matmul``
    when the compiled kernels are available, else oneDNN row blocks. Either is called as ``m(x)``."""
    if not kernels.available():
        return OneDNNMatrix(read, n, k, bias)
    rows = max(16, PACK_BLOCK_BYTES // (2 * k) // 16 * 16)
    return kernels.Matmul(kernels.pack_in_blocks(lambda r: kernels.pack_bf16(read(r)), n, rows), bias)


# ------------------------------------------------------------------------------------ modules
class PackedLinear(nn.Linear):
    """An ``nn.Linear`` (same parameters, same state_dict) that multiplies by a packed copy."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device, dtype)
        self.packed = None  # kernels.Matmul or OneDNNMatrix

    @torch.no_grad()
    def prepare(self, dtype=None, reader=None) -> None:
        if _packable(self.weight):
            self.packed = pack_matrix(lambda rows: _read(reader, "weight", self.weight, rows), self.out_features,
                                      self.in_features, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and usable(x, self.weight):
            return self.packed(x)
        return F.linear(x, self.weight, self.bias)


class PackedCCAProjection(ZayaCCAProjection):
    """q, k and both value halves read the same input: one packed matrix, one call."""

    def __init__(self, config):
        super().__init__(config)
        self.packed_qkv = None

    @torch.no_grad()
    def prepare(self, dtype=None, reader=None) -> None:
        parts = [getattr(self, n) for n in QKV_NAMES]
        if not _packable(parts[0].weight):
            return
        weight = torch.cat([_read(reader, f"{n}.weight", p.weight) for n, p in zip(QKV_NAMES, parts)])
        bias = None if parts[0].bias is None else torch.cat([p.bias.detach() for p in parts])
        self.packed_qkv = pack_matrix(lambda rows: weight if rows is None else weight[rows], *weight.shape, bias)

    def project(self, x: torch.Tensor):
        if self.packed_qkv is None or not usable(x, self.q_proj.weight):
            return super().project(x)
        qkv = self.packed_qkv(x)  # [q | k | v current | v delayed]
        n = self.q_proj.out_features + self.k_proj.out_features
        v_cur, v_del = qkv[..., n:].chunk(2, dim=-1)
        return qkv[..., :n], v_cur, v_del


class PackedExperts(ZayaExperts):
    """Stacked experts, read one expert at a time so loading never holds more than one expert's
    matrix beyond the packed copies. With zaya's kernels both stacks are one ``Matmul`` each and
    every row picks its expert inside the kernel (no host synchronisation, each chosen expert's
    weights read once per call); with oneDNN, a packed (gate_up, down) pair per expert."""

    def __init__(self, config):
        super().__init__(config)
        self.packed = None                      # oneDNN: [(gate_up, down)] per expert
        self.stacks = None                      # zaya kernels: (gate_up, down) Matmuls over all experts

    @torch.no_grad()
    def prepare(self, dtype=None, reader=None) -> None:
        if not _packable(self.gate_up_proj):
            return
        if kernels.available():
            self.stacks = tuple(kernels.Matmul(kernels.stack_experts(
                lambda e, n=name, p=param: kernels.pack_bf16(_read(reader, n, p, e)), self.num_experts))
                for name, param in (("gate_up_proj", self.gate_up_proj), ("down_proj", self.down_proj)))
            return
        self.packed = [(pack(_read(reader, "gate_up_proj", self.gate_up_proj, e)),
                        pack(_read(reader, "down_proj", self.down_proj, e)))
                       for e in range(self.num_experts)]

    def forward(self, x: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.stacks is None or not usable(x, self.gate_up_proj):
            return super().forward(x, index, weight)
        return kernels.swiglu_experts(*self.stacks, x, index, weight, self.num_experts)

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
