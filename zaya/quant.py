"""Weight-only int8 / int4 quantization of ZAYA1 models.

What is quantized: the attention projections (q, k, both value halves, o), the experts and the
embedding / LM head. What is not: the router (its argmax picks the expert; small errors there
change which weights a token sees), the CCA convs, ``temp``, norms, residual scales and the
balancing biases. They are a fraction of a percent of the bytes.

* **int8**: one scale per output channel, symmetric, ``w ~= q * scale`` with q in [-127, 127].
* **int4**: groups of ``group_size`` input columns, asymmetric, ``w ~= (q - 8) * scale + zero``
  with q in [0, 15] (the convention of PyTorch's int4 CPU kernel and gpt-fast).

On disk (``zaya quantize``) every quantized tensor ``X`` becomes ``X.qweight`` (int8, or uint8
holding two int4 values per byte, the even column in the low nibble), ``X.scales`` and for int4
``X.zeros`` (both ``(..., N, K / group_size)``). That layout is portable; at load time int4
weights are repacked in row blocks into a kernel's own layout (which depends on the CPU's vector
width, so it is never written to disk). On CPU the matmuls run on zaya's kernels
(``zaya.kernels.Matmul``: one layout for decode and prefill, experts chosen per row inside the
kernel, exact activations by default, ``ZAYA_ACT_INT8=1`` for llama.cpp-style int8 ones); where
those cannot be built, on ``torch.ops.aten._weight_int8pack_mm`` / ``_weight_int4pack_mm_for_cpu``; elsewhere the
weight is dequantized on the fly (correct everywhere, fast only where a fused kernel exists).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from zaya import kernels
from zaya.errors import ConfigError
from zaya.kernels import convert
from zaya.model import ZayaExperts, replace_modules

INT4_GROUPS = (32, 64, 128, 256)  # the group sizes the CPU kernel accepts
# The packed int8/int4 kernels cost about M times a GEMV for M rows; from this many rows on
# (prefill), a GEMM on a copy dequantized for the call is faster (benchmarks/kernels.py: int8
# crosses over near 25 rows, int4, whose unpacking costs more, near 100).
DEQUANT_ROWS = {8: 32, 4: 128}
# What is quantized, by module name: the one statement that swapping modules (a quantized
# checkpoint, or quantizing at load) and picking the tensors of a float checkpoint to quantize
# both read.
QUANTIZED_MODULES = re.compile(r"model\.layers\.\d+\.self_attn\."
                               r"(qkv_proj\.(q_proj|k_proj|v_proj_current|v_proj_delayed)|o_proj)"
                               r"|model\.layers\.\d+\.mlp\.experts|model\.embed_tokens|lm_head")
_WEIGHT_LEAVES = ("weight", "gate_up_proj", "down_proj")  # a quantized module's float weights (not its bias)
_HAS_INT8_KERNEL = hasattr(torch.ops.aten, "_weight_int8pack_mm")
_HAS_INT4_KERNEL = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and \
    hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


@dataclass(frozen=True)
class QuantSpec:
    bits: int
    group_size: int = 64

    @classmethod
    def parse(cls, value) -> "QuantSpec | None":
        """``None``, ``"int8"``, ``"int4"``, ``"int4:128"``, a dict (config.json) or a QuantSpec."""
        if value is None or isinstance(value, QuantSpec):
            return value
        if isinstance(value, dict):
            spec = cls(int(value.get("bits", 0)), int(value.get("group_size", 64)))
        else:
            m = re.fullmatch(r"int(\d+)(?::(\d+))?", str(value))
            if not m:
                raise ConfigError(f"quantize must be 'int8' or 'int4' (optionally 'int4:GROUP'), got {value!r}")
            spec = cls(int(m.group(1)), int(m.group(2) or 64))
        if spec.bits not in (4, 8):
            raise ConfigError(f"quantization bits must be 8 or 4, got {spec.bits}")
        if spec.bits == 4 and spec.group_size < 2:
            raise ConfigError(f"int4 group_size must be >= 2, got {spec.group_size}")
        return spec

    def to_config(self) -> dict:
        out = {"method": "zaya-weight-only", "bits": self.bits}
        if self.bits == 4:
            out["group_size"] = self.group_size
        return out

    def group_for(self, in_features: int) -> int:
        """The group actually used for a matrix with ``in_features`` columns (whole rows when smaller)."""
        g = min(self.group_size, in_features)
        if in_features % g:
            raise ConfigError(f"int4 group_size {self.group_size} does not divide a weight's {in_features} columns")
        return g


def is_target(name: str) -> bool:
    """Whether a float checkpoint's tensor ``name`` is quantized."""
    module, _, leaf = name.rpartition(".")
    return leaf in _WEIGHT_LEAVES and QUANTIZED_MODULES.fullmatch(module) is not None


