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
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from zaya import packed as cpu_packed
from zaya.errors import ConfigError

LAYER_TYPES = ("hybrid", "hybrid_sliding")
DEFAULT_ROPE = {
    "hybrid": {"rope_type": "default", "rope_theta": 5_000_000.0, "partial_rotary_factor": 0.5},
    "hybrid_sliding": {"rope_type": "default", "rope_theta": 10_000.0, "partial_rotary_factor": 0.5},
}


# --------------------------------------------------------------------------------------- config
@dataclass
class ZayaConfig:
    vocab_size: int = 262272
    hidden_size: int = 2048
    num_hidden_layers: int = 40
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 131072
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    rope_parameters: dict[str, dict[str, Any]] | None = None
    sliding_window: int | None = None
    moe_intermediate_size: int = 2048
    num_experts_per_tok: int = 1
    num_experts: int = 16
    layer_types: list[str] | None = None
    pad_token_id: int | None = 0
    bos_token_id: int | None = 2
    eos_token_id: int | list[int] | None = 106
    attention_bias: bool = False
    lm_head_bias: bool = False
    router_hidden_size: int = 256
    cca_time0: int = 2
    cca_time1: int = 2
    dtype: str = "bfloat16"
    quantization: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.layer_types is None:
            self.layer_types = ["hybrid"] * self.num_hidden_layers
        self.layer_types = list(self.layer_types)
        rope = {k: dict(v) for k, v in DEFAULT_ROPE.items()}
        for key, value in (self.rope_parameters or {}).items():
            if key in LAYER_TYPES and isinstance(value, dict):
                rope[key].update(value)
            # other keys (a stray top-level "rope_type" on the hub config) carry no information
        self.rope_parameters = rope
        self.validate()

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ZayaConfig":
        if not isinstance(raw, dict):
            raise ConfigError(f"config must be a JSON object, got {type(raw).__name__}")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in raw.items() if k in names}
        if "dtype" not in raw and "torch_dtype" in raw:
            kwargs["dtype"] = raw["torch_dtype"]
        if raw.get("rope_parameters") is None and "rope_theta" in raw:
            # older configs carry a flat rope_theta for the global layers
            kwargs["rope_parameters"] = {"hybrid": {"rope_theta": raw["rope_theta"]}}
        if raw.get("model_type", "zaya") != "zaya":
            raise ConfigError(f"config.json has model_type {raw.get('model_type')!r}, expected 'zaya'")
        for name, value in kwargs.items():
            _check_type(cls, name, value)
        try:
            return cls(**kwargs, extra={k: v for k, v in raw.items() if k not in names})
        except TypeError as exc:  # pragma: no cover - guarded by _check_type
            raise ConfigError(str(exc)) from None

    def to_dict(self) -> dict[str, Any]:
        """A config.json that both zaya and transformers' ZayaForCausalLM read."""
        out = {"architectures": ["ZayaForCausalLM"], "model_type": "zaya"}
        for f in dataclasses.fields(self):
            if f.name in ("extra", "quantization"):
                continue
            out[f.name] = getattr(self, f.name)
        out["partial_rotary_factor"] = self.rope_parameters["hybrid"]["partial_rotary_factor"]
        if self.quantization:
            out["quantization"] = self.quantization
        return out

    def validate(self) -> None:
        positive = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "moe_intermediate_size", "num_experts",
                    "router_hidden_size", "cca_time0", "cca_time1", "max_position_embeddings"]
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"config.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_experts_per_tok != 1:
            raise ConfigError("ZAYA1 routes each token to exactly one expert: num_experts_per_tok must be 1, "
                              f"got {self.num_experts_per_tok}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                              f"num_key_value_heads ({self.num_key_value_heads})")
        if (self.num_key_value_heads * self.head_dim) % 2:
            raise ConfigError("num_key_value_heads * head_dim must be even (values are split current/delayed)")
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported (ZAYA1 experts use silu)")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is "
                              f"{self.num_hidden_layers}")
        bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if bad:
            raise ConfigError(f"unknown layer_types {bad}; expected {list(LAYER_TYPES)}")
        if "hybrid_sliding" in self.layer_types and not self.sliding_window:
            raise ConfigError("layer_types contains 'hybrid_sliding' but sliding_window is not set")
        for kind, params in self.rope_parameters.items():
            if params.get("rope_type", "default") != "default":
                raise ConfigError(f"rope_type {params['rope_type']!r} for {kind} layers is not supported")
            rot = self.head_dim * params.get("partial_rotary_factor", 1.0)
            if rot != int(rot) or int(rot) % 2 or not 0 < rot <= self.head_dim:
                raise ConfigError(f"partial_rotary_factor {params.get('partial_rotary_factor')} gives a rotary "
                                  f"width of {rot}, which must be an even integer <= head_dim")
        if self.dtype not in ("bfloat16", "float16", "float32"):
            raise ConfigError(f"dtype {self.dtype!r} must be one of bfloat16, float16, float32")

    # -- derived quantities ---------------------------------------------------------------------
    @property
    def kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def conv_channels(self) -> int:
        return (self.num_attention_heads + self.num_key_value_heads) * self.head_dim

    @property
    def conv_state_len(self) -> int:
        return (self.cca_time0 - 1) + (self.cca_time1 - 1)

    @property
    def eos_ids(self) -> list[int]:
        eos = self.eos_token_id
        return [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))

    def rotary_dim(self, layer_type: str) -> int:
        return int(self.head_dim * self.rope_parameters[layer_type].get("partial_rotary_factor", 1.0))


