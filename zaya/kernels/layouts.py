"""Kernel layouts: natural weights -> the tiles the kernels read, and back.

Every format stores output rows 16 at a time ("n-blocks"); an n-block is a run of 64-byte units,
each holding the next 4 bytes of each of its 16 rows, so one vector load gives one 32-bit lane per
output row (see ``csrc/kernels.h``). K is zero-padded to a multiple of 32 and N to a multiple of
16. Scales and mins are stored ``[n-block, group, 16]``.

A ``KernelWeight`` is built once at load and multiplied with ``zaya.kernels.matmul``; its
``dequantize()`` is the exact fp32 inverse, used by the reference path and by tests. What is
stored, per format (``w`` = the real weight, fp32 arithmetic):

==========  ==================================================================  ==============
format      value                                                               covers exactly
==========  ==================================================================  ==============
``bf16``    ``w``                                                               bf16 / fp16->bf16 when exact
``int8``    ``q * scale[g] (+ min[g])``, q int8, group g of ``group`` k         Q8_0, Q6_K, Q5_K, zaya int8
``4bit``    ``lut[q] * scale[g] (+ min[g])``, q a nibble, 16-entry fp32 lut     Q4_K, MXFP4, zaya int4
``fp8``     ``e4m3(q) * scale[g]``, per row / tensor / (rows x group) blocks    compressed-tensors FP8
==========  ==================================================================  ==============
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

LANES = 16
K_ALIGN = 32
FORMATS = ("bf16", "int8", "4bit", "fp8")
SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
IDENTITY = tuple(float(i) for i in range(16))       # Q4_K (with its per-32 scale and min)
ZAYA_INT4 = tuple(float(i - 8) for i in range(16))  # zaya int4, Q4_0: (q - 8) * scale (+ zero)
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)  # MXFP4 / NVFP4
ROW_BLOCK = 4096  # rows packed at a time, so temporaries stay a few MB whatever the matrix

# byte order inside an fp8 unit: each 128-bit lane holds rows 4j..4j+3 as [k0 k1] pairs, then [k2 k3]
# pairs, which is what the kernel's byte interleave (vpunpck{l,h}bw) turns into bf16 pairs
FP8_UNIT_ORDER = torch.tensor([4 * (4 * j + i) + b + 2 * h for j in range(4) for h in range(2)
                               for i in range(4) for b in range(2)])


@dataclass(frozen=True)
class KernelWeight:
    """One weight matrix (or a stack of experts) in a kernel layout."""

    fmt: str
    data: torch.Tensor                 # [experts?, n-blocks, units, 16, 4 bytes (2 bf16)]
    n: int
    k: int
    group: int = 0                     # k per scale group; 0: one group per row
    scales: torch.Tensor | None = None  # [experts?, n-blocks, groups, 16]
    mins: torch.Tensor | None = None
    lut: torch.Tensor | None = None     # 4bit: 16 float32 values
    experts: int | None = None          # stacked experts, selected per row

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.data, self.scales, self.mins) if t is not None)

    @property
    def supports_act_int8(self) -> bool:
        """Whether ``matmul(..., act_int8=True)`` applies: int8, and 4-bit with a table of small
        integers up to a power-of-two scale."""
        if self.fmt == "int8":
            return True
        return self.fmt == "4bit" and _integer_table(self.lut)

    def dequantize(self) -> torch.Tensor:
        """The weight as fp32 [experts?, n, k], computed as the table above says."""
        return dequantize(self)


def _integer_table(lut: torch.Tensor) -> bool:
    """Mirrors the kernel's test: lut * 2^e integral for some e in 0..8, spanning (with 0) at most 255."""
    for e in range(9):
        v = lut.double() * 2.0 ** e
        if torch.equal(v, v.round()) and max(0.0, float(v.max())) - min(0.0, float(v.min())) <= 255:
            return True
    return False