def quantized_names(name: str, spec: QuantSpec) -> list[str]:
    base = name[: -len(".weight")] if name.endswith(".weight") else name
    return [f"{base}.qweight", f"{base}.scales"] + ([f"{base}.zeros"] if spec.bits == 4 else [])


# ------------------------------------------------------------------------------- the arithmetic
@torch.no_grad()
def quantize_tensor(w: torch.Tensor, spec: QuantSpec, scale_dtype: torch.dtype) -> list[torch.Tensor]:
    """(..., N, K) float -> [qweight, scales(, zeros)] in the portable on-disk layout."""
    w = w.float()
    if spec.bits == 8:
        scales = (w.abs().amax(-1) / 127).clamp_min(1e-8)
        q = torch.round(w / scales[..., None]).clamp_(-127, 127).to(torch.int8)
        return [q, scales.to(scale_dtype)]
    *lead, N, K = w.shape
    G = spec.group_for(K)
    g = w.reshape(*lead, N, K // G, G)
    lo, hi = g.amin(-1), g.amax(-1)
    scales = ((hi - lo) / 15).clamp_min(1e-8).to(scale_dtype)
    zeros = (lo + 8 * scales.float()).to(scale_dtype)
    q = torch.round((g - lo[..., None]) / scales.float()[..., None]).clamp_(0, 15).to(torch.uint8)
    q = q.reshape(*lead, N, K)
    return [q[..., 0::2] | (q[..., 1::2] << 4), scales, zeros]


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(..., N, K/2) uint8 -> (..., N, K) uint8 in [0, 15]."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2)


def dequantize(qweight, scales, zeros=None, dtype=torch.float32) -> torch.Tensor:
    # in place after the first conversion: a prefill dequantizes per call, and every fresh
    # multi-megabyte temporary costs page faults
    if zeros is None:
        return qweight.to(dtype).mul_(scales.to(dtype)[..., None])
    q = unpack_int4(qweight)
    *lead, N, K = q.shape
    groups = scales.shape[-1]
    w = q.view(*lead, N, groups, K // groups).to(dtype)
    return w.sub_(8).mul_(scales.to(dtype)[..., None]).add_(zeros.to(dtype)[..., None]).view(*lead, N, K)


def _pack_int4_cpu(qweight) -> torch.Tensor:
    """Portable (N, K/2) -> the CPU kernel's layout, in row blocks so the int32 temporary stays
    small. ``qweight`` is a tensor or a ``FileRows`` (then only a block is ever read)."""
    N = qweight.shape[0]
    rows = max(64, (1 << 22) // max(1, qweight.shape[1]) // 64 * 64)  # ~16 MB of int32 at a time
    out = None
    for i in range(0, N, rows):  # written into one preallocated tensor: no second full copy
        block = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            unpack_int4(qweight[i:i + rows]).to(torch.int32).contiguous(), 1)
        if out is None:
            out = torch.empty((N, *block.shape[1:]), dtype=block.dtype)
        out[i:i + block.shape[0]] = block
    return out


def uses_kernels(device) -> bool:
    """Whether quantized weights on ``device`` are multiplied by zaya's kernels (else PyTorch's)."""
    return torch.device(device).type == "cpu" and kernels.available()


def kernel_weight(source, scales, zeros, *, experts: bool = False) -> kernels.KernelWeight:
    """zaya's int8 / int4 tensors (``source``: the qweight tensor or its ``FileRows``, read a row
    block or an expert at a time) in the kernels' layout."""
    def one(q, s, z):
        if z is None:
            return kernels.pack_in_blocks(lambda r: convert.from_zaya_int8(q[r], s[r]), s.shape[0])
        return kernels.pack_in_blocks(lambda r: convert.from_zaya_int4(q[r], s[r], z[r]), s.shape[0])

    if not experts:
        return one(source, scales, zeros)
    return kernels.stack_experts(lambda e: one(source[e], scales[e], None if zeros is None else zeros[e]),
                                 scales.shape[0])


class QuantWeight:
    """One quantized matrix (N, K) and the fastest way to multiply by it on its device."""

    def __init__(self, qweight, scales, zeros, dtype, source=None):
        """``source``: the same bytes as ``qweight`` in fresh memory or as a ``FileRows`` (to pack
        without paging in an mmap)."""
        self.kernel = None
        self.N, self.K = qweight.shape[0], qweight.shape[1] * (2 if zeros is not None else 1)
        if uses_kernels(qweight.device):
            self.kernel = kernels.Matmul(kernel_weight(qweight if source is None else source, scales, zeros))
            return
        if qweight.device.type == "cpu" and qweight.data_ptr() % 64 and zeros is None:
            qweight = qweight.clone()  # the packed kernels use aligned vector loads; safetensors aligns to 8
        self.qweight, self.zeros, self.dtype = qweight, zeros, dtype
        self.scales = scales
        self.packed = self.scale_zeros = None
        cpu = qweight.device.type == "cpu"
        if zeros is None:
            self.fast = cpu and _HAS_INT8_KERNEL
            self.scales = scales.to(dtype).contiguous()
            if self.fast and self.scales.data_ptr() % 64:
                self.scales = self.scales.clone()
        else:
            G = self.K // scales.shape[-1]
            self.group = G
            self.fast = cpu and _HAS_INT4_KERNEL and G in INT4_GROUPS and self.N % 16 == 0 and self.K % 2 == 0
            if self.fast:
                self.packed = _pack_int4_cpu(qweight if source is None else source)
                self.scale_zeros = torch.stack([scales, zeros], -1).transpose(0, 1).to(dtype).contiguous()

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., K) -> (..., N) in x's dtype."""
        if self.kernel is not None:
            return self.kernel(x)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.K)
        if x2.dtype != self.dtype:
            x2 = x2.to(self.dtype)
        if not self.fast or x2.shape[0] >= DEQUANT_ROWS[4 if self.zeros is not None else 8]:
            # no kernel here, or a prefill, where one GEMM on a dequantized copy wins
            y = F.linear(x2, dequantize(self.qweight, self.scales, self.zeros, self.dtype))
        elif self.zeros is None:
            y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), self.qweight, self.scales)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), self.packed, self.group, self.scale_zeros)
        return y.reshape(*lead, self.N).to(x.dtype)


