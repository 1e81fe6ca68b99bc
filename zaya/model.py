"""The ZAYA1 architecture in plain PyTorch.

ZAYA1 (Zyphra, arXiv 2605.05365) is a top-1 mixture-of-experts decoder. What is unusual:

* **Compressed Convolutional Attention** (CCA, arXiv 2510.04476): q and k are projected into a
  compressed latent (8 query heads, 2 KV heads of 128 for ZAYA1-8B), mixed along time by a
  causal depthwise conv then a per-head grouped conv (kernels ``cca_time0``/``cca_time1``),
  given back a GQA-aware mean of their pre-conv values, L2-normalised to sqrt(head_dim) with a
  learned per-KV-head key multiplier ``temp``, and rotated with partial RoPE. Half of every value
  head comes from the previous token (``v_proj_delayed``). Decoding therefore needs, besides the
  KV cache, the last raw q‖k columns (conv state) and the previous token's delayed value.
* **An MLP router with depth carry** (EDA): ``down_proj`` plus ``router_states_scale`` times the
  previous layer's router state, RMSNorm, a 3-layer GELU MLP, softmax over ``num_experts + 1``
  classes (the last one is "skip"). ``balancing_biases`` are added to the probabilities for the
  choice only; the gate is the unbiased probability. A skip token gets a zero MoE output.
* **Learned residual scaling** ``(x + b) * s`` on both the branch output and the fp32 residual.

Names, op order and dtypes follow transformers 5.23 ``models/zaya/modeling_zaya.py`` (the
numerical reference), so a reader can compare the two side by side: branch arithmetic runs in
the weight dtype, the residual stream in fp32, norms see the residual cast to the weight dtype.

Nothing here is specific to a device or a weight format. Loaders put their own module classes in
through a few seams (``replace_modules``): ``ZayaCCAProjection.project`` (the four input
projections), ``ZayaExperts.expert`` (one expert on its tokens) and the attention kernel child
``ZayaAttention.attend``; zaya.quant, zaya.packed and zaya.cpu_attention fill them.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from zaya.config import ZayaConfig
from zaya.context import ForwardContext

# the head's output (in the weight dtype) a chunk of rows may take before it is cast into the
# logits (``ZayaForCausalLM.head``)
LOGITS_CHUNK_BYTES = 128 << 20

# ----------------------------------------------------------------------------------- building blocks
class ZayaRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


def apply_partial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """NeoX rotate-half RoPE on the first ``cos.shape[-1]`` dims of each head; x is (B, H, S, D)."""
    rot = cos.shape[-1]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    half = rot // 2
    rotated = torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1)
    return torch.cat((x_rot * cos + rotated * sin, x_pass), dim=-1)


# ----------------------------------------------------------------------------------------- CCA
class ZayaCCAProjection(nn.Module):
    """q/k/v for one layer: projections, causal two-stage conv on q‖k, GQA mean mix, value delay."""

    def __init__(self, config: ZayaConfig):
        super().__init__()
        c = config
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.kv_groups = c.kv_groups
        self.conv_state_len = c.conv_state_len
        q_size, kv_size = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, q_size, bias=c.attention_bias)
        self.k_proj = nn.Linear(c.hidden_size, kv_size, bias=c.attention_bias)
        self.v_proj_current = nn.Linear(c.hidden_size, kv_size // 2, bias=c.attention_bias)
        self.v_proj_delayed = nn.Linear(c.hidden_size, kv_size // 2, bias=c.attention_bias)
        channels = q_size + kv_size
        self.conv_qk_depthwise = nn.Conv1d(channels, channels, c.cca_time0, groups=channels)
        self.conv_qk_grouped = nn.Conv1d(channels, channels, c.cca_time1,
                                         groups=c.num_attention_heads + c.num_key_value_heads)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The four input projections of x (B, S, H): raw q‖k (B, S, Hq*D + Hkv*D), the current
        and the delayed value halves (B, S, Hkv*D/2). A fused-weight module overrides this."""
        qk = torch.cat([self.q_proj(x), self.k_proj(x)], dim=-1)
        return qk, self.v_proj_current(x), self.v_proj_delayed(x)

    def forward(self, x: torch.Tensor, conv_state: torch.Tensor | None, v_state: torch.Tensor | None):
        """x (B, S, H) normed input with pad tokens already zeroed.

        conv_state (B, C, conv_state_len) raw q‖k columns preceding x (None: a fresh sequence);
        v_state (B, kv_size/2) the previous token's delayed value (None: a fresh sequence).
        Returns query (B, S, Hq, D), key (B, S, Hkv, D), value (B, S, Hkv, D), the raw q‖k columns
        (B, C, conv_state_len + S) with the state's in front, and the delayed value halves
        (B, S, kv_size/2). The CCA state after position j of x is columns j+1 .. j+conv_state_len
        and delayed value j, so a cache can keep the state at any position (block boundaries,
        an accepted draft), not only the last.
        """
        B, S, _ = x.shape
        q_size = self.num_heads * self.head_dim
        qk, v_cur, v_del = self.project(x)
        q_raw, k_raw = qk[..., :q_size], qk[..., q_size:]

        # GQA-aware mean mix of the pre-conv values: every query head gets (q_h + k_g(h)) / 2 and each
        # key head the mean of that over its query group.
        q_res = q_raw.view(B, S, self.num_heads, self.head_dim)
        k_rep = k_raw.view(B, S, self.num_kv_heads, 1, self.head_dim).expand(
            B, S, self.num_kv_heads, self.kv_groups, self.head_dim).reshape(B, S, self.num_heads, self.head_dim)
        q_res = (q_res + k_rep) * 0.5
        k_res = q_res.view(B, S, self.num_kv_heads, self.kv_groups, self.head_dim).mean(dim=-2)

        qk = qk.transpose(1, 2)  # (B, C, S)
        if conv_state is None:
            qk = F.pad(qk, (self.conv_state_len, 0))
        else:
            qk = torch.cat([conv_state.to(qk.dtype), qk], dim=-1)
        if S == 1:
            mixed = self._conv_one_column(qk)  # (B, 1, C)
        else:
            mixed = self.conv_qk_grouped(self.conv_qk_depthwise(qk)).transpose(1, 2)  # (B, S, C)
        query = mixed[..., :q_size].reshape(B, S, self.num_heads, self.head_dim) + q_res
        key = mixed[..., q_size:].reshape(B, S, self.num_kv_heads, self.head_dim) + k_res

        if v_state is None:
            prev = self.v_proj_delayed(x.new_zeros(B, 1, x.shape[-1]))
        else:
            prev = v_state.to(v_del.dtype).unsqueeze(1)
        v_shifted = torch.cat([prev, v_del[:, :-1]], dim=1)
        value = torch.cat([v_cur, v_shifted], dim=-1).view(B, S, self.num_kv_heads, self.head_dim)
        return query, key, value, qk, v_del

    def _conv_one_column(self, qk: torch.Tensor) -> torch.Tensor:
        """Both convs for the newest column only, as two small contractions in fp32.

        A decode step needs one output column; the generic conv kernels cost ~0.2 ms a call on
        CPU for it, this costs a few microseconds. qk (B, C, conv_state_len + 1) -> (B, 1, C).
        (Up to rounding it is the conv path's last column; it serves decode on every device.)"""
        w0, w1 = self.conv_qk_depthwise, self.conv_qk_grouped
        t0, t1 = w0.kernel_size[0], w1.kernel_size[0]
        G = w1.groups
        C = qk.shape[1]
        k0, b0, k1, b1 = self._conv_weights_f32()
        x = qk.float().unfold(-1, t0, 1)                                   # (B, C, t1, t0)
        dw = (x * k0).sum(-1) + b0                                         # (B, C, t1)
        B = dw.shape[0]
        out = torch.einsum("bgk,gok->bgo", dw.view(B, G, C // G * t1), k1).reshape(B, C) + b1
        return out.to(qk.dtype)[:, None]

    def _conv_weights_f32(self):
        """The conv weights as the one-column path uses them, in fp32: converted once per weight
        version at inference (a decode step would otherwise convert them for every token)."""
        w0, w1 = self.conv_qk_depthwise, self.conv_qk_grouped
        params = (w0.weight, w0.bias, w1.weight, w1.bias)
        G, C, t1 = w1.groups, w1.weight.shape[0], w1.kernel_size[0]
        if torch.compiler.is_compiling():  # a compiled graph folds the conversions into constants
            return (w0.weight.float()[:, 0, None, :], w0.bias.float()[:, None],
                    w1.weight.float().view(G, C // G, C // G * t1), w1.bias.float())
        key = tuple((id(p), p._version) for p in params)
        cached = getattr(self, "_conv_f32", None)
        if cached is not None and cached[0] == key and not torch.is_grad_enabled():
            return cached[1]
        out = (w0.weight.float()[:, 0, None, :], w0.bias.float()[:, None],
               w1.weight.float().view(G, C // G, C // G * t1), w1.bias.float())
        if not torch.is_grad_enabled():
            self._conv_f32 = (key, tuple(t.detach() for t in out))
        return out


class ZayaQKNorm(nn.Module):
    """L2-normalise q and k to sqrt(head_dim); keys then take a raw per-KV-head multiplier ``temp``."""

    def __init__(self, config: ZayaConfig):
        super().__init__()
        self.head_dim_scale = config.head_dim ** 0.5
        self.temp = nn.Parameter(torch.ones(config.num_key_value_heads))

    def forward(self, q: torch.Tensor, k: torch.Tensor):
        eps = torch.finfo(q.dtype).eps
        q = q * (self.head_dim_scale / q.norm(p=2, dim=-1, keepdim=True).clamp_min(eps))
        k = k * (self.head_dim_scale / k.norm(p=2, dim=-1, keepdim=True).clamp_min(eps))
        return q, k * self.temp[None, None, :, None]


class ScaledDotProductAttention(nn.Module):
    """softmax(q k^T / sqrt(D)) v with GQA: q (B, Hq, S, D), k/v (B, Hkv, L, D), and the mask
    ``ForwardContext.mask`` gives (None, "causal" or bool (B, 1, S, L)). It holds no weights, so a
    loader can put a kernel for its device in its place without touching the state dict."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.head_dim, self.scale = head_dim, head_dim ** -0.5

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> torch.Tensor:
        causal = isinstance(mask, str)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=None if causal else mask, is_causal=causal,
                                              scale=self.scale, enable_gqa=q.shape[1] != k.shape[1])


class ZayaAttention(nn.Module):
    def __init__(self, config: ZayaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.layer_type = config.layer_types[layer_idx]
        self.sliding_window = config.sliding_window if self.layer_type == "hybrid_sliding" else None
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.qkv_proj = ZayaCCAProjection(config)
        self.qk_norm = ZayaQKNorm(config)
        self.attend = ScaledDotProductAttention(config.head_dim)
        self.o_proj = nn.Linear(config.num_attention_heads * config.head_dim, config.hidden_size,
                                bias=config.attention_bias)

    def queries_keys(self, x: torch.Tensor, conv_state, v_state, cos: torch.Tensor, sin: torch.Tensor):
        """Everything before the cache: q (B, Hq, S, D), k and v (B, Hkv, S, D) normed and rotated,
        and the CCA state columns ``ZayaCCAProjection.forward`` returns."""
        q, k, v, qk_columns, v_delayed = self.qkv_proj(x, conv_state, v_state)
        q, k = self.qk_norm(q, k)
        q = apply_partial_rope(q.transpose(1, 2), cos, sin)
        k = apply_partial_rope(k.transpose(1, 2), cos, sin)
        return q, k, v.transpose(1, 2), qk_columns, v_delayed

    def output(self, o: torch.Tensor) -> torch.Tensor:
        B, _, S, _ = o.shape
        return self.o_proj(o.transpose(1, 2).reshape(B, S, self.num_heads * self.head_dim))


# --------------------------------------------------------------------------------------- MoE
class ZayaRouterMLP(nn.Module):
    def __init__(self, hidden: int, classes: int, eps: float):
        super().__init__()
        self.norm = ZayaRMSNorm(hidden, eps)
        self.fc1 = nn.Linear(hidden, hidden, bias=True)
        self.fc2 = nn.Linear(hidden, hidden, bias=True)
        self.out_proj = nn.Linear(hidden, classes, bias=False)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        r = F.gelu(self.fc1(self.norm(r)))
        return self.out_proj(F.gelu(self.fc2(r)))


class ZayaRouter(nn.Module):
    def __init__(self, config: ZayaConfig, layer_idx: int):
        super().__init__()
        self.num_experts = config.num_experts
        self.down_proj = nn.Linear(config.hidden_size, config.router_hidden_size, bias=True)
        self.use_eda = layer_idx != 0  # the first MoE layer has no earlier router state to carry
        if self.use_eda:
            self.router_states_scale = nn.Parameter(torch.ones(config.router_hidden_size))
        self.router_mlp = ZayaRouterMLP(config.router_hidden_size, config.num_experts + 1, config.rms_norm_eps)
        # Biases steer the choice only. The skip class starts at -1: probabilities live in [0, 1], so
        # with every expert bias >= 0 the skip class can never win the biased argmax.
        biases = torch.zeros(config.num_experts + 1, dtype=torch.float32)
        biases[-1] = -1.0
        self.register_buffer("balancing_biases", biases)

    def forward(self, x: torch.Tensor, router_state: torch.Tensor | None):
        r = self.down_proj(x)
        if self.use_eda and router_state is not None:
            r = r + router_state * self.router_states_scale
        probs = torch.softmax(self.router_mlp(r), dim=-1)
        biased = probs.detach().float() + self.balancing_biases.float()
        index = torch.topk(biased, 1, dim=-1).indices  # topk, not argmax: same tie-breaking as the reference
        weight = probs.gather(-1, index)
        return index.squeeze(-1), weight.squeeze(-1), r


class ZayaExperts(nn.Module):
    """SwiGLU experts stored stacked: gate_up_proj (E, 2I, H) with [gate; up] rows, down_proj (E, H, I)."""

    def __init__(self, config: ZayaConfig):
        super().__init__()
        self.num_experts = config.num_experts
        I, H = config.moe_intermediate_size, config.hidden_size
        self.gate_up_proj = nn.Parameter(torch.empty(config.num_experts, 2 * I, H))
        self.down_proj = nn.Parameter(torch.empty(config.num_experts, H, I))

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on its tokens x (N, H). Quantized and prepacked experts override this."""
        gate, up = F.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.down_proj[e])

    def forward(self, x: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x (N, H), index (N,) in [0, E] where E is the skip class, weight (N,). Skip tokens output 0."""
        out = torch.zeros_like(x)
        if x.shape[0] == 1:
            e = int(index[0])
            if e < self.num_experts:
                out = (self.expert(e, x) * weight[:, None]).to(x.dtype)
            return out
        # Group tokens by expert so each expert's weights are read once; only experts that were
        # chosen are visited.
        order = torch.argsort(index, stable=True)
        counts = torch.bincount(index, minlength=self.num_experts + 1).tolist()
        start = 0
        for e, n in enumerate(counts[: self.num_experts]):
            if n:
                rows = order[start:start + n]
                y = self.expert(e, x[rows]) * weight[rows, None]
                out.index_add_(0, rows, y.to(out.dtype))
            start += n
        return out


class ZayaSparseMoeBlock(nn.Module):
    def __init__(self, config: ZayaConfig, layer_idx: int):
        super().__init__()
        self.gate = ZayaRouter(config, layer_idx)
        self.experts = ZayaExperts(config)

    def forward(self, x: torch.Tensor, router_state: torch.Tensor | None):
        B, S, H = x.shape
        index, weight, router_state = self.gate(x, router_state)
        y = self.experts(x.reshape(B * S, H), index.reshape(-1), weight.reshape(-1))
        return y.view(B, S, H), router_state, index


class ZayaResidualScaling(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.hidden_states_scale = nn.Parameter(torch.ones(hidden))
        self.hidden_states_bias = nn.Parameter(torch.zeros(hidden))
        self.residual_scale = nn.Parameter(torch.ones(hidden))
        self.residual_bias = nn.Parameter(torch.zeros(hidden))

    def forward(self, branch: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        # branch affine in the weight dtype, residual affine in fp32 (the residual stream's dtype)
        branch = (branch + self.hidden_states_bias) * self.hidden_states_scale
        return branch + (residual + self.residual_bias) * self.residual_scale


# ------------------------------------------------------------------------------------- blocks
class ZayaDecoderLayer(nn.Module):
    def __init__(self, config: ZayaConfig, layer_idx: int):
        super().__init__()
        self.self_attn = ZayaAttention(config, layer_idx)
        self.mlp = ZayaSparseMoeBlock(config, layer_idx)
        self.input_layernorm = ZayaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = ZayaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_residual_scale = ZayaResidualScaling(config.hidden_size)
        self.post_mlp_residual_scale = ZayaResidualScaling(config.hidden_size)

    # A fused decode step for this layer (zaya.fused sets it at load on CPUs with zaya's kernels):
    # called first, it returns None for any call it does not take, and eager runs.
    fused = None

    def forward(self, h: torch.Tensor, router_state, ctx: ForwardContext):
        if self.fused is not None:
            out = self.fused(self, h, router_state, ctx)
            if out is not None:
                return out
        attn, cache = self.self_attn, ctx.cache
        conv_state = v_state = None
        if cache is not None:
            conv_state, v_state = cache.read_state(attn.layer_idx)
        q, k, v, qk_columns, v_delayed = self.attention_in(h, conv_state, v_state, *ctx.rope[attn.layer_type],
                                                           ctx.conv_mask)
        if cache is not None:
            k, v = cache.update(attn.layer_idx, k, v, qk_columns, v_delayed)  # (B, Hkv, L, D) each
        o = attn.attend(q, k, v, ctx.mask(attn.sliding_window))  # (B, Hq, S, D)
        return self.attention_out(o, h, router_state)

    # The layer in two halves around the cache and attention, whose shapes grow with the context:
    # each half has the same shapes at every decode step, so a compiler can take it whole
    # (zaya.engine.compiled).
    def attention_in(self, h, conv_state, v_state, cos, sin, conv_mask):
        """Input norm and ``ZayaAttention.queries_keys``."""
        a = self.input_layernorm(h.to(self.input_layernorm.weight.dtype))
        if conv_mask is not None:
            a = a * conv_mask[:, :, None].to(a.dtype)  # pads must not reach the conv or value delay
        return self.self_attn.queries_keys(a, conv_state, v_state, cos, sin)

    def attention_out(self, o: torch.Tensor, h: torch.Tensor, router_state):
        """Output projection, residuals and the MoE: (new residual, router state, expert index)."""
        h = self.post_attention_residual_scale(self.self_attn.output(o), h)
        m = self.post_attention_layernorm(h.to(self.post_attention_layernorm.weight.dtype))
        y, router_state, index = self.mlp(m, router_state)
        return self.post_mlp_residual_scale(y, h), router_state, index


class ZayaModel(nn.Module):
    def __init__(self, config: ZayaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(ZayaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = ZayaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.input_hidden_states_scale = nn.Parameter(torch.ones(config.hidden_size))
        self.input_hidden_states_bias = nn.Parameter(torch.zeros(config.hidden_size))

    def forward(self, input_ids, attention_mask=None, cache=None, expert_counts=False):
        B, S = input_ids.shape
        x = self.embed_tokens(input_ids)
        ctx = ForwardContext(self.config, B, S, x.device, x.dtype, attention_mask, cache)
        # the residual stream is fp32 from here on (the reference's residual_in_fp32)
        h = ((x + self.input_hidden_states_bias) * self.input_hidden_states_scale).float()
        router_state, counts = None, []
        for layer in self.layers:
            h, router_state, index = layer(h, router_state, ctx)
            if expert_counts:
                picked = index if attention_mask is None else index[attention_mask[:, -S:].bool()]
                counts.append(torch.bincount(picked.reshape(-1), minlength=self.config.num_experts + 1))
        h = self.norm(h.to(self.norm.weight.dtype))
        return h, (torch.stack(counts) if expert_counts else None)


class ZayaForCausalLM(nn.Module):
    def __init__(self, config: ZayaConfig):
        super().__init__()
        self.config = config
        self.model = ZayaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=config.lm_head_bias)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def tie_weights(self) -> None:
        # a quantized head ties to the quantized table through its own module (zaya.quant)
        if self.config.tie_word_embeddings and isinstance(self.lm_head, nn.Linear):
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None, cache=None,
                last_only: bool = False, expert_counts: bool = False, logits_dtype: torch.dtype | None = None):
        """Logits (B, S, V) in the weight dtype, or in ``logits_dtype`` (see ``head``); (B, 1, V)
        with ``last_only``.

        With ``expert_counts`` also returns a (num_layers, num_experts + 1) tensor of how many
        (non-pad) tokens each class received, which the balancing controller consumes.
        """
        h, counts = self.model(input_ids, attention_mask, cache, expert_counts)
        if last_only:
            h = h[:, -1:]
        logits = self.head(h, logits_dtype)
        return (logits, counts) if expert_counts else logits

    def head(self, h: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``lm_head`` over h (B, S, H). With a ``dtype`` (fp32 logits for scoring), rows go through
        the head a chunk at a time and each chunk is cast into one preallocated (B, S, V) result, so
        a long sequence over a large vocabulary never holds its logits twice (in the weight dtype
        and upcast); the numbers are those of casting the whole result."""
        if dtype is None:
            return self.lm_head(h)
        B, S, H = h.shape
        V = self.config.vocab_size
        out = h.new_empty((B, S, V), dtype=dtype)
        rows, flat = h.reshape(B * S, H), out.view(B * S, V)
        step = max(1, LOGITS_CHUNK_BYTES // (V * h.element_size()))
        for i in range(0, B * S, step):
            flat[i:i + step] = self.lm_head(rows[i:i + step])
        return out

    @torch.no_grad()
    def init_weights(self, seed: int | None = None, assign=None) -> None:
        """Initialise for training from scratch (std = initializer_range; scales 1, biases 0).

        Random values are drawn whole, in name order, so they depend only on the seed;
        ``assign(param, value)`` stores one (a sharded trainer copies only its own rows)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        assign = assign or (lambda p, v: p.copy_(v))
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("hidden_states_scale", "residual_scale", "input_hidden_states_scale",
                        "router_states_scale", "temp") or name.endswith("norm.weight"):
                p.fill_(1.0)
            elif leaf in ("hidden_states_bias", "residual_bias", "input_hidden_states_bias") or \
                    (leaf == "bias" and "conv" not in name):
                p.zero_()
            elif "conv_qk" in name:
                bound = 1 / math.sqrt(p.shape[1] * p.shape[2]) if p.dim() == 3 else 0.0
                assign(p, torch.empty(p.shape).uniform_(-bound, bound, generator=gen) if bound else torch.zeros(p.shape))
            else:
                assign(p, torch.empty(p.shape).normal_(0.0, std, generator=gen))
        for layer in self.model.layers:
            layer.mlp.gate.balancing_biases.zero_()
            layer.mlp.gate.balancing_biases[-1] = -1.0


# ------------------------------------------------------------------------------------- seams
def replace_modules(root: nn.Module, make: Callable[[str, nn.Module], nn.Module | None], prefix: str = "") -> None:
    """Swap submodules in place, top-down: ``make(name, module)`` returns a replacement or None.

    This is how a loader chooses module classes (quantized, prepacked, a device's attention
    kernel) without the model knowing them. A replaced module's children are not visited."""
    for child_name, child in list(root.named_children()):
        name = prefix + child_name
        new = make(name, child)
        if new is None:
            replace_modules(child, make, name + ".")
        else:
            setattr(root, child_name, new)
