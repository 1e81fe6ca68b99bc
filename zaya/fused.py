"""Fused decode steps on the CPU: a decoder layer's work for a few new tokens per sequence in two C++ calls.

A batch-1 decode step of the eager model issues about 4,000 small operators from Python
(norms, the CCA mixing and one-column conv, q/k norms, RoPE, the cache writes, attention, residual
scaling, the router MLP, the expert), which on a small model cost more than its weight matmuls
(docs/performance.md). ``torch.ops.zaya.fused_attention`` and ``fused_moe`` (``zaya/kernels/csrc/
fused.cpp``) do a layer's work for decode rows in two calls that call the same matmul kernels
internally: the model's arithmetic op for op, every intermediate rounded to the weight dtype
where the eager path rounds it, so results differ from eager only by the summation order of the
norms, the conv's grouped contraction and attention.

``install(model)`` (the checkpoint loader calls it) gives every decoder layer whose weights are all
on zaya's kernels (bf16 packed, zaya int8 / int4, GGUF and compressed-tensors) or all dense
float32 (a float32 model, such as the built-in one: ATen's matmul inside the operators) a
``FusedLayer`` in ``ZayaDecoderLayer.fused``;
the layer hands a call to it and runs eager when it declines: no kernels, gradients, a fresh
prompt, more rows (sequences x new tokens) than `max_batch` allows (32; 256 decode rows of a
float32 layer; ``ZAYA_FUSED_MAX_BATCH`` read at install), a cache other than
the engine's paged ``ForwardBatch``, or a module the fused path does not know (a LoRA adapter, a
oneDNN-packed linear). So decode steps, speculative verify
forwards (S = draft + 1, keeping every position's CCA state for the rollback) and short chunks of
a continued sequence run fused; a sequence's positions pass the conv and the delayed value one by
one, as decode steps would, so verifying a draft computes what decoding it would.
``ZAYA_FUSED=0`` turns it off; eager stays the fallback and the tests' oracle.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass
from operator import attrgetter

import torch
from torch import nn
from torch.nn.modules.module import register_module_module_registration_hook

from zaya import kernels
from zaya.cpu_attention import CPUDecodeAttention
from zaya.formats.modules import KernelExperts, KernelLinear
from zaya.model import ScaledDotProductAttention, ZayaCCAProjection, ZayaExperts, ZayaRMSNorm
from zaya.packed import PackedCCAProjection, PackedExperts, PackedLinear
from zaya.quant import QuantExperts, QuantLinear

FORMATS = {"bf16": 0, "int8": 1, "4bit": 2, "fp8": 3, "dense": -1}
QKV_NAMES = ("q_proj", "k_proj", "v_proj_current", "v_proj_delayed")


def enabled() -> bool:
    """Whether ``ZAYA_FUSED`` allows fused decode steps (on by default)."""
    value = os.environ.get("ZAYA_FUSED", "1").strip().lower()
    if value not in ("0", "1", "off", "on", ""):
        raise ValueError(f"ZAYA_FUSED must be 0/off or 1/on, got {value!r}")
    return value not in ("0", "off")


MAX_ROWS = 32          # rows (sequences x new tokens) of a fused call; past them eager's GEMMs win
MAX_DENSE_DECODE = 256  # decode rows of a float32 layer: ATen's matmuls, and no gathered keys


def max_batch(dense: bool = False) -> tuple[int, int]:
    """Most rows a fused call takes, (decode steps, calls of several positions per sequence):
    ``ZAYA_FUSED_MAX_BATCH`` for both when set, else 32 (measured: a verify forward of 8 x 9
    rows on the mini shape runs 1.0-1.3x slower fused than eager, 2 x 16 1.1x), and for a float32
    layer 256 decode rows (the per-row work that makes long calls slower stays small at one
    position per row)."""
    env = os.environ.get("ZAYA_FUSED_MAX_BATCH", "")
    if env:
        return int(env), int(env)
    return (MAX_DENSE_DECODE if dense else MAX_ROWS), MAX_ROWS


def verify_rows(model) -> int | None:
    """The most rows a speculative verify forward should have for ``model``: set where its decode
    steps are fused at more rows than its verify forwards (float32 layers), so a verify forward
    that would leave the fused path, costing more per token than the fused steps it replaces,
    is cut to fit (`zaya.engine.speculative.fit`); None where no such limit applies."""
    layers = getattr(getattr(model, "model", None), "layers", [])
    fused = getattr(layers[0], "fused", None) if len(layers) else None
    if fused is None:
        return None
    decode, multi = fused.max_rows
    return multi if decode > multi else None


@dataclass
class _DenseWeight:
    data: torch.Tensor          # (n, K) or (experts, n, K), float32
    scales = mins = lut = None
    fmt = "dense"
    group = 0

    @property
    def n(self) -> int:
        return self.data.shape[-2]


@dataclass
class _Dense:
    """A float32 weight as the operators take it (the fields of a kernels.Matmul they read)."""
    w: _DenseWeight
    bias: torch.Tensor | None = None
    act_int8 = False


def _dense(weight: torch.Tensor, bias: torch.Tensor | None = None) -> _Dense | None:
    if weight.dtype != torch.float32 or weight.device.type != "cpu":
        return None
    return _Dense(_DenseWeight(weight.detach().contiguous()), None if bias is None else bias.detach().float())


# ------------------------------------------------------------------------- the layer's weights
def _flatten(mats: list[kernels.Matmul]) -> tuple[list, list[int]]:
    """Matmuls as the operators take them: five tensors and four integers each."""
    tensors, ints = [], []
    for m in mats:
        w = m.w
        tensors += [w.data, w.scales, w.mins, w.lut, m.bias]
        ints += [FORMATS[w.fmt], w.n, w.group, int(m.act_int8)]
    return tensors, ints


def _linear(module) -> kernels.Matmul | None:
    """The kernel Matmul a linear multiplies by, when that is all its forward does."""
    if type(module) is PackedLinear and isinstance(module.packed, kernels.Matmul):
        return module.packed
    if type(module) is QuantLinear and module.bias is None and module.w is not None \
            and isinstance(module.w.kernel, kernels.Matmul):
        return module.w.kernel
    if type(module) is KernelLinear and len(module.kernels) == 1:
        return kernels.Matmul(module.kernels[0], module.bias)
    if type(module) is nn.Linear:
        return _dense(module.weight, module.bias)
    return None


def _projections(proj) -> list[kernels.Matmul] | None:
    if type(proj) is PackedCCAProjection and isinstance(proj.packed_qkv, kernels.Matmul):
        return [proj.packed_qkv]
    if type(proj) is ZayaCCAProjection:
        mats = [_linear(getattr(proj, n)) for n in QKV_NAMES]
        return None if any(m is None for m in mats) else mats
    return None


def _experts(experts) -> list[kernels.Matmul] | None:
    if type(experts) is PackedExperts and experts.stacks is not None:
        return list(experts.stacks)
    if type(experts) is QuantExperts and experts.gate_up_proj.kernel is not None:
        return [experts.gate_up_proj.kernel, experts.down_proj.kernel]
    if type(experts) is KernelExperts and experts.gate_up_proj.stack is not None \
            and experts.down_proj.stack is not None:
        return [kernels.Matmul(experts.gate_up_proj.stack), kernels.Matmul(experts.down_proj.stack)]
    if type(experts) is ZayaExperts:
        mats = [_dense(experts.gate_up_proj), _dense(experts.down_proj)]
        return None if None in mats else mats
    return None


# The submodules a FusedLayer takes weights or behaviour from: a swap of any of them (a LoRA
# adapter applied after load, another attention module) makes it stale, and eager runs. Swaps are
# seen where they happen: torch calls a global hook on every child-module assignment, and the
# layers watching that parent recheck once, so a decode step pays no lookups.
MODULE_PATHS = tuple(f"self_attn.{m}" for m in ("qkv_proj", *(f"qkv_proj.{n}" for n in QKV_NAMES), "o_proj",
                                                 "attend")) + tuple(f"mlp.{m}" for m in (
    "gate", "gate.down_proj", "gate.router_mlp", "gate.router_mlp.fc1", "gate.router_mlp.fc2",
    "gate.router_mlp.out_proj", "experts"))


def _has(layer, path: str) -> bool:
    try:
        attrgetter(path)(layer)
    except AttributeError:
        return False
    return True


_WATCHERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # parent module -> WeakSet of FusedLayers


def _child_assigned(parent, name, module) -> None:
    for fused in _WATCHERS.get(parent, ()):
        fused.recheck = True


register_module_module_registration_hook(_child_assigned)


class FusedLayer:
    """One decoder layer's fused decode step (``__call__`` returns None where eager must run)."""

    def __init__(self, layer, qkv: list, moe: list):
        attn, mlp = layer.self_attn, layer.mlp
        paths = [p for p in MODULE_PATHS if _has(layer, p)]
        self._submodules = attrgetter(*paths)
        self.modules, self.recheck, self.ok = self._submodules(layer), False, True
        for parent in [layer] + [attrgetter(p.rpartition(".")[0])(layer) for p in paths]:
            _WATCHERS.setdefault(parent, weakref.WeakSet()).add(self)
        self.layer_idx, self.layer_type, self.window = attn.layer_idx, attn.layer_type, attn.sliding_window
        proj = attn.qkv_proj
        self.heads = (proj.num_heads, proj.num_kv_heads, proj.head_dim)
        self.qkv, self.qkv_meta = _flatten(qkv)
        self.moe, self.moe_meta = _flatten(moe)
        w0, w1 = proj.conv_qk_depthwise, proj.conv_qk_grouped
        C, D = w0.weight.shape[0], proj.head_dim
        with torch.no_grad():
            self.conv = (w0.weight.float().reshape(C, -1).contiguous(), w0.bias.float().contiguous(),
                         w1.weight.to(layer.input_layernorm.weight.dtype).reshape(w1.groups, D, -1).transpose(1, 2)
                         .contiguous(),
                         w1.bias.float().contiguous())
        self.norm = (layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon)
        self.temp = attn.qk_norm.temp
        gate = mlp.gate
        pa, pm = layer.post_attention_residual_scale, layer.post_mlp_residual_scale
        dtype = layer.input_layernorm.weight.dtype
        carry = gate.router_states_scale if gate.use_eda else torch.empty(0, dtype=dtype)
        self.vecs = [pa.hidden_states_bias, pa.hidden_states_scale, pa.residual_bias, pa.residual_scale,
                     layer.post_attention_layernorm.weight, gate.router_mlp.norm.weight, carry, None,
                     pm.hidden_states_bias, pm.hidden_states_scale, pm.residual_bias, pm.residual_scale]
        self.eps = (layer.post_attention_layernorm.variance_epsilon, gate.router_mlp.norm.variance_epsilon)
        self.gate, self.num_experts = gate, gate.num_experts
        self.max_rows = max_batch(dense=all(isinstance(m, _Dense) for m in qkv + moe))

    def current(self, layer) -> bool:
        """Whether the layer still has the modules this was built from (a swap makes it stale)."""
        if self.recheck:
            self.recheck = False
            try:
                now = self._submodules(layer)
            except AttributeError:  # a module the step was built from is gone
                now = ()
            self.ok = len(now) == len(self.modules) and all(a is b for a, b in zip(now, self.modules))
        return self.ok

    def __call__(self, layer, h: torch.Tensor, router_state, ctx):
        B, S, H = h.shape
        batch = ctx.cache
        if B * S > self.max_rows[S > 1] or ctx.conv_mask is not None or torch.is_grad_enabled() \
                or getattr(batch, "fresh", True) or not hasattr(batch, "layer_plans") or not self.current(layer):
            return None
        i, cache = self.layer_idx, batch.cache
        plan = batch.layer_plans[i]
        state0 = write0 = read0 = 0
        state = write = read = None
        if isinstance(batch.slots, slice):
            state0 = batch.slots.start
        else:
            state = batch.slots
        if isinstance(plan.write, slice):
            write0 = plan.write.start
        else:
            write = plan.write
        L = batch.kv_len - plan.offset
        if isinstance(plan.read, slice):
            read0 = plan.read.start
        else:
            read = plan.read
        mask = ctx.mask(self.window)
        if mask is not None:
            mask = mask.reshape(B * S, L)
        cos, sin = ctx.rope[self.layer_type]
        Hq, Hkv, D = self.heads
        keep = batch.kept is not None or batch.snapshots is not None
        o, qk, v_del = torch.ops.zaya.fused_attention(
            h.view(B * S, H), self.norm[0], self.norm[1], self.qkv, self.qkv_meta, *self.conv, self.temp,
            cos.reshape(B * S, -1), sin.reshape(B * S, -1), cache.layer_conv[i], cache.layer_vdelay[i], state,
            state0, cache.layer_kv[i], write, write0, read, read0, L, mask, Hq, Hkv, D, S, keep)
        if batch.snapshots is not None:
            rows, cols, j, blocks = batch.snapshots
            cache.conv_snap[i].index_copy_(0, blocks, qk[rows[:, None], :, cols].transpose(1, 2))
            cache.vdelay_snap[i].index_copy_(0, blocks, v_del[rows, j])
        if batch.kept is not None:
            batch.kept[i] = (qk, v_del)
        vecs = self.vecs
        biases = self.gate.balancing_biases
        vecs[7] = biases if biases.dtype == torch.float32 else biases.float()
        rs = None if router_state is None else router_state.reshape(B * S, -1)
        h2, r, index = torch.ops.zaya.fused_moe(o, h.view(B * S, H), rs, self.moe, self.moe_meta, vecs, self.eps[0],
                                                self.eps[1], self.num_experts)
        return h2.view(B, S, H), r.view(B, S, -1), index.view(B, S)