class _QuantBuffers(nn.Module):
    """Holds qweight / scales (/ zeros) buffers whose names match the on-disk tensors."""

    def _init_buffers(self, shape_q, shape_s, spec: QuantSpec):
        self.spec = spec
        qdtype = torch.int8 if spec.bits == 8 else torch.uint8
        self.register_buffer("qweight", torch.empty(shape_q, dtype=qdtype))
        self.register_buffer("scales", torch.empty(shape_s))
        if spec.bits == 4:
            self.register_buffer("zeros", torch.empty(shape_s))
        else:
            self.zeros = None


def _shapes(N: int, K: int, spec: QuantSpec, lead=()):
    if spec.bits == 8:
        return (*lead, N, K), (*lead, N)
    return (*lead, N, K // 2), (*lead, N, K // spec.group_for(K))


class QuantLinear(_QuantBuffers):
    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_buffers(*_shapes(out_features, in_features, spec), spec)
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.w: QuantWeight | None = None

    def prepare(self, dtype: torch.dtype, reader=None) -> None:
        self.w = QuantWeight(self.qweight, self.scales, self.zeros, dtype, _rows(reader, self))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.w.matmul(x)
        return y if self.bias is None else y + self.bias


class QuantEmbedding(_QuantBuffers):
    """Row lookup dequantizes only the rows asked for (an mmap'd table is paged in row by row)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, spec: QuantSpec):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self._init_buffers(*_shapes(num_embeddings, embedding_dim, spec), spec)
        self.dtype = torch.float32

    def prepare(self, dtype: torch.dtype, reader=None) -> None:
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        z = None if self.zeros is None else self.zeros[flat]
        rows = dequantize(self.qweight[flat], self.scales[flat], z, torch.float32).to(self.dtype)
        return rows.view(*ids.shape, self.embedding_dim)


class TiedQuantHead(nn.Module):
    """The LM head of a tied model: multiplies by the quantized embedding table (no second copy on disk)."""

    def __init__(self, embedding: QuantEmbedding):
        super().__init__()
        self._embedding = (embedding,)  # a tuple, so the table is not registered (and saved) twice
        self.bias = None
        self.w: QuantWeight | None = None

    def prepare(self, dtype: torch.dtype, reader=None) -> None:
        # the reader knows the tie: the head's "qweight" is the table's bytes
        e = self._embedding[0]
        self.w = QuantWeight(e.qweight, e.scales, e.zeros, dtype, _rows(reader, e))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w.matmul(x)


class QuantExperts(ZayaExperts):
    """Stacked SwiGLU experts with quantized gate_up (E, 2I, H) and down (E, H, I)."""

    def __init__(self, config, spec: QuantSpec):
        nn.Module.__init__(self)
        E, I, H = config.num_experts, config.moe_intermediate_size, config.hidden_size
        self.num_experts = E
        self.gate_up_proj = _ExpertStack(E, 2 * I, H, spec)
        self.down_proj = _ExpertStack(E, H, I, spec)

    def forward(self, x: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj.kernel is None:
            return super().forward(x, index, weight)
        return kernels.swiglu_experts(self.gate_up_proj.kernel, self.down_proj.kernel, x, index, weight,
                                      self.num_experts)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj.w[e].matmul(x).chunk(2, dim=-1)
        return self.down_proj.w[e].matmul(F.silu(gate) * up)


class _ExpertStack(_QuantBuffers):
    """One stacked weight of the experts: a kernel over all of them (zaya's kernels choose the
    expert per row), or a ``QuantWeight`` per expert."""

    def __init__(self, E: int, N: int, K: int, spec: QuantSpec):
        super().__init__()
        self._init_buffers(*_shapes(N, K, spec, (E,)), spec)
        self.w: list[QuantWeight] = []
        self.kernel: kernels.Matmul | None = None

    def prepare(self, dtype: torch.dtype, reader=None) -> None:
        if uses_kernels(self.qweight.device):
            rows = _rows(reader, self)
            self.kernel = kernels.Matmul(kernel_weight(self.qweight if rows is None else rows, self.scales,
                                                       self.zeros, experts=True))
            return
        E = self.qweight.shape[0]
        z = self.zeros if self.zeros is not None else [None] * E
        rows = _rows(reader, self)
        src = rows if rows is not None else [None] * E
        self.w = [QuantWeight(q, s, zz, dtype, sq) for q, s, zz, sq in zip(self.qweight, self.scales, z, src)]


def _rows(reader, module: _QuantBuffers):
    """Weights are repacked from the checkpoint file's rows when the reader has them, so their
    mmap'd portable copy is never paged in (PyTorch's int8 kernel uses int8 weights as they are)."""
    if reader is None or (module.zeros is None and not uses_kernels(module.qweight.device)):
        return None
    return reader.rows("qweight")


# ------------------------------------------------------------------------------ model surgery
def swap_modules(model: nn.Module, spec: QuantSpec) -> nn.Module:
    """Give the modules QUANTIZED_MODULES names (of a meta-device ZayaForCausalLM) their quantized
    classes; each module's ``prepare`` builds its kernel layout once the buffers hold real data."""
    config = model.config

    def make(name: str, m: nn.Module):
        if not QUANTIZED_MODULES.fullmatch(name):
            return None
        if isinstance(m, ZayaExperts):
            return QuantExperts(config, spec)
        if isinstance(m, nn.Embedding):
            return QuantEmbedding(m.num_embeddings, m.embedding_dim, spec)
        if name == "lm_head" and config.tie_word_embeddings:
            return TiedQuantHead(model.model.embed_tokens)  # swapped before: the body precedes the head
        if isinstance(m, nn.Linear):
            return QuantLinear(m.in_features, m.out_features, spec, m.bias is not None)
        raise TypeError(f"{name} is a {type(m).__name__}, which has no quantized counterpart")

    with torch.device("meta"):
        replace_modules(model, make)
    return model
