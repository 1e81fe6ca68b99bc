"""ZayaConfig: the typed form of a ZAYA1 ``config.json``.

Field names follow transformers 5.23 ``ZayaConfig`` so one config.json serves both. Unknown keys
are kept in ``extra`` and ignored; invalid values and combinations raise ``ConfigError`` naming
the field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from zaya.errors import ConfigError

LAYER_TYPES = ("hybrid", "hybrid_sliding")
DEFAULT_ROPE = {
    "hybrid": {"rope_type": "default", "rope_theta": 5_000_000.0, "partial_rotary_factor": 0.5},
    "hybrid_sliding": {"rope_type": "default", "rope_theta": 10_000.0, "partial_rotary_factor": 0.5},
}


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