def padded_k(k: int) -> int:
    return -(-k // K_ALIGN) * K_ALIGN


def _groups(k: int, group: int) -> tuple[int, int]:
    """(group as stored, groups per padded row); group 0 or >= k is one group per row."""
    if group <= 0 or group >= k:
        return 0, 1
    if k % group or not (group == 16 or group % 32 == 0):
        raise ValueError(f"group {group} must divide K={k} and be 16 or a multiple of 32")
    return group, padded_k(k) // group


def _tile(rows: torch.Tensor, elem_per_word: int) -> torch.Tensor:
    """[*, N, K'] (K' a multiple of elem_per_word) -> [*, ceil(N/16), K'/elem_per_word, 16, elem_per_word]."""
    *lead, n, kk = rows.shape
    nb = -(-n // LANES)
    out = rows.new_empty((*lead, nb, kk // elem_per_word, LANES, elem_per_word))
    step = ROW_BLOCK // LANES
    for b0 in range(0, nb, step):
        b1 = min(nb, b0 + step)
        block = rows[..., b0 * LANES:b1 * LANES, :]
        if block.shape[-2] < (b1 - b0) * LANES:
            block = torch.cat([block, block.new_zeros((*lead, (b1 - b0) * LANES - block.shape[-2], kk))], -2)
        block = block.reshape(*lead, b1 - b0, LANES, kk // elem_per_word, elem_per_word)
        out[..., b0:b1, :, :, :] = block.transpose(-3, -2)
    return out


def _untile(tiles: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of ``_tile``: [*, Nb, W, 16, e] -> [*, n, W * e]."""
    *lead, nb, w, lanes, e = tiles.shape
    return tiles.transpose(-3, -2).reshape(*lead, nb * lanes, w * e)[..., :n, :]


def _pad_k(t: torch.Tensor, kp: int) -> torch.Tensor:
    k = t.shape[-1]
    return t if k == kp else torch.cat([t, t.new_zeros((*t.shape[:-1], kp - k))], -1)


def _pack_rows(w: torch.Tensor, kp: int, elem_per_word: int, unit_order: torch.Tensor | None = None
               ) -> torch.Tensor:
    """Pad K and tile (then reorder each unit's bytes by ``unit_order``), a row block at a time:
    no full-size temporary."""
    *lead, n, _ = w.shape
    nb = -(-n // LANES)
    out = w.new_empty((*lead, nb, kp // elem_per_word, LANES, elem_per_word))
    for r0 in range(0, n, ROW_BLOCK):
        r1 = min(n, r0 + ROW_BLOCK)
        block = _tile(_pad_k(w[..., r0:r1, :], kp), elem_per_word)
        if unit_order is not None:
            block = block.reshape(*block.shape[:-2], 64)[..., unit_order].reshape(block.shape)
        out[..., r0 // LANES:-(-r1 // LANES), :, :, :] = block
    return out


def _pack_scales(s: torch.Tensor, n: int, ngroups: int, name: str) -> torch.Tensor:
    """[*, n, groups] (or [*, n] for one group) -> [*, n-blocks, groups padded, 16]."""
    if s.dtype not in SCALE_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {s.dtype}")
    if ngroups == 1 and s.shape[-1:] == (n,):
        s = s[..., None]
    if s.shape[-2] != n or s.shape[-1] > ngroups:
        raise ValueError(f"{name} has shape {tuple(s.shape)}; expected (..., {n}, groups)")
    s = torch.cat([s, s.new_zeros((*s.shape[:-1], ngroups - s.shape[-1]))], -1) if s.shape[-1] < ngroups else s
    tiled = _tile(s.contiguous(), 1)  # [*, nb, groups, 16, 1]
    return tiled[..., 0].contiguous()


def _check_lead(w: torch.Tensor, experts: bool, what: str) -> None:
    if w.dim() != (3 if experts else 2):
        raise ValueError(f"{what} must be {'[experts, N, K]' if experts else '[N, K]'}, got shape {tuple(w.shape)}")


def pack_bf16(w: torch.Tensor, *, experts: bool = False) -> KernelWeight:
    """bf16 [N, K] (or [E, N, K] with ``experts``), stored as bf16 pairs."""
    _check_lead(w, experts, "weight")
    if w.dtype != torch.bfloat16:
        raise ValueError(f"pack_bf16 takes a bfloat16 weight, got {w.dtype}")
    *_, n, k = w.shape
    data = _pack_rows(w, padded_k(k), 2)
    return KernelWeight("bf16", data, n, k, experts=w.shape[0] if experts else None)


def pack_int8(q: torch.Tensor, scales: torch.Tensor, *, group: int = 0, mins: torch.Tensor | None = None,
              experts: bool = False) -> KernelWeight:
    """int8 values ``q`` [E?, N, K] with ``scales`` (and ``mins``) [E?, N, K / group]: w = q * s (+ m)."""
    _check_lead(q, experts, "q")
    if q.dtype != torch.int8:
        raise ValueError(f"pack_int8 takes int8 values, got {q.dtype}")
    *_, n, k = q.shape
    group, ngroups = _groups(k, group)
    data = _pack_rows(q, padded_k(k), 4)
    s = _pack_scales(scales, n, ngroups, "scales")
    m = None if mins is None else _pack_scales(mins.to(scales.dtype), n, ngroups, "mins")
    return KernelWeight("int8", data, n, k, group, s, m, experts=q.shape[0] if experts else None)


def pack_nibbles(values: torch.Tensor) -> torch.Tensor:
    """uint8 values 0..15 [*, K] -> [*, ceil(K/2)], low nibble first (zaya's and compressed-tensors' order)."""
    if values.shape[-1] % 2:
        values = F.pad(values, (0, 1))
    return values[..., 0::2] | (values[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor, k: int) -> torch.Tensor:
    return torch.stack([packed & 0xF, packed >> 4], -1).flatten(-2)[..., :k]


def pack_4bit(nibbles: torch.Tensor, k: int, scales: torch.Tensor, lut: torch.Tensor, *, group: int = 0,
              mins: torch.Tensor | None = None, experts: bool = False) -> KernelWeight:
    """4-bit codes packed two per byte [E?, N, ceil(K/2)] (low nibble = even k), a 16-value
    ``lut``, ``scales`` (and ``mins``) [E?, N, K / group]: w = lut[q] * s (+ m)."""
    _check_lead(nibbles, experts, "nibbles")
    if nibbles.dtype != torch.uint8 or nibbles.shape[-1] != -(-k // 2):
        raise ValueError(f"nibbles must be uint8 [..., N, {-(-k // 2)}] for K={k}, got {nibbles.dtype} "
                         f"{tuple(nibbles.shape)}")
    lut = torch.as_tensor(lut, dtype=torch.float32).flatten().contiguous()
    if lut.numel() != 16:
        raise ValueError(f"lut must have 16 values, got {lut.numel()}")
    n = nibbles.shape[-2]
    group, ngroups = _groups(k, group)
    data = _pack_rows(nibbles, padded_k(k) // 2, 4)
    s = _pack_scales(scales, n, ngroups, "scales")
    m = None if mins is None else _pack_scales(mins.to(scales.dtype), n, ngroups, "mins")
    return KernelWeight("4bit", data, n, k, group, s, m, lut, experts=nibbles.shape[0] if experts else None)


def pack_fp8(w: torch.Tensor, scales: torch.Tensor, *, block: tuple[int, int] | None = None,
             experts: bool = False) -> KernelWeight:
    """float8_e4m3fn [E?, N, K] with a per-tensor (scalar), per-row ([N] / [N, 1]) or block
    ([ceil(N/bn), K/bk] with ``block=(bn, bk)``) scale: w = e4m3(q) * s."""
    _check_lead(w, experts, "weight")
    if w.dtype != torch.float8_e4m3fn:
        raise ValueError(f"pack_fp8 takes float8_e4m3fn, got {w.dtype}")
    *lead, n, k = w.shape
    s = scales if scales.dtype in SCALE_DTYPES else scales.float()
    if block is not None:
        bn, bk = block
        s = s.repeat_interleave(bn, dim=-2)[..., :n, :]
        group = bk
    else:  # one value per tensor (per expert) or per row
        s = s.reshape(*lead, -1, 1).expand(*lead, n, 1)
        group = 0
    group, ngroups = _groups(k, group)
    data = _pack_rows(w.view(torch.uint8), padded_k(k), 4, FP8_UNIT_ORDER)
    return KernelWeight("fp8", data, n, k, group, _pack_scales(s.contiguous(), n, ngroups, "scales"),
                        experts=w.shape[0] if experts else None)


def _expand(per_group: torch.Tensor, w: KernelWeight) -> torch.Tensor:
    """[*, n, groups] -> fp32 [*, n, k]: each group's value over its columns."""
    return per_group.float().repeat_interleave(w.group or padded_k(w.k), dim=-1)[..., :w.k]


def _values(w: KernelWeight, raw: torch.Tensor) -> torch.Tensor:
    """A row's stored bytes (natural order, [*, n, bytes]) -> its fp32 values before scaling, [*, n, k]."""
    if w.fmt == "bf16":
        return raw.view(torch.bfloat16)[..., :w.k].float()
    if w.fmt == "int8":
        return raw.view(torch.int8)[..., :w.k].float()
    if w.fmt == "4bit":
        return w.lut[unpack_nibbles(raw, w.k).long()]
    if w.fmt == "fp8":
        return raw[..., :w.k].contiguous().view(torch.float8_e4m3fn).float()
    raise ValueError(f"unknown kernel format {w.fmt!r}; expected one of {FORMATS}")


def _natural(data: torch.Tensor, fmt: str) -> torch.Tensor:
    """Undo the fp8 byte order inside each unit (the other formats store rows' bytes as they are)."""
    if fmt != "fp8":
        return data
    return data.reshape(*data.shape[:-2], 64)[..., torch.argsort(FP8_UNIT_ORDER)].reshape(data.shape)


def _scaled(w: KernelWeight, values: torch.Tensor, scales, mins, with_mins: bool) -> torch.Tensor:
    """values [*, n, k] * each group's scale (+ its min), broadcast over the group's columns (the
    same fp32 products as expanding the scales, without a [*, n, k] copy of them)."""
    if scales is None:
        return values
    grouped = values.view(*values.shape[:-1], -1, w.group or w.k)  # groups divide k (``_groups``)
    count = grouped.shape[-2]
    out = grouped * scales[..., :count, None].float()
    if mins is not None and with_mins:
        out = out + mins[..., :count, None].float()
    return out.view(values.shape)


def dequantize(w: KernelWeight, *, mins: bool = True) -> torch.Tensor:
    """The exact fp32 weight [experts?, n, k] a KernelWeight stands for (without the per-group
    offsets when ``mins`` is False; ``group_offsets`` gives them)."""
    raw = _untile(_natural(w.data, w.fmt).view(torch.uint8), w.n)
    per_row = lambda t: None if t is None else _untile(t[..., None], w.n)  # noqa: E731
    return _scaled(w, _values(w, raw), per_row(w.scales), per_row(w.mins), mins)


def dequantize_bf16(w: KernelWeight) -> torch.Tensor:
    """``dequantize(w)`` rounded to bf16 [experts?, n, k]. int8 with bf16 scales and no offsets
    goes to bf16 directly: the product of two bf16 values is exact in fp32, so rounding it once
    gives the same bits as the fp32 route, without its three fp32 copies of the matrix."""
    if w.fmt != "int8" or w.mins is not None or w.scales is None or w.scales.dtype != torch.bfloat16:
        return dequantize(w).to(torch.bfloat16)
    values = _untile(w.data.view(torch.int8), w.n)[..., :w.k].to(torch.bfloat16)
    grouped = values.view(*values.shape[:-1], -1, w.group or w.k)
    scales = _untile(w.scales[..., None], w.n)[..., :grouped.shape[-2], None]
    return (grouped * scales).view(values.shape)


def take_rows(w: KernelWeight, ids: torch.Tensor) -> torch.Tensor:
    """Rows ``ids`` of the weight as fp32 [*ids.shape, k], read from the layout: an embedding
    lookup on a tied table needs no second, natural copy of it."""
    if w.experts is not None:
        raise ValueError("take_rows reads one matrix, not stacked experts")
    flat = ids.reshape(-1)
    nb, lane = flat // LANES, flat % LANES
    data = _natural(w.data[nb], w.fmt).view(torch.uint8)  # [rows, units, 16, bytes]
    raw = data[torch.arange(flat.numel()), :, lane].flatten(-2)
    pick = lambda t: None if t is None else t[nb, :, lane]  # noqa: E731
    return _scaled(w, _values(w, raw), pick(w.scales), pick(w.mins), True).reshape(*ids.shape, w.k)


def group_offsets(w: KernelWeight) -> torch.Tensor | None:
    """The per-group offsets ("mins") as fp32 [experts?, n, k], or None."""
    return None if w.mins is None else _expand(_untile(w.mins[..., None], w.n), w)


def row_slice(w: KernelWeight, b0: int, b1: int) -> KernelWeight:
    """n-blocks [b0, b1) of ``w`` (rows 16 * b0 ...) as a KernelWeight of their own (views, no copy)."""
    n = min(w.n, 16 * b1) - 16 * b0
    def pick(t):
        return None if t is None else t[..., b0:b1, :, :]

    return KernelWeight(w.fmt, w.data[..., b0:b1, :, :, :], n, w.k, w.group, pick(w.scales), pick(w.mins), w.lut,
                        w.experts)


def select_expert(w: KernelWeight, e: torch.Tensor | int) -> KernelWeight:
    """Expert ``e`` of a stacked weight (``e`` may be a 0-d tensor: no host synchronisation)."""
    def pick(t):
        return None if t is None else t[e]

    return KernelWeight(w.fmt, w.data[e], w.n, w.k, w.group, pick(w.scales), pick(w.mins), w.lut, None)