def _check_type(cls, name: str, value: Any) -> None:
    ints = {"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "max_position_embeddings", "moe_intermediate_size", "num_experts_per_tok",
            "num_experts", "router_hidden_size", "cca_time0", "cca_time1"}
    if name in ints and (not isinstance(value, int) or isinstance(value, bool)):
        raise ConfigError(f"config.{name} must be an integer, got {value!r}")
    if name in ("rms_norm_eps", "initializer_range") and not isinstance(value, (int, float)):
        raise ConfigError(f"config.{name} must be a number, got {value!r}")
    if name == "layer_types" and value is not None and not isinstance(value, list):
        raise ConfigError(f"config.layer_types must be a list, got {value!r}")
    if name == "sliding_window" and value is not None and (not isinstance(value, int) or value < 1):
        raise ConfigError(f"config.sliding_window must be a positive integer or null, got {value!r}")


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


def rope_cos_sin(positions: torch.Tensor, rotary_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin [B, S, rotary_dim], computed in fp32 then cast (as the reference does)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float, device=positions.device)
                                / rotary_dim))
    freqs = positions[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


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

    packed_qkv: tuple | None = None  # the four projections as one prepacked CPU matrix (zaya.packed)

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

    def forward(self, x: torch.Tensor, conv_state: torch.Tensor | None, v_state: torch.Tensor | None):
        """x (B, S, H) normed input with pad tokens already zeroed.

        conv_state (B, C, conv_state_len) raw q‖k columns preceding x (None: a fresh sequence);
        v_state (B, kv_size/2) the previous token's delayed value (None: a fresh sequence).
        Returns query (B, S, Hq, D), key (B, S, Hkv, D), value (B, S, Hkv, D) and the new states.
        """
        B, S, _ = x.shape
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        if self.packed_qkv is not None and cpu_packed.usable(x, self.q_proj.weight):
            qkv = cpu_packed.matmul(x, *self.packed_qkv)  # [q | k | v current | v delayed]
            qk = qkv[..., :q_size + kv_size]
            q_raw, k_raw = qk[..., :q_size], qk[..., q_size:]
            v_cur, v_del = qkv[..., q_size + kv_size:].chunk(2, dim=-1)
        else:
            q_raw, k_raw = self.q_proj(x), self.k_proj(x)
            qk = torch.cat([q_raw, k_raw], dim=-1)
            v_cur, v_del = self.v_proj_current(x), self.v_proj_delayed(x)

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
        new_conv_state = qk[..., qk.shape[-1] - self.conv_state_len:]
        if S == 1 and qk.device.type == "cpu":
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
        return query, key, value, new_conv_state, v_del[:, -1]


    def _conv_one_column(self, qk: torch.Tensor) -> torch.Tensor:
        """Both convs for the newest column only, as two small contractions in fp32.

        A decode step needs one output column; the generic conv kernels cost ~0.2 ms a call on
        CPU for it, this costs a few microseconds. qk (B, C, conv_state_len + 1) -> (B, 1, C)."""
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
        key = tuple((id(p), p._version) for p in params)
        cached = getattr(self, "_conv_f32", None)
        if cached is not None and cached[0] == key and not torch.is_grad_enabled():
            return cached[1]
        G, C, t1 = w1.groups, w1.weight.shape[0], w1.kernel_size[0]
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


class ZayaAttention(nn.Module):
    def __init__(self, config: ZayaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.layer_type = config.layer_types[layer_idx]
        self.sliding_window = config.sliding_window if self.layer_type == "hybrid_sliding" else None
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.qkv_proj = ZayaCCAProjection(config)
        self.qk_norm = ZayaQKNorm(config)
        self.o_proj = nn.Linear(config.num_attention_heads * config.head_dim, config.hidden_size,
                                bias=config.attention_bias)

    def forward(self, x: torch.Tensor, ctx: "ForwardContext") -> torch.Tensor:
        B, S, _ = x.shape
        cache = ctx.cache
        conv_state = v_state = None
        if cache is not None and not ctx.fresh:
            conv_state, v_state = cache.conv[self.layer_idx], cache.vdelay[self.layer_idx]
        q, k, v, new_conv, new_v = self.qkv_proj(x, conv_state, v_state)
        q, k = self.qk_norm(q, k)
        cos, sin = ctx.rope[self.layer_type]
        q = apply_partial_rope(q.transpose(1, 2), cos, sin)  # (B, Hq, S, D)
        k = apply_partial_rope(k.transpose(1, 2), cos, sin)  # (B, Hkv, S, D)
        v = v.transpose(1, 2)
        if cache is not None:
            cache.conv[self.layer_idx].copy_(new_conv)
            cache.vdelay[self.layer_idx].copy_(new_v)
            k, v = cache.write_kv(self.layer_idx, k, v, start=ctx.write_start, kv_len=ctx.kv_len)
        mask = ctx.mask(self.sliding_window)
        causal = isinstance(mask, str)
        if S == 1 and k.shape[2] > DECODE_ATTENTION_MIN_KEYS and q.dtype != torch.float32 and q.device.type == "cpu":
            o = decode_attention(q, k, v, mask, self.head_dim ** -0.5)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=None if causal else mask, is_causal=causal,
                                               scale=self.head_dim ** -0.5, enable_gqa=q.shape[1] != k.shape[1])
        return self.o_proj(o.transpose(1, 2).reshape(B, S, self.num_heads * self.head_dim))


# PyTorch's CPU flash-attention kernel in bf16 costs about 1 us per cached key and head group at
# decode (one query row); above this many keys two fp32 matmuls and a softmax are faster and at
# least as precise (benchmarks/kernels.py --attention).
DECODE_ATTENTION_MIN_KEYS = 128


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                     scale: float) -> torch.Tensor:
    """One query row per sequence: q (B, Hq, 1, D), k/v (B, Hkv, L, D), mask None or bool
    (B, 1, 1, L). Computed in fp32, returned in q's dtype."""
    B, Hq, _, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    scores = torch.matmul(q.float().view(B, Hkv, Hq // Hkv, D), k.float().transpose(-1, -2)).mul_(scale)
    if mask is not None:
        scores.masked_fill_(~mask.view(B, 1, 1, L), float("-inf"))
    out = torch.matmul(scores.softmax(-1), v.float())                 # (B, Hkv, G, D)
    return out.view(B, Hq, 1, D).to(q.dtype)


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

    packed: list | None = None  # per-expert prepacked CPU weights (zaya.packed), inference only

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and cpu_packed.usable(x, self.gate_up_proj):
            gate_up, down = self.packed[e]
            gate, up = cpu_packed.matmul(x, gate_up).chunk(2, dim=-1)
            return cpu_packed.matmul(F.silu(gate) * up, down)
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

    def forward(self, h: torch.Tensor, router_state, ctx: "ForwardContext"):
        dtype = self.input_layernorm.weight.dtype
        a = self.input_layernorm(h.to(dtype))
        if ctx.conv_mask is not None:
            a = a * ctx.conv_mask[:, :, None].to(a.dtype)  # pads must not reach the conv or value delay
        h = self.post_attention_residual_scale(self.self_attn(a, ctx), h)
        m = self.post_attention_layernorm(h.to(dtype))
        y, router_state, index = self.mlp(m, router_state)
        return self.post_mlp_residual_scale(y, h), router_state, index


class ForwardContext:
    """Per-call values every layer shares: rope tables, masks, the cache and its write positions.

    Host-side facts (kv length, whether rows are aligned or padded) are read from the device once
    here, not once per layer."""

    def __init__(self, config: ZayaConfig, B: int, S: int, device, dtype, attention_mask, cache):
        self.cache, self.fresh, self.write_start = cache, False, None
        if cache is None:
            kv_len, q_index = S, torch.arange(S, device=device).expand(B, S)
            starts = torch.zeros(B, dtype=torch.long, device=device)
            if attention_mask is not None:
                starts = (attention_mask == 0).sum(-1) if _is_left_padded(attention_mask) else None
                if starts is None:
                    raise ValueError("attention_mask must be left-padded (zeros only before the first 1)")
        else:
            lo, hi = (int(v) for v in torch.stack([cache.lengths.min(), cache.lengths.max()]).tolist())
            self.fresh = hi == 0
            if attention_mask is not None:
                if not self.fresh:
                    raise ValueError("attention_mask is only accepted for the first chunk of a sequence")
                if not _is_left_padded(attention_mask):
                    raise ValueError("attention_mask must be left-padded (zeros only before the first 1)")
                cache.starts.copy_((attention_mask == 0).sum(-1))
            starts = cache.starts
            q_index = cache.lengths[:, None] + torch.arange(S, device=device)
            kv_len = hi + S
            cache.reserve(kv_len)
            self.write_start = lo if lo == hi else None  # rows aligned: one slice write per layer
        self.kv_len = kv_len
        self.padded = bool(starts.any()) if attention_mask is not None or cache is not None else False
        self.q_index = q_index                            # (B, S) absolute slot of each query
        self.kv_index = torch.arange(kv_len, device=device)
        self.starts = starts
        positions = (q_index - starts[:, None]).clamp_min(0)
        self.rope = {t: rope_cos_sin(positions, config.rotary_dim(t), config.rope_parameters[t]["rope_theta"], dtype)
                     for t in set(config.layer_types)}
        self.conv_mask = None
        if attention_mask is not None and S > 1 and not bool((attention_mask == 1).all()):
            self.conv_mask = attention_mask[:, -S:]
        self._masks: dict = {}

    def mask(self, window: int | None):
        """Boolean (B, 1, S, kv_len): causal, after the row's padding, inside the sliding window.

        A pad query row attends to itself only, which keeps it finite (it is never read). Returns
        None when nothing is masked (one unpadded query row that sees the whole cache) and
        "causal" when plain causal masking over an unpadded fresh sequence is all there is."""
        S = self.q_index.shape[1]
        aligned = self.cache is None or self.write_start is not None  # every row has the same length
        if aligned and not self.padded and (window is None or self.kv_len <= window):
            if S == 1:
                return None
            if S == self.kv_len:
                return "causal"
        if window not in self._masks:
            q = self.q_index[:, :, None]
            kv = self.kv_index[None, None, :]
            allowed = (kv <= q) & (kv >= self.starts[:, None, None])
            if window is not None:
                allowed &= kv > q - window
            allowed |= kv == q
            self._masks[window] = allowed[:, None]
        return self._masks[window]


def _is_left_padded(mask: torch.Tensor) -> bool:
    # left padding means the mask never goes from 1 back to 0 along the sequence
    return bool((mask[:, 1:] >= mask[:, :-1]).all())


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
        if cache is not None:
            cache.lengths += S
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
        # a quantized model ties through its TiedQuantHead instead (zaya.quant)
        if self.config.tie_word_embeddings and isinstance(self.lm_head, nn.Linear):
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None, cache=None,
                last_only: bool = False, expert_counts: bool = False):
        """Logits (B, S, V) in the weight dtype; (B, 1, V) with ``last_only``.

        With ``expert_counts`` also returns a (num_layers, num_experts + 1) tensor of how many
        (non-pad) tokens each class received, which the balancing controller consumes.
        """
        h, counts = self.model(input_ids, attention_mask, cache, expert_counts)
        if last_only:
            h = h[:, -1:]
        logits = self.lm_head(h)
        return (logits, counts) if expert_counts else logits

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Initialise for training from scratch (std = initializer_range; scales 1, biases 0)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
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
                p.copy_(torch.empty(p.shape).uniform_(-bound, bound, generator=gen) if bound else torch.zeros(p.shape))
            else:
                p.copy_(torch.empty(p.shape).normal_(0.0, std, generator=gen))
        for layer in self.model.layers:
            layer.mlp.gate.balancing_biases.zero_()
            layer.mlp.gate.balancing_biases[-1] = -1.0
