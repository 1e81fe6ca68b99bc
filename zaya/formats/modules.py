"""Module classes for weights that stay compressed in memory (GGUF blocks, FP8, MXFP4), as swaps.

A loader builds these on the meta device from a ``Codec`` per tensor (``swap_modules``); the
stored tensors are assigned to their buffers ``data`` (and ``scale``) under the module's name,
and ``prepare`` then converts them into ``zaya.kernels`` layouts, reading from the checkpoint
file into fresh memory when the reader can (so the memory-mapped original is never paged in).

Multiplying: a decode step (at most ``KERNEL_ROWS`` rows) runs the ``zaya.kernels`` matvec on the
layout (fp32 sums of the exactly dequantized weight; without a compiler, zaya.kernels' PyTorch
reference dequantizes a block at a time); more rows (a prefill) multiply by the exactly
dequantized weight, a block of output rows at a time, with ``F.linear`` in the activations' dtype.
Experts are one layout per expert: a top-1 token touches one expert per layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import zaya.kernels as zk
from zaya.kernels.layouts import select_expert
from zaya.formats.codecs import Codec
from zaya.kernels.layouts import row_slice, take_rows
from zaya.model import ZayaExperts, replace_modules

KERNEL_ROWS = 16          # more rows than this go to a GEMM on a dequantized copy (the kernels' own advice)
DEQUANT_BLOCK_ROWS = 4096  # output rows dequantized at a time in that GEMM (a 262k-row head is never whole)


def matmul(x: torch.Tensor, w: zk.KernelWeight) -> torch.Tensor:
    """x (..., K) @ w.T -> (..., N) in x's dtype."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, w.k)
    if x2.shape[0] <= KERNEL_ROWS:
        return zk.matmul(x2, w, out_dtype=x.dtype).reshape(*lead, w.n)
    step = DEQUANT_BLOCK_ROWS // 16
    blocks = w.data.shape[-4]
    parts = [F.linear(x2, row_slice(w, b, min(blocks, b + step)).dequantize().to(x.dtype))
             for b in range(0, blocks, step)]
    return torch.cat(parts, -1).reshape(*lead, w.n)


def _read(reader, name: str, param: torch.Tensor | None, index) -> torch.Tensor | None:
    """``param[index]`` read from the checkpoint file into fresh memory when the reader can (the
    memory-mapped parameter is then never paged in), else from the parameter."""
    if param is None:
        return None
    t = reader.tensor(name, index) if reader is not None else None
    if t is None:
        return param if index is None else param[index]
    return t.clone() if isinstance(index, int) else t  # the reader reuses its buffer for the next expert


class StoredMatrix(nn.Module):
    """The stored tensors of one matrix (or expert stack) and, once prepared, its kernel layouts."""

    def __init__(self, codec: Codec):
        super().__init__()
        self.codec = codec
        self.register_buffer("data", torch.empty(codec.data_shape, dtype=codec.data_dtype))
        if codec.scale_shape is not None:
            self.register_buffer("scale", torch.empty(codec.full_scale_shape, dtype=codec.scale_dtype))
        else:
            self.scale = None
        self.kernels: list[zk.KernelWeight] = []
        self.stack: zk.KernelWeight | None = None  # experts only

    @torch.no_grad()
    def prepare(self, dtype=None, reader=None) -> None:
        if self.codec.experts is None and self.scale is None:  # one matrix, no scales: in row blocks
            self.kernels = [self.codec.kernel_in_blocks(lambda rows: _read(reader, "data", self.data, rows))]
            return
        if self.codec.experts is None:
            self.kernels = [self.codec.kernel(_read(reader, "data", self.data, None),
                                              _read(reader, "scale", self.scale, None))]
            return
        # experts: one stack (what the fused decode step indexes per row), converted one expert at
        # a time; each expert's matrix is a view into it
        self.stack = zk.stack_experts(lambda i: self.codec.kernel(_read(reader, "data", self.data, i),
                                                                  _read(reader, "scale", self.scale, i)),
                                      self.codec.experts)
        self.kernels = [select_expert(self.stack, e) for e in range(self.codec.experts)]

    @property
    def nbytes(self) -> int:
        return sum(w.nbytes for w in self.kernels)


class KernelLinear(StoredMatrix):
    """A compressed ``nn.Linear``: state ``data`` (/ ``scale``, ``bias``)."""

    def __init__(self, codec: Codec, bias: bool = False):
        super().__init__(codec)
        self.in_features, self.out_features = codec.k, codec.n
        self.bias = nn.Parameter(torch.empty(codec.n)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = matmul(x, self.kernels[0])
        return y if self.bias is None else y + self.bias.to(y.dtype)


class KernelExperts(ZayaExperts):
    """Stacked SwiGLU experts kept compressed: ``gate_up_proj`` (E, 2I, H) and ``down_proj`` (E, H, I)."""

    def __init__(self, num_experts: int, gate_up: Codec, down: Codec):
        nn.Module.__init__(self)
        self.num_experts = num_experts
        self.gate_up_proj = StoredMatrix(gate_up)
        self.down_proj = StoredMatrix(down)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = matmul(x, self.gate_up_proj.kernels[e]).chunk(2, dim=-1)
        return matmul(F.silu(gate) * up, self.down_proj.kernels[e])


class KernelEmbedding(StoredMatrix):
    """A compressed embedding table: a lookup dequantizes the rows asked for, from the layout."""

    def __init__(self, codec: Codec):
        super().__init__(codec)
        self.num_embeddings, self.embedding_dim = codec.n, codec.k
        self.dtype = torch.float32

    def prepare(self, dtype: torch.dtype, reader=None) -> None:
        super().prepare(dtype, reader)
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return take_rows(self.kernels[0], ids).to(self.dtype)


class TiedKernelHead(nn.Module):
    """The LM head of a tied model: multiplies by the compressed embedding table."""

    def __init__(self, embedding: KernelEmbedding):
        super().__init__()
        self._embedding = (embedding,)  # a tuple, so the table is not registered twice
        self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return matmul(x, self._embedding[0].kernels[0])


COMPRESSED = (StoredMatrix, KernelExperts, TiedKernelHead)


def swap_modules(model: nn.Module, codecs: dict[str, Codec]) -> nn.Module:
    """Give every module that ``codecs`` names its compressed class (on the meta device).

    ``codecs`` maps a module name to its codec; experts are named by their stacks
    (``<experts>.gate_up_proj`` and ``<experts>.down_proj``)."""
    config = model.config

    def make(name: str, m: nn.Module):
        if isinstance(m, ZayaExperts) and f"{name}.gate_up_proj" in codecs:
            return KernelExperts(config.num_experts, codecs[f"{name}.gate_up_proj"], codecs[f"{name}.down_proj"])
        if name not in codecs:
            return None
        if isinstance(m, nn.Embedding):
            return KernelEmbedding(codecs[name])
        if isinstance(m, nn.Linear):
            return KernelLinear(codecs[name], m.bias is not None)
        raise TypeError(f"{name} is a {type(m).__name__}, which has no compressed counterpart")

    with torch.device("meta"):
        replace_modules(model, make)
        embed = model.model.embed_tokens
        if config.tie_word_embeddings and isinstance(embed, KernelEmbedding):
            model.lm_head = TiedKernelHead(embed)
    return model