def fusable(layer) -> tuple[list, list] | None:
    """The layer's matmuls in the fused operators' order, or None when any part is not one the
    fused path reproduces."""
    attn, mlp = layer.self_attn, layer.mlp
    norms = (layer.input_layernorm, layer.post_attention_layernorm, mlp.gate.router_mlp.norm)
    if any(type(n) is not ZayaRMSNorm for n in norms) or type(attn.attend) not in (ScaledDotProductAttention,
                                                                                   CPUDecodeAttention):
        return None
    dtype = layer.input_layernorm.weight.dtype
    if dtype not in (torch.bfloat16, torch.float32) or layer.input_layernorm.weight.device.type != "cpu":
        return None
    qkv, experts = _projections(attn.qkv_proj), _experts(mlp.experts)
    router = mlp.gate.router_mlp
    moe = [_linear(attn.o_proj), _linear(mlp.gate.down_proj), _linear(router.fc1), _linear(router.fc2),
           _linear(router.out_proj)]
    if qkv is None or experts is None or any(m is None for m in moe):
        return None
    return qkv, moe + experts


def install(model) -> int:
    """Give each decoder layer whose weights are all on the kernels a fused decode step; returns how
    many layers have one. Call it after the modules' ``prepare`` (the packed copies must exist)."""
    if not enabled() or not kernels.available():
        return 0
    count = 0
    for layer in model.model.layers:
        mats = fusable(layer)
        layer.fused = None if mats is None else FusedLayer(layer, *mats)
        count += mats is not None
    return count


def uninstall(model) -> None:
    for layer in model.model.layers:
        layer.fused = None
